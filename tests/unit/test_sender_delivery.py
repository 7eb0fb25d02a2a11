"""Retries, outcomes and delivery events of one recipient's delivery."""

from __future__ import annotations

from collections.abc import Iterator

from schemas.events import EmailFailed, EmailSent, MessageTemplate, RecipientQueued
from services.sender.delivery import BACKOFF_SECONDS, MAX_ATTEMPTS, Outcome, deliver, delivery_event
from services.sender.mime import OutgoingMail
from services.sender.replies import Attempt, Verdict

MAIL = OutgoingMail("<c.k@example.com>", "news@example.com", "jane@example.org", b"x\r\n")
SENT = Attempt(Verdict.SENT, 250, "2.0.0 OK")
TEMP = Attempt(Verdict.TRANSIENT, 451, "4.3.0 try later")
PERM = Attempt(Verdict.PERMANENT, 550, "5.1.1 no such user")
DROPPED = Attempt(Verdict.TRANSIENT, None, "final reply: SMTPServerDisconnected", ambiguous=True)


class Relay:
    """Answers transmit() with a scripted sequence of attempts."""

    def __init__(self, *attempts: Attempt) -> None:
        self._attempts: Iterator[Attempt] = iter(attempts)
        self.calls = 0
        self.sleeps: list[float] = []

    def transmit(self, mail: OutgoingMail) -> Attempt:
        self.calls += 1
        return next(self._attempts)


def run(relay: Relay, **kwargs: object) -> Outcome:
    return deliver(MAIL, relay.transmit, sleep=relay.sleeps.append, **kwargs)  # type: ignore[arg-type]


def test_sent_first_time() -> None:
    relay = Relay(SENT)
    assert run(relay) == Outcome(True, 1, 250, "250 2.0.0 OK")
    assert relay.sleeps == []


def test_transient_is_retried_with_backoff_until_sent() -> None:
    relay = Relay(TEMP, TEMP, SENT)
    outcome = run(relay)
    assert outcome.sent and outcome.attempts == 3
    assert relay.sleeps == list(BACKOFF_SECONDS)


def test_permanent_is_never_retried() -> None:
    relay = Relay(PERM)
    outcome = run(relay)
    assert outcome == Outcome(False, 1, 550, "550 5.1.1 no such user", permanent=True)
    assert relay.calls == 1


def test_transient_gives_up_after_max_attempts() -> None:
    relay = Relay(*[TEMP] * MAX_ATTEMPTS)
    outcome = run(relay)
    assert not outcome.sent and not outcome.permanent
    assert outcome.attempts == MAX_ATTEMPTS == relay.calls
    assert outcome.smtp_code == 451


def test_ambiguous_attempts_are_counted_even_when_a_retry_succeeds() -> None:
    outcome = run(Relay(DROPPED, SENT))
    assert outcome.sent and outcome.ambiguous == 1 and outcome.attempts == 2


def test_no_attempt_starts_after_the_deadline() -> None:
    ticks = iter([0.0, 5.0, 11.0])
    relay = Relay(TEMP, TEMP, SENT)
    outcome = run(relay, deadline=10.0, clock=lambda: next(ticks))
    assert relay.calls == 2
    assert not outcome.sent and not outcome.permanent and outcome.attempts == 2
    assert "deadline" in outcome.detail and "451" in outcome.detail


def recipient() -> RecipientQueued:
    return RecipientQueued(
        campaign_id="c",
        contact_id="k",
        email="jane@example.org",
        template=MessageTemplate(subject="s", from_address="news@example.com"),
    )


def test_sent_event() -> None:
    event = delivery_event(recipient(), Outcome(True, 2, 250, "250 OK"), "<c.k@example.com>")
    assert event == EmailSent(
        campaign_id="c", contact_id="k", email="jane@example.org",
        message_id="<c.k@example.com>", attempt=2, smtp_reply="250 OK",
    )


def test_failed_event() -> None:
    event = delivery_event(recipient(), Outcome(False, 1, 550, "550 no", True), "<c.k@example.com>")
    assert event == EmailFailed(
        campaign_id="c", contact_id="k", email="jane@example.org",
        attempt=1, reason="550 no", permanent=True, smtp_code=550,
    )


def test_untried_failure_still_reports_attempt_one() -> None:
    event = delivery_event(recipient(), Outcome(False, 0, None, "deadline"), "<c.k@example.com>")
    assert isinstance(event, EmailFailed) and event.attempt == 1 and not event.permanent
