"""`campaignctl campaign list|update|pause|resume|duplicate`.

`list` reads the campaigns read model (newest first; filter by status, bounded by --limit);
`pause` and `resume` publish PauseCampaign / ResumeCampaign onto campaign.commands and return
once the broker acknowledged them: the command handler answers with CampaignPaused /
CampaignResumed or a CommandRejected (`campaign show` tells which). `update` publishes
UpdateCampaign and, unless --no-wait, waits for its CampaignUpdated or its rejection (exit 1);
`duplicate` publishes DuplicateCampaign (keyed by the copy's id) and waits the same way for
the copy's CampaignCreated.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import psycopg
import typer
from rich.table import Table

from projections.queries import CampaignProgress, list_campaigns
from schemas.base import Record
from schemas.commands import DuplicateCampaign, PauseCampaign, ResumeCampaign, UpdateCampaign
from services.cli.failures import EXIT_INVALID, cli_settings, err, fail, fatal_errors, out
from services.cli.progress import await_outcome
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


def _body(text: str | None, path: Path | None, option: str) -> str | None:
    if text is not None and path is not None:
        fail(f"give {option} or {option}-file, not both", EXIT_INVALID)
    return text if path is None else path.read_text(encoding="utf-8")


def update(
    campaign_id: CampaignId, tenant: Tenant,
    name: Annotated[str | None, typer.Option("--name", help="New name.")] = None,
    subject: Annotated[str | None, typer.Option("--subject", help="New subject line.")] = None,
    from_address: Annotated[str | None, typer.Option("--from", help="New sender address.")] = None,
    text: Annotated[str | None, typer.Option("--text", help='New plain-text body ("" removes it).')
                    ] = None,
    text_file: Annotated[Path | None, typer.Option("--text-file", help="New plain-text body file.",
                                                   exists=True, dir_okay=False)] = None,
    html: Annotated[str | None, typer.Option("--html", help='New HTML body ("" removes it).')] = None,
    html_file: Annotated[Path | None, typer.Option("--html-file", help="New HTML body file.",
                                                   exists=True, dir_okay=False)] = None,
    track_opens: Annotated[bool | None, typer.Option("--track-opens/--no-track-opens",
                                                     help="Add an open pixel, or stop.")] = None,
    track_clicks: Annotated[bool | None, typer.Option("--track-clicks/--no-track-clicks",
                                                      help="Redirect links, or stop.")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the outcome.")] = True,
    timeout: Annotated[float, typer.Option("--timeout", help="Give up waiting after S seconds.")
                       ] = 30.0,
) -> None:
    """Change a draft (or scheduled) campaign's content or tracking; only the options given
    change. Exits 1 when it is rejected (e.g. the campaign is already sending)."""
    with fatal_errors():
        command = UpdateCampaign(
            name=name, subject=subject, from_address=from_address,
            body_text=_body(text, text_file, "--text"), body_html=_body(html, html_file, "--html"),
            track_opens=track_opens, track_clicks=track_clicks,
        )
        command_id = publish_command(cli_settings(), command, tenant_id=tenant,
                                     campaign_id=campaign_id)
        out.print(f"update requested for {campaign_id} (command {command_id})", highlight=False)
        if wait:
            await_outcome(cli_settings(), campaign_id, tenant, command_id=command_id,
                          event_type="CampaignUpdated", timeout=timeout, console=err)
            out.print(f"updated {campaign_id}", highlight=False)


def duplicate(
    campaign_id: CampaignId, tenant: Tenant,
    new_id: Annotated[str | None, typer.Option("--new-id", help="Id of the copy (default: drawn).")
                      ] = None,
    name: Annotated[str | None, typer.Option("--name", help='Name of the copy (default: the'
                                                           ' source\'s + " (copy)").')] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the outcome.")] = True,
    timeout: Annotated[float, typer.Option("--timeout", help="Give up waiting after S seconds.")
                       ] = 30.0,
) -> None:
    """Copy a campaign's content and tracking into a new draft; prints the new id. Exits 1
    when it is rejected (unknown source, the new id taken)."""
    copy_id = new_id or f"cmp-{uuid.uuid4().hex[:12]}"
    with fatal_errors():
        command = DuplicateCampaign(source_campaign_id=campaign_id, name=name)
        command_id = publish_command(cli_settings(), command, tenant_id=tenant, campaign_id=copy_id)
        out.print(f"duplicate of {campaign_id} requested as {copy_id} (command {command_id})",
                  highlight=False)
        if wait:
            await_outcome(cli_settings(), copy_id, tenant, command_id=command_id,
                          event_type="CampaignCreated", timeout=timeout, console=err)
            out.print(f"created {copy_id}", highlight=False)
