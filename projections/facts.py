"""Recipient facts: the one shape every per-recipient event takes inside the projector.

RecipientQueued and RecipientExcluded (campaign.recipients) and EmailSent, EmailFailed,
EmailDeferred and RecipientSkipped (campaign.deliveries) all say "this recipient of this
campaign is now in this status". The projector plans and writes them as `RecipientFact`s, so
the record decoding (projections.recipient_records) can build one without a pydantic model.
Pure.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal, NamedTuple

from schemas.base import Record
from schemas.envelope import Message
from schemas.events import (
    EmailDeferred,
    EmailFailed,
    EmailSent,
    RecipientExcluded,
    RecipientQueued,
    RecipientSkipped,
)

RecipientStatus = Literal["excluded", "queued", "retrying", "sent", "failed", "skipped"]
TERMINAL: frozenset[str] = frozenset({"sent", "failed", "skipped"})
# Statuses only move up this order (terminal ones never move again), whatever order the
# topics are read in: 'excluded' < 'queued' < 'retrying' < terminal.
RANK: dict[str, int] = {
    "excluded": 0, "queued": 1, "retrying": 2, "sent": 3, "failed": 3, "skipped": 3,
}


# A named tuple: immutable, and the record decoding builds one with tuple.__new__ (no Python
# __init__ frame per event).
class RecipientFact(NamedTuple):
    """One event about one recipient, reduced to what the read models keep."""

    event_id: str
    type: str
    tenant_id: str
    campaign_id: str
    contact_id: str
    email: str
    status: RecipientStatus
    attempt: int  # 0 for queued / excluded / skipped
    occurred_at: datetime
    ambiguous: int = 0
    smtp_code: int | None = None
    detail: str | None = None  # the SMTP error (failed, retrying) or the reason (skipped, excluded)
    retry_at: datetime | None = None


def recipient_fact(message: Message[Record]) -> RecipientFact | None:
    """The fact a decoded message states about a recipient, or None for other messages."""
    env, p = message.envelope, message.payload
    common = (str(env.id), env.type, env.tenant_id)
    if isinstance(p, EmailSent):
        return RecipientFact(*common, p.campaign_id, p.contact_id, p.email, "sent", p.attempt,
                             env.occurred_at, ambiguous=p.ambiguous)
    if isinstance(p, EmailFailed):
        return RecipientFact(*common, p.campaign_id, p.contact_id, p.email, "failed", p.attempt,
                             env.occurred_at, ambiguous=p.ambiguous, smtp_code=p.smtp_code,
                             detail=p.reason)
    if isinstance(p, EmailDeferred):
        return RecipientFact(*common, p.campaign_id, p.contact_id, p.email, "retrying",
                             p.attempt, env.occurred_at, smtp_code=p.smtp_code, detail=p.reason,
                             retry_at=p.retry_at)
    if isinstance(p, RecipientSkipped):
        return RecipientFact(*common, p.campaign_id, p.contact_id, p.email, "skipped", 0,
                             env.occurred_at, detail=p.reason)
    if isinstance(p, RecipientQueued):
        return RecipientFact(*common, p.campaign_id, p.contact_id, p.email, "queued", 0,
                             env.occurred_at)
    if isinstance(p, RecipientExcluded):
        return RecipientFact(*common, p.campaign_id, p.contact_id, p.email, "excluded", 0,
                             env.occurred_at, detail=p.reason)
    return None
