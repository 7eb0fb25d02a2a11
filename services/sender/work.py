"""What the sender works on and what it counts: one recipient record to act on (`Work`) and
the worker's running totals (`SenderStats`). Plain values, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

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
    # (campaign_id, contact_id): the recipient's ledger key, read many times per mail by the
    # pipeline; and `message_id(recipient)`, which the ledger claim and the delivery event
    # both need. Built with the item (a cached_property would take a lock on first use).
    key: LedgerKey = field(init=False, repr=False, compare=False)
    message_id: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        recipient = self.recipient
        object.__setattr__(self, "key", (recipient.campaign_id, recipient.contact_id))
        object.__setattr__(self, "message_id", message_id(recipient))


def message_id(recipient: RecipientQueued) -> str:
    """The Message-ID a recipient's mail (and its delivery events) carry."""
    return message_id_for(recipient.campaign_id, recipient.contact_id,
                          recipient.template.from_address)
