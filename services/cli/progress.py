"""Live campaign progress for the CLI, read from the projector's read models.

Guarantee: read-only. `watch_campaign` returns only when the read model shows the campaign
completed or cancelled; it raises `CommandWasRejected` as soon as a rejection of the watched
command (or, without a command id, any rejection for the campaign since the watch began) is
projected, `ScheduleWasMissed` when the campaign's schedule was missed (it will not send by
itself), and TimeoutError when the timeout passes first. `await_schedule` follows a
ScheduleCampaign to its outcome: recorded (and, once due, fired) or missed with the reason.
What it shows lags the pipeline by the projector's batch latency; it never shows counters that
do not add up (each poll reads one snapshot).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from rich.console import Console, Group
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from projections.queries import CampaignProgress, campaign_progress
from projections.schedules import CampaignSchedule, campaign_schedules, caused_events
from services.common.settings import Settings

# How often the read model is polled: fast enough for a smooth bar, a trivial load on the
# database (two indexed single-row reads per poll).
POLL_SECONDS = 0.2
# Terminal statuses: the watch ends on either.
FINISHED = ("completed", "cancelled")
# Clock skew allowed between this machine and the command handler's when matching rejections
# "since the watch began": a rejection stamped slightly before the watch still belongs to it.
REJECTION_SKEW = timedelta(seconds=5)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A projected CommandRejected for a campaign."""

    command_id: uuid.UUID | None
    command_type: str | None
    reason: str
    occurred_at: datetime


class CommandWasRejected(Exception):
    """The command handler refused the watched command; the rejection says why."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.reason)
        self.rejection = rejection


class ScheduleWasMissed(Exception):
    """The campaign's schedule was found too late (or its audience no longer valid): it was
    not sent and will not be unless forced."""

    def __init__(self, schedule: CampaignSchedule) -> None:
        super().__init__(schedule.reason or "schedule missed")
        self.schedule = schedule


def missed_message(schedule: CampaignSchedule) -> str:
    """One line: which schedule was missed, why, and what sends it."""
    return (f"schedule of {schedule.campaign_id} for {_moment(schedule.send_at)} missed:"
            f" {schedule.reason or 'no reason given'}; `campaignctl campaign force-send"
            f" {schedule.campaign_id}` sends it now")


def _missed(console: Console, schedule: CampaignSchedule) -> ScheduleWasMissed:
    console.print(f"[red]{escape(missed_message(schedule))}[/red]", highlight=False)
    return ScheduleWasMissed(schedule)


def _rejected(console: Console, campaign_id: str, rejection: Rejection) -> CommandWasRejected:
    console.print(
        f"[red]{rejection.command_type or 'command'} rejected for {campaign_id}:"
        f" {escape(rejection.reason)}[/red]",
        highlight=False,
    )
    return CommandWasRejected(rejection)


def find_rejection(
    conn: psycopg.Connection[Any],
    tenant_id: str,
    campaign_id: str,
    *,
    command_id: uuid.UUID | None,
    since: datetime,
) -> Rejection | None:
    """The first rejection of `command_id`, or without one the first rejection since `since`."""
    row = conn.execute(
        "SELECT command_id, command_type, reason, occurred_at FROM command_rejections"
        " WHERE tenant_id = %s AND campaign_id = %s"
        " AND (command_id = %s OR (%s::uuid IS NULL AND occurred_at >= %s))"
        " ORDER BY occurred_at LIMIT 1",
        (tenant_id, campaign_id, command_id, command_id, since),
    ).fetchone()
    return Rejection(*row) if row else None


def _rate(done: int, seconds: float) -> str:
    return f"{done / seconds:,.0f}/s" if seconds > 0 else "-"


def _bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
    )


def watch_campaign(
    settings: Settings,
    campaign_id: str,
    tenant_id: str,
    *,
    timeout: float | None,
    console: Console,
    command_id: uuid.UUID | None = None,
) -> CampaignProgress:
    """Show a progress bar (sent + failed of total, rate, elapsed) until the campaign finishes.

    Returns the final progress. Raises CommandWasRejected or ScheduleWasMissed (after
    printing the reason in red), TimeoutError after `timeout` seconds, psycopg.Error when the
    database is unreachable. A schedule missed before the watch began does not stop the watch
    of a command (a ForceScheduledSend sends such a campaign); without one it does.
    """
    started = time.monotonic()
    since = datetime.now(UTC) - REJECTION_SKEW
    deadline = None if timeout is None else started + timeout
    with psycopg.connect(settings.database_url, autocommit=True) as conn, _bar(console) as bar:
        task = bar.add_task(f"waiting for {campaign_id}", total=None, rate="")
        while True:
            rejection = find_rejection(conn, tenant_id, campaign_id, command_id=command_id, since=since)
            if rejection is not None:
                bar.stop()
                raise _rejected(console, campaign_id, rejection)
            schedule = campaign_schedules(conn, tenant_id, [campaign_id]).get(campaign_id)
            if (schedule is not None and schedule.state == "missed"
                    and (command_id is None or (schedule.missed_at or since) >= since)):
                bar.stop()
                raise _missed(console, schedule)
            progress = campaign_progress(conn, campaign_id, tenant_id)
            if progress is not None:
                done = progress.sent + progress.failed
                bar.update(
                    task,
                    description=f"{campaign_id} {progress.status}",
                    completed=done,
                    total=progress.total,
                    rate=_rate(done, time.monotonic() - started),
                )
                if progress.status in FINISHED:
                    return progress
            if deadline is not None and time.monotonic() >= deadline:
                status = f"still {progress.status}" if progress else "not projected yet"
                raise TimeoutError(f"campaign {campaign_id}: {status} after {timeout:g} s")
            time.sleep(POLL_SECONDS)


def await_schedule(
    settings: Settings,
    campaign_id: str,
    tenant_id: str,
    *,
    command_id: uuid.UUID,
    timeout: float,
    console: Console,
) -> CampaignSchedule:
    """Follow a ScheduleCampaign: returns the schedule once it is recorded and, if its time
    has come already, once it fired. Raises CommandWasRejected, ScheduleWasMissed (both after
    printing the reason in red) or TimeoutError."""
    since = datetime.now(UTC) - REJECTION_SKEW
    deadline = time.monotonic() + timeout
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        while True:
            rejection = find_rejection(conn, tenant_id, campaign_id, command_id=command_id, since=since)
            if rejection is not None:
                raise _rejected(console, campaign_id, rejection)
            # This command's schedule, not an earlier one: the command caused CampaignScheduled.
            recorded = any(e.type == "CampaignScheduled" and e.caused_by is None
                           for e in caused_events(conn, tenant_id, str(command_id)))
            schedule = campaign_schedules(conn, tenant_id, [campaign_id]).get(campaign_id)
            if recorded and schedule is not None:
                if schedule.state == "missed":
                    raise _missed(console, schedule)
                if schedule.state != "scheduled" or schedule.send_at > datetime.now(UTC):
                    return schedule
            if time.monotonic() >= deadline:
                state = "not recorded" if not recorded or schedule is None else "due, not fired yet"
                raise TimeoutError(f"schedule of {campaign_id}: {state} after {timeout:g} s"
                                   " (are the command handler and the projector running?)")
            time.sleep(POLL_SECONDS)


def await_outcome(
    settings: Settings,
    campaign_id: str,
    tenant_id: str,
    *,
    command_id: uuid.UUID,
    event_type: str,
    timeout: float,
    console: Console,
) -> None:
    """Wait until the command handler answered `command_id` with `event_type` and the
    projector recorded it. Raises CommandWasRejected (after printing the reason in red) or
    TimeoutError."""
    since = datetime.now(UTC) - REJECTION_SKEW
    deadline = time.monotonic() + timeout
    with psycopg.connect(settings.database_url, autocommit=True, connect_timeout=10) as conn:
        while True:
            rejection = find_rejection(conn, tenant_id, campaign_id, command_id=command_id, since=since)
            if rejection is not None:
                raise _rejected(console, campaign_id, rejection)
            if any(e.type == event_type for e in caused_events(conn, tenant_id, str(command_id))):
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{campaign_id}: no answer to command {command_id} after"
                                   f" {timeout:g} s (are the command handler and the projector"
                                   " running?)")
            time.sleep(POLL_SECONDS)


def elapsed_seconds(progress: CampaignProgress, watched_seconds: float) -> float:
    """Sending time by the read model's clock when known, else how long we watched."""
    if progress.started_at is not None and progress.completed_at is not None:
        return max((progress.completed_at - progress.started_at).total_seconds(), 0.0)
    return watched_seconds


