"""`campaignctl`: add, get, import, unsubscribe and delete contacts; create, list, send,
schedule, pause, resume, force-send, test-send, cancel, watch and show campaigns.

Thin by design: each command parses its options, calls contacts_import, publishing or progress,
and maps the outcome to an exit code. Exit codes: 0 done (an import with bad rows is done),
1 a fatal error (missing file, unusable CSV, Kafka or PostgreSQL unreachable, campaign not
found, command rejected, schedule missed, timeout), 2 invalid input (pydantic validation,
usage). Errors are one red line on stderr, never a traceback. Settings come from the
environment (`cli_settings()`).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Annotated

import psycopg
import typer
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TimeElapsedColumn, TransferSpeedColumn

from projections.queries import campaign_progress
from projections.schedules import campaign_schedules
from schemas.base import Record
from schemas.commands import (
    CancelCampaign,
    CreateCampaign,
    ForceScheduledSend,
    SampleContact,
    ScheduleCampaign,
    SendCampaign,
    SendTestEmail,
)
from schemas.events import TestEmailFailed, TestEmailSent
from services.cli import campaign_control_cmd, contacts_cmd
from services.cli.contact_csv import column_mapping
from services.cli.contact_flags import lift_flag
from services.cli.contact_merge import merge_case_twins
from services.cli.contacts_import import ImportReport, import_contacts
from services.cli.failures import EXIT_FATAL, EXIT_INVALID, cli_settings, err, fail, fatal_errors, out
from services.cli.lists_cmd import lists_app
from services.cli.ops_cmd import ops_app
from services.cli.progress import (
    await_schedule,
    elapsed_seconds,
    render_campaign,
    render_summary,
    watch_campaign,
)
from services.cli.projections_cmd import projections_app
from services.cli.proof_send import DEFAULT_TIMEOUT_SECONDS, TestSendRejected, send_test_email
from services.cli.publishing import publish_command
from services.cli.segment_counts_cmd import segment_counts_command
from services.cli.segments_cmd import segment_app

# Rejected rows listed after an import; the rest are counted.
SHOWN_REJECTIONS = 20

app = typer.Typer(help="Event-sourced e-mail campaigns: contacts and campaigns.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
contacts_app = typer.Typer(
    help="Contacts: add, get, unsubscribe, delete, import from CSV, lift a suppression or an"
         " unsubscribe.", no_args_is_help=True)
campaign_app = typer.Typer(
    help="Campaigns: create, list, update, send, schedule, pause, resume, force-send, test-send, cancel,"
         " watch, show.",
    no_args_is_help=True)
app.add_typer(contacts_app, name="contacts")
contacts_app.command("add")(contacts_cmd.add)
contacts_app.command("get")(contacts_cmd.get)
contacts_app.command("unsubscribe")(contacts_cmd.unsubscribe)
contacts_app.command("delete")(contacts_cmd.delete)
app.add_typer(campaign_app, name="campaign")
campaign_app.command("list")(campaign_control_cmd.list_command)
campaign_app.command("update")(campaign_control_cmd.update)
campaign_app.command("pause")(campaign_control_cmd.pause)
campaign_app.command("resume")(campaign_control_cmd.resume)
campaign_app.command("duplicate")(campaign_control_cmd.duplicate)
app.add_typer(segment_app, name="segment")
segment_app.command("counts")(segment_counts_command)
app.add_typer(lists_app, name="lists")
app.add_typer(projections_app, name="projections")
app.add_typer(ops_app, name="ops")

Tenant = Annotated[str, typer.Option("--tenant", help="Tenant id.")]
CampaignId = Annotated[str, typer.Argument(help="Campaign id.")]
OptionalFile = Path | None
WatchTimeout = Annotated[float | None, typer.Option("--timeout", help="Give up watching after S seconds.")]


# --- contacts --------------------------------------------------------------------------------


@contacts_app.command("import")
def contacts_import(
    file: Annotated[Path, typer.Argument(help="CSV file with a header; an 'email' column is required.")],
    tenant: Tenant,
    list_id: Annotated[str | None, typer.Option("--list", help="List every contact joins.")] = None,
    mode: Annotated[
        str,
        typer.Option(help="upsert (default) | skip-existing (only new contacts) | blocklist (suppress)"),
    ] = "upsert",
    column: Annotated[list[str] | None, typer.Option(
        "--column", help="Header mapping NAME=TARGET, TARGET one of email, first_name, last_name, lists,"
        " attr.<name> or - (ignore); repeatable.")] = None,
) -> None:
    """Import contacts from a CSV file; bad rows are reported and skipped."""
    with fatal_errors():
        settings = cli_settings()
        bar = Progress(
            "[bold]importing", BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn(),
            console=err, transient=True,
        )
        with bar:
            task = bar.add_task("import", total=None)

            def on_progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            report = import_contacts(file, tenant_id=tenant, list_id=list_id, settings=settings,
                                     on_progress=on_progress, mode=mode,  # type: ignore[arg-type]
                                     columns=column_mapping(column or []))
    _print_import_report(report)


def _print_import_report(report: ImportReport) -> None:
    out.print(
        f"[green]imported {report.imported:,} contacts[/green] in {report.seconds:.2f} s"
        f" ({report.rows_per_second:,.0f} rows/s)",
        highlight=False,
    )
    if report.merged:
        out.print(f"merged {report.merged:,} contacts into the contact of the same address"
                  " (they differed only in case)", highlight=False)
    if not report.rejected_count:
        return
    out.print(f"[yellow]rejected {report.rejected_count:,} rows:[/yellow]", highlight=False)
    for row in report.rejected[:SHOWN_REJECTIONS]:
        out.print(f"  line {row.line}: {escape(row.reason)}", highlight=False)
    if report.rejected_count > SHOWN_REJECTIONS:
        out.print(f"  ... and {report.rejected_count - SHOWN_REJECTIONS:,} more", highlight=False)


ContactArg = Annotated[str, typer.Argument(help="Contact id, or e-mail address (any case).")]
Detail = Annotated[str, typer.Option("--reason", help="Why, for the record.")]


@contacts_app.command("unsuppress")
def contacts_unsuppress(contact: ContactArg, tenant: Tenant, reason: Detail = "") -> None:
    """Lift a contact's suppression (blocklist, hard bounce, complaint): ContactUnsuppressed."""
    with fatal_errors():
        ids = lift_flag(cli_settings(), tenant, contact, "unsuppress", detail=reason)
    out.print(f"unsuppressed {', '.join(ids)}", highlight=False)


