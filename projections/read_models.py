"""Read models: which row changes a batch of decoded events makes (pure; no I/O).

Guarantee, for a batch planned here and applied by `projections.batch_writer.apply` inside one
transaction: every counter on `campaigns` moves by exactly the number of real transitions,
whatever duplicates or cross-topic reordering this and earlier batches hold. A recipient's
status only climbs 'excluded' < 'queued' < 'retrying' < terminal (sent, failed, skipped) and
leaves a terminal status never, so the result does not depend on the order the topics were
read in; a campaign's status is derived from the set of facts seen (a cancel always wins;
'completed' once hydrated and every recipient is terminal; 'paused' as the last pause/resume
left it; 'sending' once the send was requested or hydrated; 'scheduled' from CampaignScheduled
until the send, or until CampaignScheduleMissed returns it to 'draft' with the miss recorded).
The first tenant to name a campaign id owns it: facts naming the same campaign under another
tenant are dropped, never merged. Contact events are folded per contact in
order by `schemas.contacts.apply_contact_event`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple, cast, get_args

from projections.facts import RANK, RecipientFact, recipient_fact
from schemas.base import Record
from schemas.contacts import ContactEvent
from schemas.envelope import Message
from schemas.events import (
    CampaignCancelled,
    CampaignCreated,
    CampaignHydrated,
    CampaignPaused,
    CampaignResumed,
    CampaignScheduled,
    CampaignScheduleMissed,
    CampaignSendRequested,
    CampaignUpdated,
    CommandRejected,
    TestEmailRequested,
)
from schemas.lists import ListCreated, ListDeleted, ListEvent, ListRenamed
from schemas.segments import SegmentChanged, SegmentDefined, SegmentDeleted, SegmentEvent

# Column limits: an absurd value must be stored clamped, not fail the batch, because a batch
# that cannot commit blocks its partitions forever.
BIGINT_MAX = 2**63 - 1
INT_MAX = 2**31 - 1
INT_MIN = -(2**31)

_CONTACT_EVENTS: tuple[type[Record], ...] = get_args(ContactEvent)
# campaign.events facts whose cause is recorded in command_outcomes.
_CAMPAIGN_OUTCOMES = (
    CampaignCreated, CampaignUpdated, CampaignSendRequested, CampaignHydrated, CampaignCancelled,
    CampaignPaused, CampaignResumed, CampaignScheduled, CampaignScheduleMissed, CommandRejected,
    SegmentDefined, SegmentChanged, SegmentDeleted, TestEmailRequested,
    ListCreated, ListRenamed, ListDeleted,
)


def _text(value: str) -> str:
    """PostgreSQL text cannot hold NUL; a NUL in a name or reason must not poison a batch."""
    return value.replace("\x00", "\ufffd")


def _optional_text(value: str | None) -> str | None:
    return None if value is None else _text(value)


def _int_column(value: int | None) -> int | None:
    """An integer column's value clamped to its range (an SMTP code is any int on the wire)."""
    if value is None or INT_MIN <= value <= INT_MAX:
        return value
    return INT_MAX if value > 0 else INT_MIN


@dataclass(slots=True)
class CampaignChange:
    """What campaign.events say about one campaign in this batch (None: nothing said)."""

    tenant_id: str
    campaign_id: str
    name: str | None = None
    subject: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    total: int | None = None
    hydrated_at: datetime | None = None
    # CampaignHydrated's hand-picked ids that named no contact of the tenant (a JSON array,
    # as stored), and how many there were.
    unknown_contact_ids: str | None = None
    unknown_contact_count: int | None = None
    cancelled_at: datetime | None = None
    paused: bool | None = None  # the last pause (True) or resume (False) of the batch
    paused_at: datetime | None = None
    resumed_at: datetime | None = None
    pause_reason: str | None = None
    paused_automatically: bool | None = None
    scheduled_for: datetime | None = None  # CampaignScheduled.send_at
    schedule_missed_at: datetime | None = None
    schedule_missed_reason: str | None = None
    # The last CampaignUpdated of the batch: replaces the stored name and subject.
    edited_name: str | None = None
    edited_subject: str | None = None


@dataclass(frozen=True, slots=True)
class OutcomeRow:
    """An event on campaign.events and the message (a command, mostly) that caused it."""

    event_id: uuid.UUID
    tenant_id: str
    causation_id: uuid.UUID
    aggregate_id: str
    event_type: str
    occurred_at: datetime


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


class RecipientRow(NamedTuple):
    """A recipient's highest status in the batch (the first fact at that rank wins).

    A tuple in the staging table's column order: COPY writes it as it is (one per delivery,
    so no per-row conversion on the hot path).
    """

    tenant_id: str
    campaign_id: str
    contact_id: str
    email: str
    status: str
    attempts: int
    last_error: str | None
    reason: str | None
    smtp_code: int | None
    ambiguous: int
    event_at: datetime


