"""`campaignctl lists create|rename|delete|list|show`: contact lists, the same commands as the
HTTP API (services/api/lists.py).

`create`, `rename` and `delete` publish CreateList / RenameList / DeleteList onto
campaign.commands and, unless --no-wait, wait for the handler's event (ListCreated,
ListRenamed, ListDeleted) to be projected, or its rejection (exit 1 with the reason: the list
exists, is unknown, or was deleted; a deleted list's id is never reused). `list` and `show`
read the read models: created and implicit lists (named by memberships only) with their
member counts; deleted ones are left out (`show` of one exits 1, like an unknown id).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import psycopg
import typer
from rich.table import Table

from schemas.base import Record
from schemas.lists import CreateList, DeleteList, RenameList
from services.api.queries import ListRow, tenant_lists
from services.cli.failures import cli_settings, err, fail, fatal_errors, out
from services.cli.progress import await_outcome
from services.cli.publishing import publish_command

lists_app = typer.Typer(help="Contact lists: create, rename, delete, list, show.",
                        no_args_is_help=True)

Tenant = Annotated[str, typer.Option("--tenant", help="Tenant id.")]
ListId = Annotated[str, typer.Argument(help="List id.")]
Wait = Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the outcome.")]
Timeout = Annotated[float, typer.Option("--timeout", help="Give up waiting after S seconds.")]
AsJson = Annotated[bool, typer.Option("--json", help="JSON output.")]


def _command(command: Record, tenant: str, list_id: str, event_type: str, done: str,
             wait: bool, timeout: float) -> None:
    with fatal_errors():
        settings = cli_settings()
        command_id = publish_command(settings, command, tenant_id=tenant, campaign_id=list_id)
        out.print(f"{type(command).__name__} {list_id} published (command {command_id})",
                  highlight=False)
        if wait:
            await_outcome(settings, list_id, tenant, command_id=command_id,
                          event_type=event_type, timeout=timeout, console=err)
            out.print(f"{done} {list_id}", highlight=False)


@lists_app.command("create")
def create(list_id: ListId, tenant: Tenant,
           name: Annotated[str, typer.Option("--name", help="List name.")],
           wait: Wait = True, timeout: Timeout = 30.0) -> None:
    """Create a list (or name an implicit one; its members stay)."""
    with fatal_errors():
        command = CreateList(list_id=list_id, name=name)
    _command(command, tenant, list_id, "ListCreated", "created", wait, timeout)


@lists_app.command("rename")
def rename(list_id: ListId, tenant: Tenant,
           name: Annotated[str, typer.Option("--name", help="New name.")],
           wait: Wait = True, timeout: Timeout = 30.0) -> None:
    """Rename a list."""
    with fatal_errors():
        command = RenameList(list_id=list_id, name=name)
    _command(command, tenant, list_id, "ListRenamed", "renamed", wait, timeout)


@lists_app.command("delete")
def delete(list_id: ListId, tenant: Tenant, wait: Wait = True, timeout: Timeout = 30.0) -> None:
    """Delete a list for good: later sends naming it are rejected; its id is not reused."""
    with fatal_errors():
        command = DeleteList(list_id=list_id)
    _command(command, tenant, list_id, "ListDeleted", "deleted", wait, timeout)


def _read(tenant: str, list_id: str | None) -> list[ListRow]:
    with fatal_errors(), psycopg.connect(cli_settings().database_url, connect_timeout=10) as conn:
        return tenant_lists(conn, tenant, list_id)


def _print(rows: list[ListRow], as_json: bool) -> None:
    if as_json:
        for row in rows:
            out.print(json.dumps(asdict(row), default=str), highlight=False, markup=False)
        return
    table = Table("list", "name", "members", "mailable", "unsubscribed", "suppressed")
    for r in rows:
        table.add_row(r.list_id, r.name or "", f"{r.members:,}", f"{r.mailable:,}",
                      f"{r.unsubscribed:,}", f"{r.suppressed:,}")
    out.print(table)


@lists_app.command("list")
def list_command(tenant: Tenant, as_json: AsJson = False) -> None:
    """The tenant's lists with their member counts (one JSON object per list with --json)."""
    _print(_read(tenant, None), as_json)


@lists_app.command("show")
def show(list_id: ListId, tenant: Tenant, as_json: AsJson = False) -> None:
    """One list with its counts; exit 1 when unknown or deleted."""
    rows = _read(tenant, list_id)
    if not rows:
        fail(f"list {list_id!r} not found for tenant {tenant!r}")
    _print(rows, as_json)
