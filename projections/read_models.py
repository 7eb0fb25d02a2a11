"""Read models: which row changes a batch of decoded events makes, and the batched SQL for them.

Guarantee, for a batch applied inside one transaction: every counter on `campaigns` moves by
exactly the number of real transitions, whatever duplicates or cross-topic reordering this and
earlier batches hold. A recipient row is created at most once (by its RecipientQueued or by a
delivery that overtook it) and leaves 'queued' at most once; a campaign's status depends on the
set of facts seen, not on the order the topics were read in (a cancel always wins; 'completed'
once hydrated and every recipient is sent or failed). The first tenant to name a campaign id
owns it: facts naming the same campaign under another tenant are dropped, never merged.

`plan` is pure (no I/O); `apply` runs one multi-row statement per kind of change.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import psycopg

from schemas.base import Record
from schemas.envelope import Message
from schemas.events import (
    CampaignCancelled,
    CampaignCreated,
    CampaignHydrated,
    CampaignSendRequested,
    CommandRejected,
    EmailFailed,
    EmailSent,
    RecipientQueued,
)

TerminalStatus = Literal["sent", "failed"]

# Column limits: an absurd value must be stored clamped, not fail the batch, because a batch
# that cannot commit blocks its partitions forever.
_BIGINT_MAX = 2**63 - 1
_INT_MAX = 2**31 - 1


def _text(value: str) -> str:
    """PostgreSQL text cannot hold NUL; a NUL in a name or reason must not poison a batch."""
    return value.replace("\x00", "\ufffd")


def _optional_text(value: str | None) -> str | None:
    return None if value is None else _text(value)


@dataclass(frozen=True, slots=True)
class CampaignCreatedRow:
    tenant_id: str
    campaign_id: str
    name: str
    subject: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class CampaignStartedRow:
    tenant_id: str
    campaign_id: str
    started_at: datetime


@dataclass(frozen=True, slots=True)
class CampaignHydratedRow:
    tenant_id: str
    campaign_id: str
    total: int
    hydrated_at: datetime


@dataclass(frozen=True, slots=True)
class CampaignCancelledRow:
    tenant_id: str
    campaign_id: str
    cancelled_at: datetime


@dataclass(frozen=True, slots=True)
class RejectionRow:
    event_id: uuid.UUID
    tenant_id: str
    campaign_id: str
    command_id: uuid.UUID | None
    command_type: str | None
    reason: str
    occurred_at: datetime
    correlation_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class RecipientRow:
    """A recipient known to be queued: from its RecipientQueued, or implied by a delivery."""

    tenant_id: str
    campaign_id: str
    contact_id: str
    email: str


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    """A recipient's first terminal outcome in the batch."""

    tenant_id: str
    campaign_id: str
    contact_id: str
    status: TerminalStatus
    attempts: int
    last_error: str | None
    occurred_at: datetime


@dataclass(frozen=True, slots=True)
class DroppedFact:
    """A valid event the read models refuse, with the reason (for the log)."""

    event_id: uuid.UUID
    type: str
    reason: str


RecipientKey = tuple[str, str]  # (campaign_id, contact_id): the recipient's primary key


@dataclass
class BatchChanges:
    """Row changes of one batch, deduplicated so no statement touches a row twice."""

    created: dict[str, CampaignCreatedRow] = field(default_factory=dict)
    started: dict[str, CampaignStartedRow] = field(default_factory=dict)
    hydrated: dict[str, CampaignHydratedRow] = field(default_factory=dict)
    cancelled: dict[str, CampaignCancelledRow] = field(default_factory=dict)
    rejections: dict[uuid.UUID, RejectionRow] = field(default_factory=dict)
    recipients: dict[RecipientKey, RecipientRow] = field(default_factory=dict)
    deliveries: dict[RecipientKey, DeliveryRow] = field(default_factory=dict)
    dropped: list[DroppedFact] = field(default_factory=list)
    ignored: int = 0
    # campaign id -> tenant that named it first in this batch.
    owners: dict[str, str] = field(default_factory=dict)

    def campaign_ids(self) -> list[str]:
        """Every campaign the batch may have moved, sorted (a stable lock order)."""
        return sorted(self.owners)

    def is_empty(self) -> bool:
        return not (
            self.created or self.started or self.hydrated or self.cancelled
            or self.rejections or self.recipients or self.deliveries
        )


