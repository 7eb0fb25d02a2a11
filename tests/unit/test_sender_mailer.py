"""One attempt for one recipient, carried out against a fake transport (no SMTP server): the
check right before it decides whether the transport is used at all."""

from __future__ import annotations

import time
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