@dataclass(frozen=True, slots=True)
class AttemptRow:
    """A deferred (non-terminal) attempt, kept as history."""

    event_id: str
    tenant_id: str
    campaign_id: str
    contact_id: str
    attempt: int
    smtp_code: int | None
    detail: str
    retry_at: datetime | None
    occurred_at: datetime


@dataclass(frozen=True, slots=True)
class DroppedFact:
    """A valid event the read models refuse, with the reason (for the log)."""

    event_id: str
    type: str
    reason: str


RecipientKey = tuple[str, str]  # (campaign_id, contact_id): the recipient's primary key
ContactKey = tuple[str, str]  # (tenant_id, contact_id)


@dataclass
class BatchChanges:
    """Row changes of one batch, deduplicated so no statement touches a row twice."""

    campaigns: dict[str, CampaignChange] = field(default_factory=dict)
    rejections: dict[uuid.UUID, RejectionRow] = field(default_factory=dict)
    outcomes: dict[uuid.UUID, OutcomeRow] = field(default_factory=dict)
    recipients: dict[RecipientKey, RecipientRow] = field(default_factory=dict)
    attempts: dict[str, AttemptRow] = field(default_factory=dict)
    # Contact events per contact, in consumption order (one partition per contact).
    contacts: dict[ContactKey, list[ContactEvent]] = field(default_factory=dict)
    # Segment events (tenant, event, occurred at), in consumption order (segments.events).
    segments: list[tuple[str, SegmentEvent, datetime]] = field(default_factory=list)
    # List events (tenant, event, occurred at), in consumption order (segments.events).
    lists: list[tuple[str, ListEvent, datetime]] = field(default_factory=list)
    dropped: list[DroppedFact] = field(default_factory=list)
    ignored: int = 0
    # campaign id -> tenant that named it first in this batch.
    owners: dict[str, str] = field(default_factory=dict)
    # `recipients` sorted into key order by batch_writer.prepare ahead of the write; cleared
    # whenever `recipients` changes after it.
    prepared: list[RecipientRow] | None = None

    def campaign_ids(self) -> list[str]:
        """Every campaign the batch may have moved, sorted (a stable lock order)."""
        return sorted(self.owners)

    def is_empty(self) -> bool:
        return not (self.campaigns or self.rejections or self.recipients or self.attempts
                    or self.contacts or self.outcomes or self.segments or self.lists)

    def drop_campaigns(self, foreign: Iterable[str]) -> None:
        """Forget every change to campaigns that another tenant owned before this batch."""
        for campaign_id in foreign:
            tenant = self.owners.pop(campaign_id, None)
            if tenant is None:
                continue
            reason = f"campaign {campaign_id} belongs to another tenant"
            if self.campaigns.pop(campaign_id, None) is not None:
                self.dropped.append(DroppedFact("-", "campaign facts", reason))
            for key in [k for k in self.recipients if k[0] == campaign_id]:
                del self.recipients[key]
                self.prepared = None
                self.dropped.append(DroppedFact("-", f"recipient {key[1]}", reason))
            for event_id in [e for e, a in self.attempts.items() if a.campaign_id == campaign_id]:
                del self.attempts[event_id]


def plan(messages: Iterable[Message[Record] | RecipientFact]) -> BatchChanges:
    """Map decoded events (or facts from projections.recipient_records), in consumption
    order, to row changes. Within a batch the first fact at a recipient's highest status wins
    (a later duplicate is a no-op, exactly as in a later batch). Other valid events are
    ignored."""
    changes = BatchChanges()
    for item in messages:
        if isinstance(item, RecipientFact):
            _plan_recipient(changes, item)
        else:
            _plan_message(changes, item)
    return changes


def _owned(changes: BatchChanges, campaign_id: str, tenant: str, event_id: str,
           kind: str) -> bool:
    owner = changes.owners.setdefault(campaign_id, tenant)
    if owner != tenant:
        changes.dropped.append(
            DroppedFact(event_id, kind, f"campaign {campaign_id} belongs to another tenant")
        )
        return False
    return True


# Builds a RecipientRow from a tuple without the generated __new__'s Python frame (~0.3 us a
# row on the hot path).
_new_row = tuple.__new__