def plan(messages: Iterable[Message[Record]]) -> BatchChanges:
    """Map decoded events, in consumption order, to deduplicated row changes.

    Within a batch the first occurrence of a fact wins (a later duplicate is a no-op, exactly
    as it would be in a later batch). Valid events of other types are counted as ignored.
    """
    changes = BatchChanges()
    for message in messages:
        _plan_one(changes, message)
    return changes


def _plan_one(changes: BatchChanges, message: Message[Record]) -> None:
    env, payload = message.envelope, message.payload
    tenant = env.tenant_id
    if isinstance(payload, CommandRejected):
        # A rejection changes no campaign (it may even name another tenant's campaign id:
        # that is often why it was rejected), so ownership does not apply to it.
        changes.rejections.setdefault(
            env.id,
            RejectionRow(
                event_id=env.id,
                tenant_id=tenant,
                campaign_id=env.aggregate_id,
                command_id=payload.command_id,
                command_type=_optional_text(payload.command_type),
                reason=_text(payload.reason),
                occurred_at=env.occurred_at,
                correlation_id=env.correlation_id,
            ),
        )
        return
    if isinstance(payload, RecipientQueued | EmailSent | EmailFailed):
        campaign_id = payload.campaign_id
    elif isinstance(
        payload, CampaignCreated | CampaignSendRequested | CampaignHydrated | CampaignCancelled
    ):
        campaign_id = env.aggregate_id
    else:
        changes.ignored += 1
        return
    owner = changes.owners.setdefault(campaign_id, tenant)
    if owner != tenant:
        changes.dropped.append(
            DroppedFact(env.id, env.type, f"campaign {campaign_id} belongs to another tenant")
        )
        return

    at = env.occurred_at
    if isinstance(payload, CampaignCreated):
        changes.created.setdefault(
            campaign_id,
            CampaignCreatedRow(
                tenant, campaign_id, _text(payload.name), _text(payload.template.subject), at
            ),
        )
    elif isinstance(payload, CampaignSendRequested):
        changes.started.setdefault(campaign_id, CampaignStartedRow(tenant, campaign_id, at))
    elif isinstance(payload, CampaignHydrated):
        changes.hydrated.setdefault(
            campaign_id,
            CampaignHydratedRow(tenant, campaign_id, min(payload.total, _BIGINT_MAX), at),
        )
    elif isinstance(payload, CampaignCancelled):
        changes.cancelled.setdefault(campaign_id, CampaignCancelledRow(tenant, campaign_id, at))
    elif isinstance(payload, RecipientQueued):
        key = (campaign_id, payload.contact_id)
        changes.recipients.setdefault(
            key, RecipientRow(tenant, campaign_id, payload.contact_id, payload.email)
        )
    elif isinstance(payload, EmailSent | EmailFailed):
        key = (campaign_id, payload.contact_id)
        # A delivery proves the recipient was queued, even if its RecipientQueued (another
        # topic) has not been read yet.
        changes.recipients.setdefault(
            key, RecipientRow(tenant, campaign_id, payload.contact_id, payload.email)
        )
        if isinstance(payload, EmailSent):
            status: TerminalStatus = "sent"
            error = None
        else:
            status = "failed"
            error = _text(payload.reason)
        changes.deliveries.setdefault(
            key,
            DeliveryRow(
                tenant, campaign_id, payload.contact_id, status,
                min(payload.attempt, _INT_MAX), error, at,
            ),
        )


# --- SQL ---------------------------------------------------------------------------------
# Every statement takes whole columns as arrays (unnest), so a batch costs a fixed number of
# round trips whatever its size. Rows are inserted in campaign-id order so two projector
# transactions touching the same campaigns take row locks in the same order.

_CREATED = """
INSERT INTO campaigns AS c (tenant_id, campaign_id, name, subject, created_at)
SELECT u.tenant_id, u.campaign_id, u.name, u.subject, u.created_at
FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::timestamptz[])
     AS u(tenant_id, campaign_id, name, subject, created_at)
ORDER BY u.campaign_id
ON CONFLICT (campaign_id) DO UPDATE
SET name = COALESCE(c.name, EXCLUDED.name),
    subject = COALESCE(c.subject, EXCLUDED.subject),
    created_at = COALESCE(c.created_at, EXCLUDED.created_at),
    updated_at = now()
WHERE c.tenant_id = EXCLUDED.tenant_id
"""