def render_summary(progress: CampaignProgress, seconds: float) -> Table:
    """The end-of-send summary: total, sent, failed, elapsed, rate."""
    table = Table(title=f"Campaign {progress.campaign_id} {progress.status}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", justify="right")
    done = progress.sent + progress.failed
    table.add_row("total", _count(progress.total))
    table.add_row("sent", f"{progress.sent:,}")
    table.add_row("failed", f"{progress.failed:,}")
    table.add_row("elapsed", f"{seconds:.1f} s")
    table.add_row("rate", _rate(done, seconds))
    return table


def render_campaign(progress: CampaignProgress, schedule: CampaignSchedule | None = None) -> Group:
    """The read model of one campaign, field by field, with its schedule if it was scheduled;
    then the hand-picked ids that named no contact of the tenant, one per line (whole, to be
    copied, whatever the terminal width)."""
    table = Table(title=f"Campaign {progress.campaign_id}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("tenant", progress.tenant_id)
    table.add_row("name", progress.name or "-")
    table.add_row("status", progress.status)
    table.add_row("total", _count(progress.total))
    table.add_row("queued", f"{progress.queued:,}")
    table.add_row("sent", f"{progress.sent:,}")
    table.add_row("failed", f"{progress.failed:,}")
    table.add_row("pending", _count(progress.pending))
    table.add_row("started", _moment(progress.started_at))
    table.add_row("completed", _moment(progress.completed_at))
    if schedule is not None:
        table.add_row("scheduled for", _moment(schedule.send_at))
        table.add_row("schedule", schedule.state)
        if schedule.missed_at is not None:
            table.add_row("missed at", _moment(schedule.missed_at))
            table.add_row("missed because", schedule.reason or "-")
        if schedule.state == "missed":
            table.add_row("to send it", f"campaignctl campaign force-send {schedule.campaign_id}")
    table.add_row("unknown contacts", _count(progress.unknown_contact_count))
    ids, count = progress.unknown_contact_ids or [], progress.unknown_contact_count or 0
    if not ids:
        return Group(table)
    more = count - len(ids)
    lines = [f"unknown contact ids (no contact of tenant {progress.tenant_id}):",
             *(f"  {contact_id}" for contact_id in ids)]
    if more > 0:
        lines.append(f"  and {more:,} more")
    return Group(table, Text("\n".join(lines)))


def _count(value: int | None) -> str:
    return "unknown (not hydrated yet)" if value is None else f"{value:,}"


def _moment(value: datetime | None) -> str:
    return "-" if value is None else value.isoformat(timespec="seconds")
