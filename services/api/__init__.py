"""Read API, command gateway, one-click unsubscribe and live dashboard.

Guarantees: reads are read-only, each in one consistent snapshot (a REPEATABLE READ, READ ONLY
transaction), and see only rows of the tenant that owns the request's API key: each query
filters by tenant_id explicitly and the transaction also sets `app.tenant_id` for row-level
security. Writes go only to the command outbox (services/api/outbox.py): a command or a
one-click unsubscribe is committed there before the caller hears "accepted", and a relay
publishes it to Kafka in order, whenever Kafka is reachable.
"""
