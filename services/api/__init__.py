"""Read API and live dashboard over the projector's read models.

Guarantee: read-only; every request reads one consistent snapshot (a REPEATABLE READ, READ ONLY
transaction) and only rows of the tenant that owns the request's API key: each query filters by
tenant_id explicitly and the transaction also sets `app.tenant_id` for row-level security.
"""
