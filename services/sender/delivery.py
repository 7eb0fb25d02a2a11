"""One SMTP attempt for one recipient, what it comes to, and the delivery event reporting it.

Guarantees:
- One SMTP transaction per attempt: a transient failure is never retried here (no sleeping
  while a batch and its partitions wait); it becomes DEFERRED with the time of the next
  attempt, carried through the delay topics, or FAILED once the retry policy gives up.
- A permanent refusal (5xx) is FAILED at once and never retried; `hard_bounce` says whether
  the address itself was refused (the contact is then suppressed).
- No attempt starts after the caller's deadline: a hanging relay cannot hold a batch (and the
  consumer's group membership) longer than the deadline plus one attempt; the untried
  recipient is deferred like any transient failure.
- `delivery_event` is pure: the same recipient and outcome give the same payload, so an
  outcome re-published from the send ledger matches what was published the first time.
- `delivery_event_id` names the event: a recipient's terminal event (sent, failed or
  skipped) always has the same envelope id in its campaign, and so has each attempt's
  deferral, so a re-published copy is recognisable by its id alone.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, replace
from datetime import datetime

from schemas.events import EmailDeferred, EmailFailed, EmailSent, RecipientQueued
from schemas.ids import Uuid5Names
from services.sender.replies import Attempt, Verdict, is_hard_bounce
from services.sender.retries import RetryPolicy

# Namespace of delivery event ids (name-based: a copy of an event gets the same id).
_DELIVERY_EVENTS = Uuid5Names(uuid.UUID("0c6f3d52-7a1e-4f0b-9d2c-5e8a41b7c3f9"))


def delivery_event_id(campaign_id: str, contact_id: str, attempt: int | None = None) -> str:
    """The envelope id of a recipient's terminal delivery event (`attempt` None: EmailSent,
    EmailFailed, RecipientSkipped share it, since a recipient has one terminal outcome) or of
    its EmailDeferred for `attempt`."""
    if attempt is None:
        return _DELIVERY_EVENTS(f"{campaign_id}\x00{contact_id}\x00terminal")
    return _DELIVERY_EVENTS(f"{campaign_id}\x00{contact_id}\x00deferred\x00{attempt}")


class Status(enum.StrEnum):
    """How an attempt ended for the recipient. SENT and FAILED are terminal; DEFERRED waits on
    a delay topic; HELD, SKIPPED and THROTTLED were never tried (paused / cancelled meanwhile,
    or a rate limit booked a later slot: the attempt waits on a delay topic until then)."""

    SENT = "sent"
    FAILED = "failed"
    DEFERRED = "deferred"
    HELD = "held"
    SKIPPED = "skipped"
    THROTTLED = "throttled"


@dataclass(frozen=True)
class Outcome:
    """The result of attempt number `attempt`. `detail` is the SMTP reply when sent, the reason
    otherwise; `ambiguous` counts possible duplicates (connection lost after the final ".")."""

    status: Status
    attempt: int
    smtp_code: int | None = None
    detail: str = ""
    permanent: bool = False
    ambiguous: int = 0
    hard_bounce: bool = False
    retry_at: datetime | None = None

    @property
    def terminal(self) -> bool:
        return self.status in (Status.SENT, Status.FAILED)

    @classmethod
    def unbuildable(cls, attempt: int, error: Exception) -> Outcome:
        """A recipient whose message could not be built: retrying cannot help."""
        return cls(Status.FAILED, attempt, None,
                   f"message not built: {type(error).__name__}: {error}", permanent=True)

    def with_ambiguous(self, earlier: int) -> Outcome:
        """This outcome, counting also `earlier` possible duplicates from the send ledger."""
        if not earlier:
            return self  # frozen: the same value (the common case; replace() costs ~2 us)
        return replace(self, ambiguous=self.ambiguous + earlier)


def judge_attempt(
    result: Attempt,
    attempt: int,
    *,
    first_attempt_at: datetime,
    now: datetime,
    policy: RetryPolicy,
    draw: float,
) -> Outcome:
    """What one SMTP attempt means for the recipient (`draw` in [0, 1) jitters the backoff)."""
    ambiguous = int(result.ambiguous)
    if result.verdict is Verdict.SENT:
        return Outcome(Status.SENT, attempt, result.code, result.reply, ambiguous=ambiguous)
    if result.verdict is Verdict.PERMANENT:
        return Outcome(Status.FAILED, attempt, result.code, result.reply, permanent=True,
                       ambiguous=ambiguous, hard_bounce=is_hard_bounce(result))
    return transient(attempt, result.code, result.reply, first_attempt_at=first_attempt_at,
                     now=now, policy=policy, draw=draw, ambiguous=ambiguous)


def transient(
    attempt: int,
    smtp_code: int | None,
    reason: str,
    *,
    first_attempt_at: datetime,
    now: datetime,
    policy: RetryPolicy,
    draw: float,
    ambiguous: int = 0,
) -> Outcome:
    """A transient failure of `attempt`: DEFERRED to the next attempt, or FAILED when the
    policy gives up (attempts or age exhausted)."""
    retry_at = policy.next_attempt_at(attempt, first_attempt_at, now, draw)
    if retry_at is None:
        return Outcome(Status.FAILED, attempt, smtp_code,
                       f"gave up after {attempt} attempts: {reason}", ambiguous=ambiguous)
    return Outcome(Status.DEFERRED, attempt, smtp_code, reason, ambiguous=ambiguous,
                   retry_at=retry_at)


def delivery_event(
    recipient: RecipientQueued, outcome: Outcome, message_id: str
) -> EmailSent | EmailFailed | EmailDeferred:
    """The campaign.deliveries payload for a recipient's sent, failed or deferred outcome."""
    if outcome.status is Status.SENT:
        return EmailSent(
            campaign_id=recipient.campaign_id,
            contact_id=recipient.contact_id,
            email=recipient.email,
            message_id=message_id,
            attempt=max(outcome.attempt, 1),
            smtp_reply=outcome.detail,
            ambiguous=outcome.ambiguous,
        )
    if outcome.status is Status.FAILED:
        return EmailFailed(
            campaign_id=recipient.campaign_id,
            contact_id=recipient.contact_id,
            email=recipient.email,
            attempt=max(outcome.attempt, 1),
            reason=outcome.detail or "unknown",
            permanent=outcome.permanent,
            smtp_code=outcome.smtp_code,
            ambiguous=outcome.ambiguous,
        )
    if outcome.status is Status.DEFERRED and outcome.retry_at is not None:
        return EmailDeferred(
            campaign_id=recipient.campaign_id,
            contact_id=recipient.contact_id,
            email=recipient.email,
            attempt=max(outcome.attempt, 1),
            reason=outcome.detail or "unknown",
            smtp_code=outcome.smtp_code,
            retry_at=outcome.retry_at,
        )
    raise ValueError(f"no delivery event for a {outcome.status} outcome")
