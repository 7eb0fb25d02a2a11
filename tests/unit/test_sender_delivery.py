"""One attempt's outcome, and the delivery event that reports it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from schemas.events import EmailDeferred, EmailFailed, EmailSent, MessageTemplate, RecipientQueued
from services.sender.delivery import Outcome, Status, delivery_event, judge_attempt
from services.sender.replies import Attempt, Verdict
from services.sender.retries import RetryPolicy

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
POLICY = RetryPolicy(base_seconds=10, max_delay_seconds=100, max_attempts=4, max_age_seconds=3600)
SENT = Attempt(Verdict.SENT, 250, "2.0.0 OK")
TEMP = Attempt(Verdict.TRANSIENT, 451, "4.3.0 try later")
PERM = Attempt(Verdict.PERMANENT, 550, "5.1.1 no such user")
POLICY_REFUSAL = Attempt(Verdict.PERMANENT, 554, "5.7.1 spam")
DROPPED = Attempt(Verdict.TRANSIENT, None, "final reply: SMTPServerDisconnected", ambiguous=True)


def judge(result: Attempt, attempt: int = 1, first: datetime = NOW, draw: float = 0.0) -> Outcome:
    return judge_attempt(result, attempt, first_attempt_at=first, now=NOW, policy=POLICY, draw=draw)


def test_sent() -> None:
    assert judge(SENT) == Outcome(Status.SENT, 1, 250, "250 2.0.0 OK")


def test_permanent_fails_at_once_and_hard_bounces_are_marked() -> None:
    assert judge(PERM) == Outcome(Status.FAILED, 1, 550, "550 5.1.1 no such user",
                                  permanent=True, hard_bounce=True)
    refused = judge(POLICY_REFUSAL)
    assert refused.status is Status.FAILED and refused.permanent and not refused.hard_bounce


def test_transient_is_deferred_with_backoff() -> None:
    outcome = judge(TEMP, attempt=2, draw=0.5)
    # base 10 * 2**(2-1) = 20, equal jitter with draw 0.5: 10 + 5
    assert outcome == Outcome(Status.DEFERRED, 2, 451, "451 4.3.0 try later",
                              retry_at=NOW + timedelta(seconds=15))


def test_transient_fails_once_attempts_are_exhausted() -> None:
    outcome = judge(TEMP, attempt=POLICY.max_attempts)
    assert outcome.status is Status.FAILED and not outcome.permanent
    assert outcome.smtp_code == 451 and "gave up after 4 attempts" in outcome.detail


def test_transient_fails_once_too_old() -> None:
    outcome = judge(TEMP, attempt=1, first=NOW - timedelta(seconds=3599))
    assert outcome.status is Status.FAILED and not outcome.permanent


def test_lost_final_reply_is_deferred_and_counted_ambiguous() -> None:
    outcome = judge(DROPPED)
    assert outcome.status is Status.DEFERRED and outcome.ambiguous == 1
    assert outcome.with_ambiguous(2).ambiguous == 3


def recipient() -> RecipientQueued:
    return RecipientQueued(
        campaign_id="c",
        contact_id="k",
        email="jane@example.org",
        template=MessageTemplate(subject="s", from_address="news@example.com"),
    )


def test_sent_event_carries_ambiguous() -> None:
    outcome = Outcome(Status.SENT, 2, 250, "250 OK", ambiguous=1)
    event = delivery_event(recipient(), outcome, "<c.k@example.com>")
    assert event == EmailSent(
        campaign_id="c", contact_id="k", email="jane@example.org",
        message_id="<c.k@example.com>", attempt=2, smtp_reply="250 OK", ambiguous=1,
    )


def test_failed_event() -> None:
    outcome = Outcome(Status.FAILED, 1, 550, "550 no", permanent=True)
    event = delivery_event(recipient(), outcome, "<c.k@example.com>")
    assert event == EmailFailed(
        campaign_id="c", contact_id="k", email="jane@example.org",
        attempt=1, reason="550 no", permanent=True, smtp_code=550,
    )


def test_deferred_event() -> None:
    outcome = Outcome(Status.DEFERRED, 1, 451, "451 later", retry_at=NOW)
    event = delivery_event(recipient(), outcome, "<c.k@example.com>")
    assert event == EmailDeferred(
        campaign_id="c", contact_id="k", email="jane@example.org",
        attempt=1, reason="451 later", smtp_code=451, retry_at=NOW,
    )


def test_held_has_no_delivery_event() -> None:
    with pytest.raises(ValueError, match="no delivery event"):
        delivery_event(recipient(), Outcome(Status.HELD, 1), "<c.k@example.com>")