@contacts_app.command("resubscribe")
def contacts_resubscribe(
    contact: ContactArg, tenant: Tenant, reason: Detail = "",
    list_id: Annotated[str | None, typer.Option("--list", help="Only this list (default: the global"
                                                " unsubscribe).")] = None,
) -> None:
    """Lift a contact's unsubscribe (global, or from one list): ContactResubscribed."""
    with fatal_errors():
        ids = lift_flag(cli_settings(), tenant, contact, "resubscribe", list_id=list_id, detail=reason)
    out.print(f"resubscribed {', '.join(ids)}" + (f" to {list_id}" if list_id else ""), highlight=False)


@contacts_app.command("merge-case-twins")
def contacts_merge_case_twins(
    tenant: Tenant,
    apply: Annotated[bool, typer.Option("--apply/--dry-run", help="Write the merges (default: only"
                                        " say what they would be).")] = False,
) -> None:
    """Merge contacts an earlier version made twice for one address in two cases (the
    migration of contact ids to the identity rule; imports also do it for the rows they name)."""
    with fatal_errors():
        report = merge_case_twins(cli_settings(), tenant, apply=apply)
    verb = "merged" if apply else "would merge"
    out.print(f"{verb} {report.merged:,} contacts into {len(report.survivors):,}"
              f" ({report.facts:,} events)", highlight=False)
    for survivor in report.survivors:
        out.print(f"  {survivor}", highlight=False)


# --- campaigns -------------------------------------------------------------------------------


def _publish(payload: Record, tenant: str, campaign_id: str) -> uuid.UUID:
    return publish_command(cli_settings(), payload, tenant_id=tenant, campaign_id=campaign_id)


def _read_text(path: Path | None) -> str | None:
    return None if path is None else path.read_text(encoding="utf-8")


@campaign_app.command("create")
def campaign_create(
    tenant: Tenant,
    name: Annotated[str, typer.Option("--name", help="Campaign name.")],
    subject: Annotated[str, typer.Option("--subject", help="Subject line.")],
    from_address: Annotated[str, typer.Option("--from", help="Sender address.")],
    text: Annotated[str | None, typer.Option("--text", help="Plain-text body.")] = None,
    text_file: Annotated[OptionalFile, typer.Option("--text-file", help="Plain-text body file.")] = None,
    html_file: Annotated[OptionalFile, typer.Option("--html-file", help="HTML body from a file.")] = None,
    campaign_id: Annotated[str | None, typer.Option("--id", help="Campaign id (default cmp-<hex12>).")] = (
        None
    ),
) -> None:
    """Create a draft campaign; prints its id."""
    if text is not None and text_file is not None:
        fail("give --text or --text-file, not both", EXIT_INVALID)
    campaign_id = campaign_id or f"cmp-{uuid.uuid4().hex[:12]}"
    with fatal_errors():
        command = CreateCampaign(
            name=name,
            subject=subject,
            from_address=from_address,
            body_text=text if text is not None else _read_text(text_file),
            body_html=_read_text(html_file),
        )
        _publish(command, tenant, campaign_id)
    out.print(campaign_id, highlight=False)


