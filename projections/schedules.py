"""Scheduled sends as the read models show them, for the read API and the CLI.

A campaign's schedule is when it was to be sent (CampaignScheduled.send_at), what became of it
and, when it did not fire, why (CampaignScheduleMissed.reason: found too late, a segment
gone). A command's outcome is the events it caused; for a ScheduleCampaign those include what
its schedule caused later, by the clock (CampaignSendRequested or CampaignScheduleMissed,
whose causation is the CampaignScheduled event).

Guarantee: read-only, and tenant-scoped (every function filters by the tenant it is given).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import psycopg

# scheduled: waiting for send_at. missed: found too late (or its audience no longer valid)
# and not sent; ForceScheduledSend sends it, a cancel drops it. fired: the send started (by
# the clock, or forced; a forced miss keeps its missed_at and reason). cancelled: cancelled
# before it fired.
ScheduleState = Literal["scheduled", "missed", "fired", "cancelled"]


@dataclass(frozen=True, slots=True)
class CampaignSchedule:
    campaign_id: str
    send_at: datetime
    state: ScheduleState
    missed_at: datetime | None
    reason: str | None  # why it was missed


def schedule_state(
    *, missed_at: datetime | None, started_at: datetime | None, cancelled_at: datetime | None
) -> ScheduleState:
    """What became of a schedule, from the facts on its campaign's row: a send that started
    wins (it happened, whatever came after), then a cancel, then a miss."""
    if started_at is not None:
        return "fired"
    if cancelled_at is not None:
        return "cancelled"
    if missed_at is not None:
        return "missed"
    return "scheduled"


def campaign_schedules(
    conn: psycopg.Connection[Any], tenant_id: str, campaign_ids: Iterable[str]
) -> dict[str, CampaignSchedule]:
    """The schedules of those of the tenant's campaigns that were scheduled, by campaign id."""
    rows = conn.execute(
        "SELECT campaign_id, scheduled_for, schedule_missed_at, schedule_missed_reason,"
        " started_at, cancelled_at FROM campaign_progress"
        " WHERE tenant_id = %s AND campaign_id = ANY(%s) AND scheduled_for IS NOT NULL",
        (tenant_id, list(campaign_ids)),
    ).fetchall()
    return {
        campaign_id: CampaignSchedule(
            campaign_id=campaign_id, send_at=send_at, missed_at=missed_at, reason=reason,
            state=schedule_state(missed_at=missed_at, started_at=started_at,
                                 cancelled_at=cancelled_at),
        )
        for campaign_id, send_at, missed_at, reason, started_at, cancelled_at in rows
    }


@dataclass(frozen=True, slots=True)
class CausedEvent:
    """An event on campaign.events a command caused; `caused_by` is set for what the command's
    schedule caused later (the CampaignScheduled event's id)."""

    event_id: str
    type: str
    occurred_at: datetime
    aggregate_id: str
    caused_by: str | None = None


def caused_events(conn: psycopg.Connection[Any], tenant_id: str, command_id: str) -> list[CausedEvent]:
    """The events a command caused, and those its schedule caused, in event-time order."""
    rows = conn.execute(
        "SELECT event_id::text, event_type, occurred_at, aggregate_id, NULL::text FROM command_outcomes"
        " WHERE tenant_id = %(tenant)s AND causation_id = %(command)s::uuid"
        " UNION ALL"
        " SELECT f.event_id::text, f.event_type, f.occurred_at, f.aggregate_id, s.event_id::text"
        " FROM command_outcomes s JOIN command_outcomes f"
        "   ON f.causation_id = s.event_id AND f.tenant_id = s.tenant_id"
        " WHERE s.tenant_id = %(tenant)s AND s.causation_id = %(command)s::uuid"
        "   AND s.event_type = 'CampaignScheduled'"
        " ORDER BY 3, 1",
        {"tenant": tenant_id, "command": command_id},
    ).fetchall()
    return [CausedEvent(*row) for row in rows]


def command_outcome(
    conn: psycopg.Connection[Any], tenant_id: str, command_id: str
) -> tuple[list[CausedEvent], str | None]:
    """The events a command caused on campaign.events (with those its schedule caused later),
    and its rejection reason (if any)."""
    events = caused_events(conn, tenant_id, command_id)
    row = conn.execute(
        "SELECT reason FROM command_rejections WHERE tenant_id = %s AND command_id = %s"
        " ORDER BY occurred_at LIMIT 1", (tenant_id, command_id)).fetchone()
    return events, (row[0] if row else None)
