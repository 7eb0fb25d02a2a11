"""Read functions over the projector's read models, for the CLI and the read API.

Guarantee: read-only, and each function reads one consistent snapshot (a single statement), so
the counters of a campaign always add up as they stood after some committed batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

RECIPIENT_STATUSES = ("excluded", "queued", "retrying", "sent", "failed", "skipped")


@dataclass(frozen=True, slots=True)
class CampaignProgress:
    """A campaign's live progress; `total` and `pending` are None until it is hydrated.

    `total` counts the queued audience; `excluded` recipients are outside it. `pending` is
    what is not terminal yet (neither sent, failed nor skipped); `retrying` is the part of it
    waiting for a retry; `ambiguous` counts possible duplicate mailings.
    """

    tenant_id: str
    campaign_id: str
    name: str | None
    status: str
    total: int | None
    queued: int
    sent: int
    failed: int
    pending: int | None
    started_at: datetime | None
    completed_at: datetime | None
    skipped: int = 0
    excluded: int = 0
    retrying: int = 0
    ambiguous: int = 0
    paused_at: datetime | None = None
    resumed_at: datetime | None = None
    pause_reason: str | None = None
    paused_automatically: bool | None = None
    cancelled_at: datetime | None = None
    # Hand-picked ids that named no contact of the tenant: the first of them (sorted) and how
    # many; None until hydrated.
    unknown_contact_ids: list[str] | None = None
    unknown_contact_count: int | None = None


_PROGRESS_COLUMNS = (
    "tenant_id, campaign_id, name, status, total, queued, sent, failed, pending, started_at,"
    " completed_at, skipped, excluded, retrying, ambiguous, paused_at, resumed_at,"
    " pause_reason, paused_automatically, cancelled_at, unknown_contact_ids, unknown_contact_count"
)


def campaign_progress(
    conn: psycopg.Connection[Any], campaign_id: str, tenant_id: str | None = None
) -> CampaignProgress | None:
    """One campaign, or None if unknown (or owned by another tenant when one is given)."""
    row = conn.execute(
        f"SELECT {_PROGRESS_COLUMNS} FROM campaign_progress"
        " WHERE campaign_id = %s AND (%s::text IS NULL OR tenant_id = %s)",
        (campaign_id, tenant_id, tenant_id),
    ).fetchone()
    return CampaignProgress(*row) if row else None


def list_campaigns(conn: psycopg.Connection[Any], tenant_id: str) -> list[CampaignProgress]:
    """A tenant's campaigns, newest first."""
    rows = conn.execute(
        f"SELECT {_PROGRESS_COLUMNS} FROM campaign_progress WHERE tenant_id = %s"
        " ORDER BY created_at DESC NULLS LAST, campaign_id",
        (tenant_id,),
    ).fetchall()
    return [CampaignProgress(*row) for row in rows]


def recipient_status_counts(conn: psycopg.Connection[Any], campaign_id: str) -> dict[str, int]:
    """Recipients per status: 'queued', 'sent' and 'failed' always (zero when none), the
    other RECIPIENT_STATUSES ('excluded', 'retrying', 'skipped') only when some are."""
    counts = dict.fromkeys(("queued", "sent", "failed"), 0)
    rows = conn.execute(
        "SELECT status, count(*) FROM campaign_recipients WHERE campaign_id = %s GROUP BY status",
        (campaign_id,),
    ).fetchall()
    for status, count in rows:
        counts[status] = count
    return counts
