"""The read API's SQL: tenant-scoped snapshots, rates, recipients and rejections.

Every function takes the tenant explicitly and filters by it, also where row-level security
(`app.tenant_id`, set by `tenant_snapshot`) would filter already: defence in depth while the API
still connects with a role that bypasses RLS.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from projections.queries import (
    _PROGRESS_COLUMNS,
    CampaignProgress,
    campaign_progress,
    list_campaigns,
)
from projections.schedules import CampaignSchedule, campaign_schedules

# Rate "over the last minute": recipients that reached a terminal status (sent, failed,
# skipped) within this window, by event time (campaign_throughput's per-second buckets).
RATE_WINDOW = timedelta(minutes=1)
TERMINAL_CAMPAIGN_STATUSES = ("completed", "cancelled")


@contextmanager
def tenant_snapshot(
    pool: ConnectionPool[psycopg.Connection[Any]], tenant_id: str
) -> Iterator[psycopg.Connection[Any]]:
    """A read-only REPEATABLE READ transaction with `app.tenant_id` set for row-level security."""
    with pool.connection() as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        conn.execute("SELECT set_config('app.tenant_id', %s, true)", (tenant_id,))
        yield conn


@dataclass(frozen=True, slots=True)
class CampaignView:
    """Progress plus the figures derived from it at the snapshot's time `as_of`."""

    progress: CampaignProgress
    as_of: datetime
    settled_last_minute: int
    schedule: CampaignSchedule | None = None  # None: never scheduled

    @property
    def settled(self) -> int:
        return self.progress.sent + self.progress.failed + self.progress.skipped

    @property
    def percent(self) -> float | None:
        total = self.progress.total
        if total is None:
            return None
        return 100.0 if total == 0 else round(min(self.settled / total, 1.0) * 100, 2)

    @property
    def rate_last_minute(self) -> float | None:
        """Recipients settled per second over the last minute (or since the start, if later)."""
        started = self.progress.started_at
        if started is None:
            return None
        window = min(RATE_WINDOW, self.as_of - started).total_seconds()
        return round(self.settled_last_minute / max(window, 1.0), 2)

    @property
    def average_rate(self) -> float | None:
        """Recipients settled per second from the start to completion (or now)."""
        started = self.progress.started_at
        if started is None:
            return None
        elapsed = ((self.progress.completed_at or self.as_of) - started).total_seconds()
        return round(self.settled / elapsed, 2) if elapsed > 0 else None

    @property
    def eta_seconds(self) -> float | None:
        """Seconds until every recipient settles, at the last minute's rate (else the average);
        None while paused (nothing moves until it is resumed)."""
        if self.progress.pending == 0:
            return 0.0
        if (self.progress.pending is None or self.progress.status in TERMINAL_CAMPAIGN_STATUSES
                or self.progress.status == "paused"):
            return None
        rate = self.rate_last_minute or self.average_rate
        return round(self.progress.pending / rate, 1) if rate else None

    @property
    def eta_at(self) -> datetime | None:
        eta = self.eta_seconds
        return None if eta is None else self.as_of + timedelta(seconds=eta)


def snapshot_time(conn: psycopg.Connection[Any]) -> datetime:
    """The transaction's time: what `as_of` and relative segment dates are read against."""
    row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    value: datetime = row[0]
    return value


_now = snapshot_time


def _settled_since(
    conn: psycopg.Connection[Any], tenant_id: str, campaign_ids: list[str]
) -> dict[str, int]:
    if not campaign_ids:
        return {}
    # Buckets are whole seconds: the window is the last 60 complete-or-current seconds.
    rows = conn.execute(
        "SELECT campaign_id, sum(settled) FROM campaign_throughput"
        " WHERE tenant_id = %s AND campaign_id = ANY(%s)"
        " AND second > date_trunc('second', now()) - %s::interval GROUP BY campaign_id",
        (tenant_id, campaign_ids, RATE_WINDOW),
    ).fetchall()
    return {campaign_id: int(count) for campaign_id, count in rows}


def _recently_active(progress: CampaignProgress, as_of: datetime) -> bool:
    if progress.status in ("sending", "paused"):
        return True
    return progress.completed_at is not None and as_of - progress.completed_at < RATE_WINDOW