_STARTED = """
INSERT INTO campaigns AS c (tenant_id, campaign_id, status, started_at)
SELECT u.tenant_id, u.campaign_id, 'sending', u.started_at
FROM unnest(%s::text[], %s::text[], %s::timestamptz[]) AS u(tenant_id, campaign_id, started_at)
ORDER BY u.campaign_id
ON CONFLICT (campaign_id) DO UPDATE
SET status = CASE WHEN c.status = 'draft' THEN 'sending' ELSE c.status END,
    started_at = COALESCE(c.started_at, EXCLUDED.started_at),
    updated_at = now()
WHERE c.tenant_id = EXCLUDED.tenant_id
"""

# Hydration implies a send was requested, so it also moves a draft to 'sending'.
_HYDRATED = """
INSERT INTO campaigns AS c (tenant_id, campaign_id, status, total, hydrated_at)
SELECT u.tenant_id, u.campaign_id, 'sending', u.total, u.hydrated_at
FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::timestamptz[])
     AS u(tenant_id, campaign_id, total, hydrated_at)
ORDER BY u.campaign_id
ON CONFLICT (campaign_id) DO UPDATE
SET status = CASE WHEN c.status = 'draft' THEN 'sending' ELSE c.status END,
    total = COALESCE(c.total, EXCLUDED.total),
    hydrated_at = COALESCE(c.hydrated_at, EXCLUDED.hydrated_at),
    updated_at = now()
WHERE c.tenant_id = EXCLUDED.tenant_id
"""

# A cancel wins over 'completed' too: the event log says the campaign was cancelled, and the
# projection must not depend on whether the last delivery was read before the cancel.
_CANCELLED = """
INSERT INTO campaigns AS c (tenant_id, campaign_id, status, completed_at)
SELECT u.tenant_id, u.campaign_id, 'cancelled', u.cancelled_at
FROM unnest(%s::text[], %s::text[], %s::timestamptz[]) AS u(tenant_id, campaign_id, cancelled_at)
ORDER BY u.campaign_id
ON CONFLICT (campaign_id) DO UPDATE
SET status = 'cancelled',
    completed_at = CASE WHEN c.status = 'cancelled' THEN c.completed_at
                        ELSE EXCLUDED.completed_at END,
    updated_at = now()
WHERE c.tenant_id = EXCLUDED.tenant_id
"""

_REJECTIONS = """
INSERT INTO command_rejections
    (event_id, tenant_id, campaign_id, command_id, command_type, reason, occurred_at,
     correlation_id)
SELECT * FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::uuid[], %s::text[], %s::text[],
                     %s::timestamptz[], %s::uuid[])
ON CONFLICT (event_id) DO NOTHING
"""

# Rows that are really new (ON CONFLICT DO NOTHING returns only those) raise `queued`.
# Recipients naming a campaign another tenant owns are not inserted.
_RECIPIENTS = """
WITH fresh AS (
    INSERT INTO campaign_recipients AS r (tenant_id, campaign_id, contact_id, email, status)
    SELECT u.tenant_id, u.campaign_id, u.contact_id, u.email, 'queued'
    FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[])
         AS u(tenant_id, campaign_id, contact_id, email)
    WHERE NOT EXISTS (SELECT 1 FROM campaigns o
                      WHERE o.campaign_id = u.campaign_id AND o.tenant_id <> u.tenant_id)
    ORDER BY u.campaign_id, u.contact_id
    ON CONFLICT (campaign_id, contact_id) DO NOTHING
    RETURNING r.tenant_id, r.campaign_id
), per_campaign AS (
    SELECT tenant_id, campaign_id, count(*) AS queued FROM fresh GROUP BY tenant_id, campaign_id
)
INSERT INTO campaigns AS c (tenant_id, campaign_id, queued)
SELECT tenant_id, campaign_id, queued FROM per_campaign ORDER BY campaign_id
ON CONFLICT (campaign_id) DO UPDATE
SET queued = c.queued + EXCLUDED.queued, updated_at = now()
WHERE c.tenant_id = EXCLUDED.tenant_id
"""

