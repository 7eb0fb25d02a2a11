"""One recipient's delivery: SMTP attempts with short in-process retries, its final outcome,
and the delivery event that reports it.

Guarantees:
- At most MAX_ATTEMPTS SMTP transactions per delivery; a permanent refusal (5xx) is never
  retried; a sent message is never sent again by this loop.
- Every delivery ends in exactly one `Outcome`, sent or failed, that records how many
  attempts it took and how many of them had an unknown result (ambiguous).
- No attempt starts after the caller's deadline, so a hanging relay cannot hold a batch
  (and the consumer's group membership) for longer than the deadline plus one attempt.
- `delivery_event` is pure: the same recipient and outcome give the same payload, so an
  outcome re-published from the send ledger matches what was published the first time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from schemas.events import EmailFailed, EmailSent, RecipientQueued
from services.sender.mime import OutgoingMail
from services.sender.replies import Attempt, Verdict

# Three attempts: a 4xx, a dropped connection or a timeout on a healthy relay (restart,
# connection limit, momentary overload) is usually over within a second; longer outages are
# for the delay topics of a later issue, not for holding a whole batch here.
MAX_ATTEMPTS = 3
# Pause before the 2nd and 3rd attempt: gives a restarting relay or a freed connection slot
# a moment, while a batch with many transient failures is held up by a fraction of a second.
BACKOFF_SECONDS = (0.05, 0.25)


@dataclass(frozen=True)
class Outcome:
    """How a delivery ended. `detail` is the SMTP reply when sent, the reason when failed."""

    sent: bool
    attempts: int
    smtp_code: int | None
    detail: str
    permanent: bool = False
    ambiguous: int = 0

    @classmethod
    def unbuildable(cls, error: Exception) -> Outcome:
        """A recipient whose message could not be built: retrying cannot help."""
        return cls(False, 1, None, f"message not built: {type(error).__name__}: {error}", True)


def deliver(
    mail: OutgoingMail,
    transmit: Callable[[OutgoingMail], Attempt],
    *,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Outcome:
    """Transmit until sent, refused for good, or out of attempts. No attempt starts after
    `deadline` (a `clock` reading): the delivery then fails as transient, untried."""
    ambiguous = 0
    attempt: Attempt | None = None
    for number in range(1, MAX_ATTEMPTS + 1):
        if deadline is not None and clock() >= deadline:
            reason = "batch deadline passed before this attempt (relay too slow)"
            last = f"; last attempt: {attempt.reply}" if attempt is not None else ""
            return Outcome(False, number - 1, None, reason + last, False, ambiguous)
        attempt = transmit(mail)
        ambiguous += attempt.ambiguous
        if attempt.verdict is Verdict.SENT:
            return Outcome(True, number, attempt.code, attempt.reply, ambiguous=ambiguous)
        if attempt.verdict is Verdict.PERMANENT:
            return Outcome(False, number, attempt.code, attempt.reply, True, ambiguous)
        if number < MAX_ATTEMPTS:
            sleep(BACKOFF_SECONDS[number - 1])
    assert attempt is not None
    return Outcome(False, MAX_ATTEMPTS, attempt.code, attempt.reply, False, ambiguous)


def delivery_event(
    recipient: RecipientQueued, outcome: Outcome, message_id: str
) -> EmailSent | EmailFailed:
    """The campaign.deliveries payload for a recipient's outcome."""
    if outcome.sent:
        return EmailSent(
            campaign_id=recipient.campaign_id,
            contact_id=recipient.contact_id,
            email=recipient.email,
            message_id=message_id,
            attempt=max(outcome.attempts, 1),
            smtp_reply=outcome.detail,
        )
    return EmailFailed(
        campaign_id=recipient.campaign_id,
        contact_id=recipient.contact_id,
        email=recipient.email,
        attempt=max(outcome.attempts, 1),
        reason=outcome.detail or "unknown",
        permanent=outcome.permanent,
        smtp_code=outcome.smtp_code,
    )
