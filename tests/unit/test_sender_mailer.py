"""One attempt for one recipient, carried out against a fake transport (no SMTP server): the
check right before it decides whether the transport is used at all."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import cast

from confluent_kafka import Message

from schemas.envelope import wrap
from schemas.events import CampaignCancelled, CampaignPaused, MessageTemplate, RecipientQueued
from services.sender.control import ControlBoard
from services.sender.delivery import Status
from services.sender.do_not_mail import DoNotMailList
from services.sender.list_unsubscribe import ListUnsubscribe
from services.sender.mailer import SEND_BOUNDS, Mailer
from services.sender.mime import OutgoingMail
from services.sender.replies import Attempt, Verdict
from services.sender.retries import RetryPolicy
from services.sender.smtp_pool import NOT_TRIED
from services.sender.throttle import RateLimiter
from services.sender.work import Work

RECIPIENT = RecipientQueued(campaign_id="c1", contact_id="k1", email="k1@example.com",
                            template=MessageTemplate(subject="s", from_address="n@example.com",
                                                     body_text="hi"))


class FakeTransport:
    def __init__(self) -> None:
        self.mails: list[OutgoingMail] = []

    def server_for(self, sender: str) -> str:
        return "relay"

    def transmit(self, mail: OutgoingMail) -> Attempt:
        self.mails.append(mail)
        return Attempt(Verdict.SENT, 250, "2.0.0 Ok")

    def close(self) -> None:
        pass


def mailer(board: ControlBoard, transport: FakeTransport, limiter: RateLimiter | None = None,
           signer: ListUnsubscribe | None = None) -> Mailer:
    return Mailer(transport, board=board, do_not_mail=DoNotMailList(),
                  limiter=limiter or RateLimiter(), policy=RetryPolicy(),
                  list_unsubscribe=signer, bounds=SEND_BOUNDS)


def work() -> Work:
    envelope = wrap(RECIPIENT, tenant_id="acme", aggregate_id="c1")
    return Work(cast(Message, None), envelope, RECIPIENT, RECIPIENT, 1, datetime.now(UTC), None)


def test_a_recipient_of_a_sending_campaign_is_mailed_once_with_its_headers() -> None:
    transport = FakeTransport()
    signer = ListUnsubscribe(b"secret", "https://mail.example.com")
    outcome = mailer(ControlBoard(), transport, signer=signer).mail(work(), time.monotonic())
    assert (outcome.status, outcome.smtp_code) == (Status.SENT, 250)
    [mail] = transport.mails
    assert mail.recipient == "k1@example.com"
    assert b"List-Unsubscribe: <https://mail.example.com/unsubscribe?token=" in mail.content


def test_paused_or_cancelled_meanwhile_never_reaches_the_transport() -> None:
    board = ControlBoard()
    transport = FakeTransport()
    board.apply("c1", CampaignPaused(reason="x"))
    assert mailer(board, transport).mail(work(), time.monotonic()).status is Status.HELD
    board.apply("c1", CampaignCancelled(reason="x"))
    skipped = mailer(board, transport).mail(work(), time.monotonic())
    assert (skipped.status, skipped.detail) == (Status.SKIPPED, "cancelled")
    assert transport.mails == []


def test_past_the_batch_deadline_the_attempt_is_deferred_untried() -> None:
    transport = FakeTransport()
    started = time.monotonic() - SEND_BOUNDS.batch_deadline
    outcome = mailer(ControlBoard(), transport).mail(work(), started)
    assert outcome.status is Status.DEFERRED and transport.mails == []


def test_a_slot_too_far_off_goes_to_a_delay_topic_untried() -> None:
    transport = FakeTransport()
    limiter = RateLimiter(tenant_limits=(0.1,))  # one message per 10 s: the second waits
    first = mailer(ControlBoard(), transport, limiter).mail(work(), time.monotonic())
    second = mailer(ControlBoard(), transport, limiter).mail(work(), time.monotonic())
    assert first.status is Status.SENT
    assert second.status is Status.THROTTLED and second.retry_at is not None
    assert len(transport.mails) == 1


class GroupTransport(FakeTransport):
    """Records each call's mails (`transmit_many`, as SmtpPool and RelayRouter have it)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[str]] = []

    def transmit(self, mail: OutgoingMail) -> Attempt:
        self.calls.append([mail.recipient])
        return super().transmit(mail)

    def transmit_many(self, mails: list[OutgoingMail],
                      go: Callable[[int], bool] | None = None) -> list[Attempt]:
        self.calls.append([mail.recipient for mail in mails])
        return [NOT_TRIED.attempt if go is not None and not go(i) else self.carry(mail)
                for i, mail in enumerate(mails)]

    def carry(self, mail: OutgoingMail) -> Attempt:
        """One mail of a group on the wire."""
        return FakeTransport.transmit(self, mail)