# Only a row still 'queued' moves, so a duplicate delivery (in this batch or any later one)
# changes nothing; the rows that did move are exactly what the counters add.
_DELIVERIES = """
WITH moved AS (
    UPDATE campaign_recipients AS r
    SET status = u.status, attempts = u.attempts, last_error = u.last_error, updated_at = now()
    FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::int[], %s::text[],
                %s::timestamptz[])
         AS u(tenant_id, campaign_id, contact_id, status, attempts, last_error, occurred_at)
    WHERE r.campaign_id = u.campaign_id AND r.contact_id = u.contact_id
      AND r.tenant_id = u.tenant_id AND r.status = 'queued'
    RETURNING r.tenant_id, r.campaign_id, u.status, u.occurred_at
), per_campaign AS (
    SELECT tenant_id, campaign_id,
           count(*) FILTER (WHERE status = 'sent') AS sent,
           count(*) FILTER (WHERE status = 'failed') AS failed,
           max(occurred_at) AS last_delivery_at
    FROM moved GROUP BY tenant_id, campaign_id
)
INSERT INTO campaigns AS c (tenant_id, campaign_id, sent, failed, last_delivery_at)
SELECT tenant_id, campaign_id, sent, failed, last_delivery_at FROM per_campaign
ORDER BY campaign_id
ON CONFLICT (campaign_id) DO UPDATE
SET sent = c.sent + EXCLUDED.sent,
    failed = c.failed + EXCLUDED.failed,
    last_delivery_at = GREATEST(c.last_delivery_at, EXCLUDED.last_delivery_at),
    updated_at = now()
WHERE c.tenant_id = EXCLUDED.tenant_id
"""

# completed_at comes from event times only (GREATEST skips NULLs: total 0 completes at
# hydration), so replaying the topics in another interleaving gives the same row.
_COMPLETION = """
UPDATE campaigns
SET status = 'completed',
    completed_at = GREATEST(hydrated_at, last_delivery_at),
    updated_at = now()
WHERE campaign_id = ANY(%s::text[])
  AND status = 'sending' AND total IS NOT NULL AND sent + failed >= total
RETURNING tenant_id, campaign_id
"""


def _columns(rows: Iterable[Any], *names: str) -> list[list[Any]]:
    materialised = list(rows)
    return [[getattr(row, name) for row in materialised] for name in names]


def apply(conn: psycopg.Connection[Any], changes: BatchChanges) -> list[tuple[str, str]]:
    """Apply a planned batch inside the caller's transaction.

    Returns the (tenant_id, campaign_id) of campaigns this batch completed.
    """
    if changes.is_empty():
        return []
    with conn.cursor() as cur:
        # Campaign facts first, so recipient counters land on rows that carry their status.
        if changes.created:
            cur.execute(_CREATED, _columns(
                changes.created.values(),
                "tenant_id", "campaign_id", "name", "subject", "created_at",
            ))
        if changes.started:
            cur.execute(_STARTED, _columns(
                changes.started.values(), "tenant_id", "campaign_id", "started_at"
            ))
        if changes.hydrated:
            cur.execute(_HYDRATED, _columns(
                changes.hydrated.values(), "tenant_id", "campaign_id", "total", "hydrated_at"
            ))
        if changes.cancelled:
            cur.execute(_CANCELLED, _columns(
                changes.cancelled.values(), "tenant_id", "campaign_id", "cancelled_at"
            ))
        if changes.rejections:
            cur.execute(_REJECTIONS, _columns(
                changes.rejections.values(),
                "event_id", "tenant_id", "campaign_id", "command_id", "command_type", "reason",
                "occurred_at", "correlation_id",
            ))
        # Recipients before deliveries: a delivery that overtook its RecipientQueued first
        # gets its 'queued' row here, then moves it below, in the same transaction.
        if changes.recipients:
            cur.execute(_RECIPIENTS, _columns(
                changes.recipients.values(), "tenant_id", "campaign_id", "contact_id", "email"
            ))
        if changes.deliveries:
            cur.execute(_DELIVERIES, _columns(
                changes.deliveries.values(),
                "tenant_id", "campaign_id", "contact_id", "status", "attempts", "last_error",
                "occurred_at",
            ))
        cur.execute(_COMPLETION, (changes.campaign_ids(),))
        return [(row[0], row[1]) for row in cur.fetchall()]