Lists = Annotated[list[str] | None, typer.Option("--list", help="List to send to (repeatable).")]
Contacts = Annotated[list[str] | None, typer.Option("--contact", help="Contact id to send to (repeatable).")]
Segments = Annotated[list[str] | None, typer.Option("--segment", help="Segment to send to (repeatable).")]
ExcludeLists = Annotated[
    list[str] | None, typer.Option("--exclude-list", help="Leave out this list's members (repeatable).")
]
ExcludeSegments = Annotated[
    list[str] | None,
    typer.Option("--exclude-segment", help="Leave out this segment's matches (repeatable)."),
]


def _audience(lists: list[str] | None, contacts: list[str] | None, segments: list[str] | None,
              exclude_lists: list[str] | None, exclude_segments: list[str] | None) -> SendCampaign:
    if not lists and not contacts and not segments:
        fail("give at least one --list, --segment or --contact", EXIT_INVALID)
    return SendCampaign(
        list_ids=lists or [], contact_ids=contacts or [], segment_ids=segments or [],
        exclude_list_ids=exclude_lists or [], exclude_segment_ids=exclude_segments or [],
    )


@campaign_app.command("send")
def campaign_send(
    campaign_id: CampaignId,
    tenant: Tenant,
    lists: Lists = None,
    contacts: Contacts = None,
    segments: Segments = None,
    exclude_lists: ExcludeLists = None,
    exclude_segments: ExcludeSegments = None,
    watch: Annotated[bool, typer.Option("--watch/--no-watch", help="Follow progress until done.")] = True,
    timeout: WatchTimeout = None,
) -> None:
    """Start sending a draft campaign to any mix of lists, segments and contacts, minus
    exclusion lists and segments."""
    with fatal_errors():
        command = _audience(lists, contacts, segments, exclude_lists, exclude_segments)
        command_id = _publish(command, tenant, campaign_id)
        out.print(f"send requested for {campaign_id} (command {command_id})", highlight=False)
        if watch:
            _watch(campaign_id, tenant, timeout, command_id)


@campaign_app.command("schedule")
def campaign_schedule(
    campaign_id: CampaignId,
    tenant: Tenant,
    at: Annotated[str, typer.Option("--at", help="When to send: ISO 8601 with a UTC offset, "
                                                 "e.g. 2030-03-01T09:00:00+01:00.")],
    grace: Annotated[int, typer.Option("--grace", help="Seconds late it may still fire; later "
                                                       "it is reported missed, not sent.")] = 900,
    lists: Lists = None,
    contacts: Contacts = None,
    segments: Segments = None,
    exclude_lists: ExcludeLists = None,
    exclude_segments: ExcludeSegments = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the outcome: recorded, "
                                                                "and fired or missed once due.")] = True,
    timeout: Annotated[float, typer.Option("--timeout", help="Give up waiting after S seconds.")] = 30.0,
) -> None:
    """Schedule a draft campaign's send (the audience is fixed when it fires). Exits 1 when
    it is rejected or its schedule is missed (found more than --grace seconds late), with
    the reason."""
    with fatal_errors():
        send = _audience(lists, contacts, segments, exclude_lists, exclude_segments)
        command = ScheduleCampaign.model_validate({"send_at": at, "send": send, "grace_seconds": grace})
        command_id = _publish(command, tenant, campaign_id)
        out.print(f"schedule requested for {campaign_id} at {command.send_at.isoformat()}"
                  f" (command {command_id})", highlight=False)
        if not wait:
            return
        schedule = await_schedule(cli_settings(), campaign_id, tenant, command_id=command_id,
                                  timeout=timeout, console=err)
        if schedule.state == "fired":
            out.print(f"schedule fired: {campaign_id} is sending", highlight=False)
        elif schedule.state == "cancelled":
            out.print(f"{campaign_id} was cancelled before its schedule fired", highlight=False)
        else:
            out.print(f"scheduled: {campaign_id} sends at {schedule.send_at.isoformat()}"
                      f" (grace {grace} s)", highlight=False)


