"""Tenant-scoped reads for analysts: the tenant is set per transaction, never per session.

Guarantee: inside `tenant_transaction(conn, tenant)` a `campaign_analyst` login sees the rows of
`tenant` only (and only if that tenant is granted to it); outside one it sees no rows at all,
so a pooled connection handed to the next caller cannot carry the previous caller's tenant.
Row-level security in PostgreSQL (migration 0003) enforces this, not this module: the module
only sets `app.tenant_id` transaction-locally and manages analyst logins.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql

ANALYST_GROUP = "campaign_analyst"
WRITER_GROUP = "campaign_writer"
# Grants a trusted service login (e.g. the read API's pool) whichever tenant it sets.
ANY_TENANT = "*"
# schemas.base.TenantId: the same pattern every event envelope is checked against.
_TENANT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# A login name we are willing to create: plain, so it never needs quoting by hand.
_ROLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class InvalidTenant(ValueError):
    """A tenant id that is empty or does not match the TenantId pattern."""


def check_tenant_id(tenant_id: str) -> str:
    if not isinstance(tenant_id, str) or not _TENANT_ID.fullmatch(tenant_id):
        raise InvalidTenant(f"invalid tenant id: {tenant_id!r}")
    return tenant_id


@contextmanager
def tenant_transaction(
    conn: psycopg.Connection[Any], tenant_id: str
) -> Iterator[psycopg.Transaction]:
    """A new transaction whose reads are scoped to `tenant_id`.

    `set_config(..., is_local => true)` ends with the transaction, commit or rollback, so
    nothing survives on the connection. Refuses to nest inside an open transaction: a
    transaction-local setting made in a savepoint outlives the savepoint, so the outer
    transaction would go on reading as this tenant. Raises InvalidTenant before touching
    the connection.
    """
    check_tenant_id(tenant_id)
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise RuntimeError("tenant_transaction must start a transaction, not nest in one")
    with conn.transaction() as tx:
        conn.execute("SELECT set_config('app.tenant_id', %s, true)", (tenant_id,))
        yield tx


def current_tenant(conn: psycopg.Connection[Any]) -> str | None:
    """The tenant the current transaction is scoped to, or None."""
    row = conn.execute("SELECT NULLIF(current_setting('app.tenant_id', true), '')").fetchone()
    return None if row is None else row[0]


def create_analyst_login(
    admin_conn: psycopg.Connection[Any],
    name: str,
    password: str,
    *,
    tenants: Iterable[str] = (),
) -> None:
    """Create a LOGIN role in `campaign_analyst`, allowed to read `tenants`.

    Pass `tenants=[ANY_TENANT]` only for a trusted service that authenticates its callers
    and sets the tenant itself. A login with no tenants sees no rows. `admin_conn` must be
    allowed to create roles and write analyst_tenants (the owner / a superuser).
    """
    if not _ROLE_NAME.fullmatch(name):
        raise ValueError(f"invalid role name: {name!r}")
    granted = [t if t == ANY_TENANT else check_tenant_id(t) for t in tenants]
    with admin_conn.transaction():
        admin_conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
                sql.Identifier(name), sql.Literal(password), sql.Identifier(ANALYST_GROUP)
            )
        )
        grant_tenants(admin_conn, name, granted)


def grant_tenants(admin_conn: psycopg.Connection[Any], name: str, tenants: Iterable[str]) -> None:
    """Allow analyst login `name` to scope its transactions to each of `tenants`."""
    rows = [(name, t if t == ANY_TENANT else check_tenant_id(t)) for t in tenants]
    if not rows:
        return
    with admin_conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO analyst_tenants (role_name, tenant_id) VALUES (%s, %s)"
            " ON CONFLICT DO NOTHING",
            rows,
        )


def drop_analyst_login(admin_conn: psycopg.Connection[Any], name: str) -> None:
    """Drop the login, its tenant grants and its privileges (in this database)."""
    with admin_conn.transaction():
        admin_conn.execute("DELETE FROM analyst_tenants WHERE role_name = %s", (name,))
        exists = admin_conn.execute(
            "SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)
        ).fetchone()
        if exists:
            role = sql.Identifier(name)
            admin_conn.execute(sql.SQL("DROP OWNED BY {}").format(role))
            admin_conn.execute(sql.SQL("DROP ROLE {}").format(role))