def _plan_recipient(changes: BatchChanges, fact: RecipientFact) -> None:
    # Once per recipient fact: values already in range are taken as they are (no helper
    # calls); the rare out-of-range ones go through _text / _int_column.
    campaign_id, tenant = fact.campaign_id, fact.tenant_id
    if changes.owners.get(campaign_id) != tenant and not _owned(
            changes, campaign_id, tenant, fact.event_id, fact.type):
        return
    status = fact.status
    key = (campaign_id, fact.contact_id)
    if status == "retrying":
        changes.attempts.setdefault(fact.event_id, AttemptRow(
            fact.event_id, tenant, campaign_id, fact.contact_id,
            min(fact.attempt, INT_MAX), _int_column(fact.smtp_code), _text(fact.detail or ""),
            fact.retry_at, fact.occurred_at,
        ))
    recipients = changes.recipients
    current = recipients.get(key)
    if current is not None:
        rank, now = RANK[status], RANK[current.status]
        climbs = rank > now or (
            status == current.status == "retrying" and fact.attempt > current.attempts
        )
        if not climbs:
            return
    error = reason = None
    detail = fact.detail
    if detail is not None:
        if status == "failed" or status == "retrying":
            error = _text(detail)
        elif status == "skipped" or status == "excluded":
            reason = _text(detail)
    email = fact.email or (current.email if current else "")
    if "\x00" in email:
        email = _text(email)
    attempt, ambiguous, code = fact.attempt, fact.ambiguous, fact.smtp_code
    if attempt > INT_MAX:
        attempt = INT_MAX
    if ambiguous > INT_MAX:
        ambiguous = INT_MAX
    if code is not None and not INT_MIN <= code <= INT_MAX:
        code = _int_column(code)
    recipients[key] = _new_row(RecipientRow, (
        tenant, campaign_id, fact.contact_id, email, status, attempt, error, reason, code,
        ambiguous, fact.occurred_at,
    ))


def _plan_message(changes: BatchChanges, message: Message[Record]) -> None:
    env, payload = message.envelope, message.payload
    tenant = env.tenant_id
    if env.causation_id is not None and isinstance(payload, _CAMPAIGN_OUTCOMES):
        # What a command caused (or its rejection), for the command gateway's outcome look-up.
        changes.outcomes.setdefault(env.id, OutcomeRow(
            env.id, tenant, env.causation_id, env.aggregate_id, env.type, env.occurred_at))
    if isinstance(payload, CommandRejected):
        # A rejection changes no campaign (it may even name another tenant's campaign id:
        # that is often why it was rejected), so ownership does not apply to it.
        changes.rejections.setdefault(env.id, RejectionRow(
            event_id=env.id, tenant_id=tenant, campaign_id=env.aggregate_id,
            command_id=payload.command_id, command_type=_optional_text(payload.command_type),
            reason=_text(payload.reason), occurred_at=env.occurred_at,
            correlation_id=env.correlation_id,
        ))
        return
    if isinstance(payload, _CONTACT_EVENTS):
        event = cast(ContactEvent, payload)
        changes.contacts.setdefault((tenant, event.contact_id), []).append(event)
        return
    if isinstance(payload, SegmentDefined | SegmentChanged | SegmentDeleted):
        changes.segments.append((tenant, payload, env.occurred_at))
        return
    if isinstance(payload, ListCreated | ListRenamed | ListDeleted):
        changes.lists.append((tenant, payload, env.occurred_at))
        return
    fact = recipient_fact(message)
    if fact is not None:
        _plan_recipient(changes, fact)
        return
    if not isinstance(payload, CampaignCreated | CampaignUpdated | CampaignSendRequested
                      | CampaignHydrated
                      | CampaignCancelled | CampaignPaused | CampaignResumed
                      | CampaignScheduled | CampaignScheduleMissed):
        changes.ignored += 1
        return
    campaign_id = env.aggregate_id
    if not _owned(changes, campaign_id, tenant, str(env.id), env.type):
        return
    change = changes.campaigns.setdefault(campaign_id, CampaignChange(tenant, campaign_id))
    at = env.occurred_at
    # First occurrence wins for facts that happen once; pause/resume: the last one wins.
    if isinstance(payload, CampaignCreated):
        if change.created_at is None:
            change.name, change.subject = _text(payload.name), _text(payload.template.subject)
            change.created_at = at
    elif isinstance(payload, CampaignUpdated):
        change.edited_name = _text(payload.name)
        change.edited_subject = _text(payload.template.subject)
    elif isinstance(payload, CampaignSendRequested):
        change.started_at = change.started_at or at
    elif isinstance(payload, CampaignHydrated):
        if change.hydrated_at is None:
            change.total, change.hydrated_at = min(payload.total, BIGINT_MAX), at
            change.unknown_contact_ids = json.dumps(payload.unknown_contact_ids)
            change.unknown_contact_count = min(payload.unknown_contact_count, BIGINT_MAX)
    elif isinstance(payload, CampaignCancelled):
        change.cancelled_at = change.cancelled_at or at
    elif isinstance(payload, CampaignScheduled):
        # A campaign is scheduled once (the aggregate schedules only a draft, and nothing
        # returns it to draft), so the first schedule is the schedule.
        change.scheduled_for = change.scheduled_for or payload.send_at
    elif isinstance(payload, CampaignScheduleMissed):
        if change.schedule_missed_at is None:
            change.schedule_missed_at = at
            change.schedule_missed_reason = _text(payload.reason)
    elif isinstance(payload, CampaignPaused):
        change.paused, change.paused_at = True, at
        change.pause_reason = _optional_text(payload.reason)
        change.paused_automatically = payload.automatic
    else:
        change.paused, change.resumed_at = False, at
