"""`campaignctl campaign list|pause|resume`.

`list` reads the campaigns read model (newest first; filter by status, bounded by --limit);
`pause` and `resume` publish PauseCampaign / ResumeCampaign onto campaign.commands and return
once the broker acknowledged them: the command handler answers with CampaignPaused /
CampaignResumed or a CommandRejected (`campaign show` tells which).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import psycopg
import typer
from rich.table import Table

from projections.queries import CampaignProgress, list_campaigns
from schemas.base import Record
from schemas.commands import PauseCampaign, ResumeCampaign
from services.cli.failures import EXIT_INVALID, cli_settings, fail, fatal_errors, out
from services.cli.publishing import publish_command

Tenant = Annotated[str, typer.Option("--tenant", help="Tenant id.")]
CampaignId = Annotated[str, typer.Argument(help="Campaign id.")]
STATUSES = ("draft", "scheduled", "sending", "paused", "completed", "cancelled")
MAX_LIMIT = 10_000


def list_command(
    tenant: Tenant,
    status: Annotated[str | None, typer.Option("--status", help=f"One of {', '.join(STATUSES)}.")
                      ] = None,
    limit: Annotated[int, typer.Option("--limit", help=f"At most this many (1-{MAX_LIMIT:,}).")
                     ] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per campaign.")] = False,
) -> None:
    """List a tenant's campaigns, newest first, with their progress."""
    if status is not None and status not in STATUSES:
        fail(f"--status must be one of {', '.join(STATUSES)}, not {status!r}", EXIT_INVALID)
    if not 1 <= limit <= MAX_LIMIT:
        fail(f"--limit must be between 1 and {MAX_LIMIT:,}, not {limit}", EXIT_INVALID)
    with fatal_errors(), psycopg.connect(cli_settings().database_url, connect_timeout=10) as conn:
        campaigns = [c for c in list_campaigns(conn, tenant) if status in (None, c.status)][:limit]
    if as_json:
        for campaign in campaigns:
            out.print(json.dumps(asdict(campaign), default=str), highlight=False, markup=False)
        return
    out.print(_table(campaigns))


def _table(campaigns: list[CampaignProgress]) -> Table:
    table = Table("campaign", "name", "status", "total", "sent", "failed", "pending")
    for c in campaigns:
        table.add_row(c.campaign_id, c.name or "", c.status, _count(c.total), _count(c.sent),
                      _count(c.failed), _count(c.pending))
    return table


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _request(command: Record, tenant: str, campaign_id: str, what: str) -> None:
    with fatal_errors():
        command_id = publish_command(cli_settings(), command, tenant_id=tenant,
                                     campaign_id=campaign_id)
    out.print(f"{what} requested for {campaign_id} (command {command_id})", highlight=False)


def pause(
    campaign_id: CampaignId, tenant: Tenant,
    reason: Annotated[str | None, typer.Option("--reason", help="Why, for the record.")] = None,
) -> None:
    """Pause a sending campaign: nothing more is mailed until `resume`."""
    _request(PauseCampaign(reason=reason), tenant, campaign_id, "pause")


def resume(campaign_id: CampaignId, tenant: Tenant) -> None:
    """Resume a paused campaign where it stopped."""
    _request(ResumeCampaign(), tenant, campaign_id, "resume")
