"""What the sender does with a recipient record, decided from plain values. Pure: no clock, no
broker, no sleep; the modules at the edge read the clocks and the campaign's control state,
call these and carry the decision out (services/sender/routing.py, waiting.py, mailer.py,
steps.py).

Guarantees, given the values passed in:
- `read`: a record that is not a valid recipient record is dead-lettered with the reason; an
  audience member the hydrator excluded is dropped; anything else is a recipient to route.
- `route`: a recipient of a paused campaign is never acted on (it is parked, or its held
  partition waits for a release); a delay record is never acted on before it is due (its
  partition waits, or a released held one goes back to its delay topic).
- `due_at`: a throttled recipient is taken back early enough to wait for its slot, a retry at
  its time.
- `pre_send`, `booked`: a recipient is mailed only while its campaign is sending and it is not
  skipped, never after the batch deadline, and under a rate limit only at a slot it booked
  (never before it); a slot further off than the in-thread wait goes to a delay topic.
  `untried` says what an attempt the check stopped comes to (held, skipped, deferred or
  failed by the retry policy, throttled).
- `replayed`: a recipient not mailed now publishes what the send ledger holds for it, so a
  redelivered copy repeats its outcome, never a new one; `fair`: tenants take turns.
- `wake`, `swept`, `poll_timeout`: a paused delay partition is resumed at the first turn of
  the loop after its head is due, and the fetch never waits past that; blocked held
  partitions are swept after every release, and once more a while after it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TypeVar, assert_never

from pydantic import ValidationError

from schemas.base import Record
from schemas.envelope import Envelope, Message, SchemaViolation, decode
from schemas.events import RecipientExcluded, RecipientQueued, RecipientRetryScheduled
from schemas.registry import wire_name
from services.common.kafka import PartitionKey
from services.sender.control import Control
from services.sender.delivery import Outcome, Status, transient
from services.sender.ledger import Claim, ClaimState
from services.sender.retries import RetryPolicy

T = TypeVar("T")

# --- reading a record -----------------------------------------------------------------------


@dataclass(frozen=True)
class DeadLetter:
    """Not a recipient record: to campaign.recipients.dlq with the reason."""

    reason: str


@dataclass(frozen=True)
class Drop:
    """Nothing to send, by design (an audience member the hydrator excluded)."""


@dataclass(frozen=True)
class Recipient:
    """A recipient record to route: the attempt it asks for, and for a throttled one the slot
    it booked then (its retry_at, already paid for)."""

    envelope: Envelope
    payload: RecipientQueued | RecipientRetryScheduled
    recipient: RecipientQueued
    attempt: int
    first_attempt_at: datetime
    slot: datetime | None


Read = DeadLetter | Drop | Recipient


class _QueuedEnvelope(Envelope):
    """An envelope read together with a RecipientQueued payload: one validation pass over the
    JSON (pydantic-core), where `decode` parses to Python objects, validates the envelope,
    then the payload. Same models, same validators."""

    payload: RecipientQueued  # type: ignore[assignment]


_QUEUED = wire_name(RecipientQueued)


def decode_recipient(value: bytes | str | None) -> Message[Record]:
    """`decode(value)`, faster for the common record, a RecipientQueued of the current version;
    anything else (other types or versions, invalid records) takes `decode`, which reads it
    or raises SchemaViolation with the reason."""
    if value is not None:
        try:
            envelope = _QueuedEnvelope.model_validate_json(value)
        except ValidationError:
            pass
        else:
            if (envelope.type, envelope.version) == _QUEUED:
                return Message(envelope, envelope.payload)
    return decode(value)


def read(value: bytes | str | None, now: datetime) -> Read:
    """What a record of the recipient, delay or held topics is (`now`: a first attempt's time)."""
    try:
        message = decode_recipient(value)
    except SchemaViolation as exc:
        return DeadLetter(str(exc))
    payload = message.payload
    if isinstance(payload, RecipientExcluded):
        return Drop()
    if isinstance(payload, RecipientQueued):
        return Recipient(message.envelope, payload, payload, 1, now, None)
    if isinstance(payload, RecipientRetryScheduled):
        return Recipient(message.envelope, payload, payload.recipient, payload.attempt,
                         payload.first_attempt_at, payload.retry_at if payload.throttled else None)
    return DeadLetter(f"not a recipient: {message.envelope.type}")


def skip_reason(control: Control, do_not_mail: str | None) -> str | None:
    """Why a recipient must not be mailed at all ("cancelled", "suppressed:<reason>", ...), or
    None; `do_not_mail`: the contact's reason on the do-not-mail list."""
    if control is Control.CANCELLED:
        return "cancelled"
    return do_not_mail


def replayed(claim: Claim, attempt: int, skip: str | None, *, now: datetime,
             policy: RetryPolicy, draw: float) -> Outcome | None:
    """What a recipient that is not mailed now ends as, from its ledger claim: its settled
    outcome again; SKIPPED with `skip`; its recorded deferral with a new retry time (the retry
    record may have been lost in a crash); None when a later attempt owns it (STALE)."""
    if claim.state is ClaimState.SETTLED:
        return claim.outcome
    if claim.state is ClaimState.SKIPPED:
        return Outcome(Status.SKIPPED, attempt, detail=skip or "cancelled")
    if claim.state is ClaimState.DEFERRED and claim.outcome is not None:
        wait = policy.delay(attempt, draw)
        return replace(claim.outcome, retry_at=now + timedelta(seconds=wait))
    return None


def fair(items: Sequence[T], tenant: Callable[[T], str]) -> list[T]:
    """Round-robin over tenants, in each tenant's order, so that when a rate limit of the SMTP
    server bites, tenants share its slots instead of the largest one taking them all."""
    by_tenant: dict[str, list[T]] = {}
    for item in items:
        by_tenant.setdefault(tenant(item), []).append(item)
    if len(by_tenant) < 2:
        return list(items)
    queues = list(by_tenant.values())
    longest = max(len(q) for q in queues)
    return [q[i] for i in range(longest) for q in queues if i < len(q)]


# --- routing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Act:
    """Mail it in this batch (claim, pre-send checks, SMTP, settle, publish)."""


@dataclass(frozen=True)
class WaitUntil:
    """A delay record not due yet: its partition pauses at it until `due` (the other
    partitions keep flowing)."""

    due: datetime


@dataclass(frozen=True)
class WaitForRelease:
    """A held record whose campaign is still paused: its partition pauses at it until some
    campaign is resumed or cancelled."""


@dataclass(frozen=True)
class Park:
    """A record of a paused campaign goes to the end of the held topic, as it came; `again`:
    it came from the held topic (a sweep lets it by), so it was counted as held already."""

    again: bool


@dataclass(frozen=True)
class Forward:
    """A released held retry that is not due yet: back to the delay topic of its attempt."""


Route = Act | WaitUntil | WaitForRelease | Park | Forward


def due_at(payload: RecipientQueued | RecipientRetryScheduled, *, early: float) -> datetime | None:
    """When a record may be acted on: None for a first attempt (at once), a retry's time, or
    `early` seconds before a throttled one's slot (it waits for the slot in its send thread)."""
    if not isinstance(payload, RecipientRetryScheduled):
        return None
    if payload.throttled:
        return payload.retry_at - timedelta(seconds=early)
    return payload.retry_at


def route(control: Control, *, from_held: bool, due: datetime | None, now: datetime,
          offset: int, sweep_until: int) -> Route:
    """Where a recipient record goes now. `due`: when a delay record may be acted on (None: a
    first attempt, due at once); `offset`: the record's; `sweep_until`: for a held partition,
    the end offset of the last sweep (-1: none), below which records of campaigns still paused
    are parked again instead of blocking the partition."""
    if from_held:
        if control is Control.PAUSED:
            if offset < sweep_until:
                return Park(again=True)  # still paused: to the end, let the others by
            return WaitForRelease()
        if due is not None and due > now:
            return Forward()
        return Act()
    if due is not None and due > now:
        return WaitUntil(due)
    if control is Control.PAUSED:
        return Park(again=False)
    return Act()


# --- right before the SMTP attempt ----------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    """How long a recipient may wait in its send thread and how late in a batch it may be
    mailed, in seconds (mailer.py's constants say what each guards against)."""

    batch_deadline: float
    max_throttle_wait: float
    throttled_batch: float
    throttled_early: float


@dataclass(frozen=True)
class Send:
    """Mail it now, after waiting `wait` seconds for its rate-limit slot (0: at once)."""

    wait: float = 0.0


@dataclass(frozen=True)
class Hold:
    """Its campaign was paused meanwhile: park it on the held topic, untried."""


@dataclass(frozen=True)
class Skip:
    """Cancelled or put on the do-not-mail list meanwhile: RecipientSkipped with the reason."""

    reason: str


@dataclass(frozen=True)
class Defer:
    """Not tried, counted as a transient failure of the attempt (retried or given up by the
    retry policy)."""

    reason: str


@dataclass(frozen=True)
class Throttle:
    """Not tried: back to a delay topic, holding the rate-limit slot at `retry_at`."""

    retry_at: datetime


@dataclass(frozen=True)
class Book:
    """A rate limit applies and it holds no usable slot: book one (RateLimiter.book), then
    ask `booked`."""


PreSend = Send | Hold | Skip | Defer | Throttle | Book


def pre_send(control: Control, skip: str | None, *, now: datetime, clock: float, started: float,
             slot: datetime | None, limited: bool, bounds: Bounds) -> PreSend:
    """The check right before a recipient's SMTP attempt. `clock` and `started` (when its batch
    started) are monotonic seconds; `slot`: the one it booked when it was throttled before;
    `limited`: whether a rate limit applies."""
    if control is Control.PAUSED:
        return Hold()
    if skip is not None:
        return Skip(skip)
    if clock >= started + bounds.batch_deadline:
        return Defer("batch deadline passed before this attempt")
    if not limited:
        return Send()
    if slot is not None:
        ahead = (slot - now).total_seconds()
        if ahead > bounds.throttled_early + bounds.max_throttle_wait:
            # Taken back far too early (clocks of two instances apart): back to its delay
            # topic, still holding its slot; never sent before it.
            return Throttle(slot)
        if ahead >= 0:
            return Send(ahead)  # its slot, booked when it was throttled: it waits for it
    return Book()  # not booked yet, or back after its slot (that one went unused)


def booked(wait: float, *, clock: float, started: float, now: datetime,
           bounds: Bounds) -> Send | Throttle:
    """After booking a slot `wait` seconds off at monotonic `clock`: wait for it in the send
    thread, or, when that is too long or too late into the batch, go to a delay topic for it."""
    if wait > bounds.max_throttle_wait or clock + wait > started + bounds.throttled_batch:
        return Throttle(now + timedelta(seconds=wait))
    return Send(wait)


def untried(check: Hold | Skip | Defer | Throttle, attempt: int, *, first_attempt_at: datetime,
            now: datetime, policy: RetryPolicy, draw: float) -> Outcome:
    """What an attempt the pre-send check stopped comes to: HELD (parked untried), SKIPPED with
    the reason, a transient failure (deferred, or failed once the policy gives up; `draw`
    jitters the backoff), or THROTTLED holding its slot."""
    match check:
        case Hold():
            return Outcome(Status.HELD, attempt)
        case Skip(reason=reason):
            return Outcome(Status.SKIPPED, attempt, detail=reason)
        case Defer(reason=reason):
            return transient(attempt, None, reason, first_attempt_at=first_attempt_at, now=now,
                             policy=policy, draw=draw)
        case Throttle(retry_at=retry_at):
            return Outcome(Status.THROTTLED, attempt, retry_at=retry_at)
        case _:
            assert_never(check)


# --- resuming paused partitions -------------------------------------------------------------

@dataclass(frozen=True)
class Wake:
    """What to resume at this turn of the loop: the delay partitions whose head is due, and
    whether to sweep the blocked held partitions (look up their ends, then resume them)."""

    due: tuple[PartitionKey, ...]
    sweep: bool


@dataclass(frozen=True)
class Sweeps:
    """What the loop knows of releases: `seen`, the board's release count at the last sweep;
    `resweep_at`, monotonic time of the second sweep a release asks for (None: none owed)."""

    seen: int
    resweep_at: float | None = None


def wake(due_at: Mapping[PartitionKey, datetime], sweeps: Sweeps, *, now: datetime, released: int,
         clock: float) -> Wake:
    """Which paused partitions may go on: `due_at` holds when each paused delay partition's
    head is due; `released` is the board's release count now, `clock` monotonic seconds."""
    due = tuple(where for where, at in due_at.items() if at <= now)
    owed = sweeps.resweep_at is not None and clock >= sweeps.resweep_at
    return Wake(due, released != sweeps.seen or owed)


def swept(sweeps: Sweeps, *, released: int, clock: float, resweep_seconds: float) -> Sweeps:
    """After a sweep: a new release owes a second sweep `resweep_seconds` later (a sender that
    had not seen it yet may have parked a record of that campaign behind one still paused);
    a second sweep owes none."""
    changed = released != sweeps.seen
    return Sweeps(released, clock + resweep_seconds if changed else None)


def poll_timeout(due: Iterable[datetime], *, now: datetime, longest: float) -> float:
    """How long a fetch may wait: at most `longest`, and no later than the first paused delay
    partition falls due (at least 10 ms: a due head is resumed at the next turn anyway)."""
    first = min(due, default=None)
    if first is None:
        return longest
    return min(longest, max((first - now).total_seconds(), 0.01))
