"""What the sender works on and what it counts: one recipient record to act on (`Work`) and
the worker's running totals (`SenderStats`). Plain values, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import cached_property

from confluent_kafka import Message

from schemas.envelope import Envelope
from schemas.events import RecipientQueued, RecipientRetryScheduled
from services.sender.ledger import LedgerKey
from services.sender.mime import message_id_for


@dataclass
class SenderStats:
    """Running totals of this worker, for logs, tests and benchmarks."""

    batches: int = 0
    records: int = 0
    invalid: int = 0
    sent: int = 0
    failed: int = 0
    deferred: int = 0
    held: int = 0
    throttled: int = 0
    skipped: int = 0
    replayed: int = 0
    ambiguous: int = 0
    suppressed: int = 0


@dataclass(frozen=True)
class Work:
    """A recipient record to act on in this batch."""

    record: Message
    envelope: Envelope
    # The record's payload: RecipientQueued, or RecipientRetryScheduled around it.
    payload: RecipientQueued | RecipientRetryScheduled
    recipient: RecipientQueued
    attempt: int
    first_attempt_at: datetime
    # Why it must not be mailed now ("cancelled", "suppressed:<reason>", ...), or None.
    skip: str | None
    # Throttled before: the rate-limit slot it booked then (its retry_at), already paid for.
    slot: datetime | None = None
    @cached_property
    def key(self) -> LedgerKey:
        """(campaign_id, contact_id): the recipient's ledger key, read many times per mail by
        the pipeline, so built once."""
        return (self.recipient.campaign_id, self.recipient.contact_id)

    @cached_property
    def message_id(self) -> str:
        """`message_id(recipient)`, worked out once (the ledger claim and the delivery event
        both need it)."""
        return message_id(self.recipient)


def message_id(recipient: RecipientQueued) -> str:
    """The Message-ID a recipient's mail (and its delivery events) carry."""
    return message_id_for(recipient.campaign_id, recipient.contact_id,
                          recipient.template.from_address)
