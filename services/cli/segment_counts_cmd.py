"""`campaignctl segment counts --tenant T [SEGMENT_ID]`: how many of a tenant's contacts match
each segment now, and how many of those may be mailed (projections/segment_counts.py).

Reads the read models at DATABASE_URL inside one tenant-scoped transaction
(projections.tenancy.tenant_transaction): an analyst login sees only the tenants granted to
it, so the same command serves analysts and operators. Exits 1 when the counts cannot be
exact (contacts projected before segment counts existed: rebuild the projections) or the
database is unreachable, 2 for an invalid tenant id, 3 when the named segment does not exist.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import psycopg
import typer
from rich.console import Console
from rich.table import Table

from projections.segment_counts import CountsUnavailable, segment_counts
from projections.tenancy import InvalidTenant, tenant_transaction
from services.common.settings import Settings

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def segment_counts_command(
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant id.")],
    segment_id: Annotated[str | None, typer.Argument(help="One segment (default: all).")] = None,
) -> None:
    """Per segment: contacts matching it now, mailable, unsubscribed, suppressed, deleted."""
    now = datetime.now(UTC)
    try:
        with psycopg.connect(Settings().database_url, autocommit=True) as conn, \
                tenant_transaction(conn, tenant):
            counts = segment_counts(conn, tenant, now, segment_id)
    except InvalidTenant as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    except (CountsUnavailable, psycopg.Error) as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    if segment_id is not None and not counts:
        err.print(f"[red]error:[/red] no segment {segment_id!r} for tenant {tenant!r}", highlight=False)
        raise typer.Exit(3)
    table = Table("segment", "name", "matching", "mailable", "unsubscribed", "suppressed",
                  "deleted", title=f"segments of {tenant} at {now:%Y-%m-%d %H:%M:%S} UTC")
    for c in counts:
        table.add_row(c.segment_id, c.name, str(c.matching), str(c.mailable),
                      str(c.unsubscribed), str(c.suppressed), str(c.deleted))
    out.print(table)