def work_for(campaign: str, contact: str) -> Work:
    recipient = RECIPIENT.model_copy(update={"campaign_id": campaign, "contact_id": contact,
                                             "email": f"{contact}@example.com"})
    envelope = wrap(recipient, tenant_id="acme", aggregate_id=campaign)
    return Work(cast(Message, None), envelope, recipient, recipient, 1, datetime.now(UTC), None)


def test_a_group_goes_to_the_transport_together_without_the_recipients_stopped_by_the_check(
) -> None:
    board = ControlBoard()
    board.apply("paused", CampaignPaused(reason="x"))
    transport = GroupTransport()
    group = [work_for("c1", "a"), work_for("paused", "b"), work_for("c1", "c")]
    outcomes = mailer(board, transport).mail_many(group, time.monotonic())
    assert [o.status for o in outcomes] == [Status.SENT, Status.HELD, Status.SENT]
    assert transport.calls == [["a@example.com", "c@example.com"]]


class PausingTransport(GroupTransport):
    """Pauses campaign c1 on the board once its first mail went out (a pause arriving while
    the group is on the wire)."""

    def __init__(self, board: ControlBoard) -> None:
        super().__init__()
        self.board = board

    def carry(self, mail: OutgoingMail) -> Attempt:
        attempt = super().carry(mail)
        self.board.apply("c1", CampaignPaused(reason="operator"))
        return attempt


def test_a_pause_during_a_group_holds_back_its_mails_not_yet_sent() -> None:
    board = ControlBoard()
    transport = PausingTransport(board)
    group = [work_for("c1", "a"), work_for("c2", "b"), work_for("c1", "c"), work_for("c1", "d")]
    outcomes = mailer(board, transport).mail_many(group, time.monotonic())
    # Each mail is checked again right before its transaction: c1's later ones are held.
    assert [o.status for o in outcomes] == [Status.SENT, Status.SENT, Status.HELD, Status.HELD]
    assert [m.recipient for m in transport.mails] == ["a@example.com", "b@example.com"]


def test_a_group_past_the_batch_deadline_sends_nothing_more() -> None:
    transport = SlowTransport(0.06)
    # The batch started just under the deadline ago: the first check passes, and by the time
    # the later mails' turns come the deadline has passed.
    started = time.monotonic() - SEND_BOUNDS.batch_deadline + 0.05
    group = [work_for("c1", "a"), work_for("c1", "b"), work_for("c1", "c")]
    outcomes = mailer(ControlBoard(), transport).mail_many(group, started)
    assert outcomes[0].status is Status.SENT
    assert [o.status for o in outcomes[1:]] == [Status.DEFERRED, Status.DEFERRED]  # untried
    assert [m.recipient for m in transport.mails] == ["a@example.com"]


class SlowTransport(GroupTransport):
    """A group transport whose every transaction takes `seconds`."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def carry(self, mail: OutgoingMail) -> Attempt:
        time.sleep(self.seconds)
        return super().carry(mail)


def test_a_recipient_waiting_for_its_slot_sends_the_ones_before_it_first() -> None:
    transport = GroupTransport()
    limiter = RateLimiter(tenant_limits=(1.5,))  # the second booking waits about 0.3 s
    group = [work_for("c1", "a"), work_for("c1", "b")]
    outcomes = mailer(ControlBoard(), transport, limiter).mail_many(group, time.monotonic())
    assert [o.status for o in outcomes] == [Status.SENT, Status.SENT]
    # The first went out alone, before the wait: never held back, the second never early.
    assert transport.calls == [["a@example.com"], ["b@example.com"]]


def test_a_transport_without_groups_is_called_once_per_mail() -> None:
    transport = FakeTransport()
    group = [work_for("c1", "a"), work_for("c1", "b")]
    outcomes = mailer(ControlBoard(), transport).mail_many(group, time.monotonic())
    assert [o.status for o in outcomes] == [Status.SENT, Status.SENT]
    assert [m.recipient for m in transport.mails] == ["a@example.com", "b@example.com"]