@campaign_app.command("force-send")
def campaign_force_send(
    campaign_id: CampaignId,
    tenant: Tenant,
    watch: Annotated[bool, typer.Option("--watch/--no-watch", help="Follow progress until done.")] = True,
    timeout: WatchTimeout = None,
) -> None:
    """Send a scheduled campaign now, whether its schedule is pending or was missed."""
    with fatal_errors():
        command_id = _publish(ForceScheduledSend(), tenant, campaign_id)
        out.print(f"forced send requested for {campaign_id} (command {command_id})", highlight=False)
        if watch:
            _watch(campaign_id, tenant, timeout, command_id)


@campaign_app.command("cancel")
def campaign_cancel(
    campaign_id: CampaignId,
    tenant: Tenant,
    reason: Annotated[str | None, typer.Option("--reason", help="Why, for the record.")] = None,
) -> None:
    """Cancel a campaign: recipients not yet mailed are not mailed."""
    with fatal_errors():
        command_id = _publish(CancelCampaign(reason=reason), tenant, campaign_id)
    out.print(f"cancel requested for {campaign_id} (command {command_id})", highlight=False)


@campaign_app.command("test-send")
def campaign_test_send(
    campaign_id: CampaignId,
    tenant: Tenant,
    to: Annotated[list[str], typer.Option("--to", help="Address to mail the test to (repeatable, <= 25).")],
    first_name: Annotated[str, typer.Option("--first-name", help="Sample first name.")] = "",
    last_name: Annotated[str, typer.Option("--last-name", help="Sample last name.")] = "",
    attrs: Annotated[list[str] | None, typer.Option(
        "--attr", help="Sample contact attribute KEY=VALUE (repeatable).")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for each address's outcome.")] = True,
    timeout: Annotated[float, typer.Option("--timeout", help="Give up waiting after S seconds.")] = (
        DEFAULT_TIMEOUT_SECONDS
    ),
) -> None:
    """Mail the campaign's content, subject prefixed "[TEST] ", to the given addresses only:
    its audience, counters and completion are not touched."""
    attributes: dict[str, str] = {}
    for item in attrs or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            fail(f"--attr wants KEY=VALUE, got {item!r}", EXIT_INVALID)
        attributes[key.strip()] = value
    with fatal_errors():
        command = SendTestEmail(
            addresses=to,
            sample=SampleContact(first_name=first_name, last_name=last_name, attributes=attributes),
        )

        def show(outcome: TestEmailSent | TestEmailFailed) -> None:
            if isinstance(outcome, TestEmailSent):
                out.print(f"  {escape(outcome.email)}: sent {escape(outcome.smtp_reply)}", highlight=False)
            else:
                text = escape(f"  {outcome.email}: failed: {outcome.reason}")
                err.print(f"[red]{text}[/red]", highlight=False)

        try:
            report = send_test_email(cli_settings(), command, tenant_id=tenant, campaign_id=campaign_id,
                                     wait=wait, timeout=timeout, on_outcome=show)
        except TestSendRejected as exc:
            fail(f"test send rejected: {exc}")
        out.print(f"test send {report.test_id} for {campaign_id} (command {report.command_id})",
                  highlight=False)
        if not wait:
            return
        if not report.complete:
            missing = [a for a in report.addresses if a not in report.outcomes]
            fail(f"no outcome within {timeout:g} s for {', '.join(missing)}"
                  " (are the command handler and a sender running?)")
        if not report.all_sent:
            raise typer.Exit(EXIT_FATAL)


@campaign_app.command("watch")
def campaign_watch(
    campaign_id: CampaignId,
    tenant: Tenant,
    timeout: WatchTimeout = None,
) -> None:
    """Follow a campaign's progress until it completes or is cancelled."""
    with fatal_errors():
        _watch(campaign_id, tenant, timeout, None)


def _watch(campaign_id: str, tenant: str, timeout: float | None, command_id: uuid.UUID | None) -> None:
    started = time.monotonic()
    final = watch_campaign(
        cli_settings(), campaign_id, tenant, timeout=timeout, console=err, command_id=command_id
    )
    out.print(render_summary(final, elapsed_seconds(final, time.monotonic() - started)))


@campaign_app.command("show")
def campaign_show(campaign_id: CampaignId, tenant: Tenant) -> None:
    """Show a campaign's read model."""
    with fatal_errors():
        with psycopg.connect(cli_settings().database_url) as conn:
            # One snapshot for the progress and the schedule.
            conn.isolation_level, conn.read_only = psycopg.IsolationLevel.REPEATABLE_READ, True
            progress = campaign_progress(conn, campaign_id, tenant)
            schedule = campaign_schedules(conn, tenant, [campaign_id]).get(campaign_id)
        if progress is None:
            fail(f"campaign {campaign_id!r} not found for tenant {tenant!r}")
        out.print(render_campaign(progress, schedule))


if __name__ == "__main__":
    app()