def tenant_campaigns(conn: psycopg.Connection[Any], tenant_id: str) -> list[CampaignView]:
    """Every campaign of the tenant, newest first, with rates and ETA."""
    return _views(conn, tenant_id, list_campaigns(conn, tenant_id))


def _views(conn: psycopg.Connection[Any], tenant_id: str,
           campaigns: list[CampaignProgress]) -> list[CampaignView]:
    as_of = _now(conn)
    active = [p.campaign_id for p in campaigns if _recently_active(p, as_of)]
    recent = _settled_since(conn, tenant_id, active)
    schedules = campaign_schedules(conn, tenant_id, [p.campaign_id for p in campaigns])
    return [CampaignView(p, as_of, recent.get(p.campaign_id, 0), schedules.get(p.campaign_id))
            for p in campaigns]


def tenant_campaign(conn: psycopg.Connection[Any], tenant_id: str, campaign_id: str) -> CampaignView | None:
    """One campaign of the tenant, or None if unknown or another tenant's."""
    progress = campaign_progress(conn, campaign_id, tenant_id)
    if progress is None:
        return None
    as_of = _now(conn)
    recent = _settled_since(conn, tenant_id, [campaign_id]) if _recently_active(progress, as_of) else {}
    schedule = campaign_schedules(conn, tenant_id, [campaign_id]).get(campaign_id)
    return CampaignView(progress, as_of, recent.get(campaign_id, 0), schedule)


@dataclass(frozen=True, slots=True)
class RecipientRow:
    contact_id: str
    email: str
    status: str
    attempts: int
    last_error: str | None
    updated_at: datetime
    ambiguous: int
    smtp_code: int | None
    reason: str | None
    last_event_at: datetime | None


_RECIPIENT_COLUMNS = (
    "contact_id, email, status, attempts, last_error, updated_at, ambiguous, smtp_code, reason,"
    " last_event_at"
)


def recipients_page(
    conn: psycopg.Connection[Any],
    tenant_id: str,
    campaign_id: str,
    *,
    status: str | None,
    after: str | None,
    limit: int,
) -> tuple[list[RecipientRow], bool]:
    """Up to `limit` recipients ordered by contact_id after `after`, and whether more follow."""
    rows = conn.execute(
        f"SELECT {_RECIPIENT_COLUMNS} FROM campaign_recipients"  # noqa: S608
        " WHERE tenant_id = %s AND campaign_id = %s"
        " AND (%s::text IS NULL OR status = %s) AND (%s::text IS NULL OR contact_id > %s)"
        " ORDER BY contact_id LIMIT %s",
        (tenant_id, campaign_id, status, status, after, after, limit + 1),
    ).fetchall()
    return [RecipientRow(*row) for row in rows[:limit]], len(rows) > limit


@dataclass(frozen=True, slots=True)
class RejectionRow:
    event_id: str
    command_id: str | None
    command_type: str | None
    reason: str
    occurred_at: datetime
    correlation_id: str


def rejections(conn: psycopg.Connection[Any], tenant_id: str, campaign_id: str) -> list[RejectionRow]:
    """The tenant's refused commands for a campaign, oldest first."""
    rows = conn.execute(
        "SELECT event_id::text, command_id::text, command_type, reason, occurred_at, correlation_id::text"
        " FROM command_rejections WHERE tenant_id = %s AND campaign_id = %s"
        " ORDER BY occurred_at, event_id",
        (tenant_id, campaign_id),
    ).fetchall()
    return [RejectionRow(*row) for row in rows]


def recipient(
    conn: psycopg.Connection[Any], tenant_id: str, campaign_id: str, contact_id: str
) -> RecipientRow | None:
    row = conn.execute(
        f"SELECT {_RECIPIENT_COLUMNS} FROM campaign_recipients"  # noqa: S608
        " WHERE tenant_id = %s AND campaign_id = %s AND contact_id = %s",
        (tenant_id, campaign_id, contact_id),
    ).fetchone()
    return RecipientRow(*row) if row else None


@dataclass(frozen=True, slots=True)
class AttemptRow:
    attempt: int
    outcome: str  # deferred, sent or failed
    smtp_code: int | None
    detail: str | None
    retry_at: datetime | None
    occurred_at: datetime | None


def attempts(
    conn: psycopg.Connection[Any], tenant_id: str, campaign_id: str, contact_id: str
) -> list[AttemptRow]:
    """A recipient's attempts in order: the deferred ones, then the terminal one."""
    rows = conn.execute(
        "SELECT attempt, outcome, smtp_code, detail, retry_at, occurred_at"
        " FROM analyst_recipient_attempts WHERE tenant_id = %s AND campaign_id = %s"
        " AND contact_id = %s ORDER BY attempt, outcome = 'deferred' DESC, occurred_at",
        (tenant_id, campaign_id, contact_id),
    ).fetchall()
    return [AttemptRow(*row) for row in rows]


@dataclass(frozen=True, slots=True)
class DailySendsRow:
    day: date
    sent: int
    failed: int
    skipped: int


def daily_sends(
    conn: psycopg.Connection[Any], tenant_id: str, since: date | None, until: date | None
) -> list[DailySendsRow]:
    """The tenant's terminal outcomes per UTC day of the event, oldest first."""
    rows = conn.execute(
        "SELECT day, sent, failed, skipped FROM tenant_daily_sends WHERE tenant_id = %s"
        " AND (%s::date IS NULL OR day >= %s) AND (%s::date IS NULL OR day <= %s) ORDER BY day",
        (tenant_id, since, since, until, until),
    ).fetchall()
    return [DailySendsRow(*row) for row in rows]


@dataclass(frozen=True, slots=True)
class ListRow:
    """A list that is not deleted: created (with its name) or implicit (named by memberships
    only: `name` and `created_at` None), with its member counts."""

    list_id: str
    name: str | None
    created_at: datetime | None
    members: int
    mailable: int
    unsubscribed: int
    suppressed: int


def tenant_lists(conn: psycopg.Connection[Any], tenant_id: str,
                 list_id: str | None = None) -> list[ListRow]:
    """The tenant's lists (deleted ones left out), by list id; one when `list_id` is given."""
    rows = conn.execute(
        "SELECT list_id, name, created_at, members, mailable, unsubscribed, suppressed"
        " FROM analyst_lists WHERE tenant_id = %s AND (%s::text IS NULL OR list_id = %s)"
        " ORDER BY list_id",
        (tenant_id, list_id, list_id),
    ).fetchall()
    return [ListRow(*row) for row in rows]


# Where a page of campaigns continues: after this (created_at, campaign_id) in the order
# newest first (created_at NULLS LAST), then campaign id.
PagePosition = tuple[datetime | None, str]


def campaign_page(
    conn: psycopg.Connection[Any], tenant_id: str, *, status: str | None,
    name_contains: str | None, after: PagePosition | None, limit: int,
) -> tuple[list[CampaignView], PagePosition | None]:
    """Up to `limit` of the tenant's campaigns, newest first, of `status` and with a name
    containing `name_contains` (case-insensitive), after `after`; and the position to
    continue from (None on the last page). Keyset paging: a campaign created meanwhile does
    not shift later pages."""
    after_at, after_id = after if after is not None else (None, None)
    rows = conn.execute(
        f"SELECT {_PROGRESS_COLUMNS}, created_at FROM campaign_progress"  # noqa: S608
        " WHERE tenant_id = %(tenant)s AND (%(status)s::text IS NULL OR status = %(status)s)"
        " AND (%(name)s::text IS NULL OR strpos(lower(name), lower(%(name)s)) > 0)"
        " AND (%(after_id)s::text IS NULL"
        "      OR (%(after_at)s::timestamptz IS NULL AND created_at IS NULL"
        "          AND campaign_id > %(after_id)s)"
        "      OR (%(after_at)s::timestamptz IS NOT NULL AND (created_at < %(after_at)s"
        "          OR created_at IS NULL"
        "          OR (created_at = %(after_at)s AND campaign_id > %(after_id)s))))"
        " ORDER BY created_at DESC NULLS LAST, campaign_id LIMIT %(limit)s",
        {"tenant": tenant_id, "status": status, "name": name_contains, "after_at": after_at,
         "after_id": after_id, "limit": limit + 1},
    ).fetchall()
    page = rows[:limit]
    views = _views(conn, tenant_id, [CampaignProgress(*row[:-1]) for row in page])
    more = len(rows) > limit
    return views, ((page[-1][-1], page[-1][1]) if more and page else None)
