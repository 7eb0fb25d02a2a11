"""The sender's tracking and VERP marks: pure, on rendered content and ids (no transport)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import cast

import pytest
import structlog
from confluent_kafka import Message

from schemas.envelope import wrap
from schemas.events import MessageTemplate, RecipientQueued
from services.bounces.verp import VerpClaim, VerpKeys, read_address
from services.common.settings import SenderSettings
from services.engagement.tokens import Kind, TrackingKeys
from services.sender.control import ControlBoard
from services.sender.do_not_mail import DoNotMailList
from services.sender.list_unsubscribe import ListUnsubscribe
from services.sender.mailer import SEND_BOUNDS, Mailer
from services.sender.marks import MailMarks
from services.sender.mime import build_mail
from services.sender.render import render
from services.sender.retries import RetryPolicy
from services.sender.throttle import RateLimiter
from services.sender.work import Work
from tests.unit.test_sender_mailer import FakeTransport

TRACKER_KEYS = "k1:0123456789abcdef0123"
VERP_KEYS = "a:verp-secret-for-tests"
NOW = datetime(2026, 12, 7, 8, 0, tzinfo=UTC)
HTML = '<p>Hi</p><a href="https://shop.example.com/x">x</a><a href="mailto:a@b.c">m</a></body>'
TEXT = "Hi, see https://shop.example.com/x."


def recipient(opens: bool = False, clicks: bool = False, contact: str = "k1") -> RecipientQueued:
    return RecipientQueued(campaign_id="c1", contact_id=contact, email="k1@example.com",
                           template=MessageTemplate(subject="s", from_address="n@example.com",
                                                    body_text=TEXT, body_html=HTML,
                                                    track_opens=opens, track_clicks=clicks))


def marks(**env: str) -> MailMarks:
    settings = SenderSettings.model_validate({
        "public_api_url": "https://api.example.com", "tracker_public_url": "https://t.example.com",
        **env})
    return MailMarks.from_settings(settings)


def test_an_untracked_campaign_gets_its_content_back_unchanged() -> None:
    content = render(recipient())
    assert marks(tracker_keys=TRACKER_KEYS).content("acme", recipient(), content, NOW) is content


def test_a_tracked_campaign_gets_signed_links_and_a_pixel() -> None:
    queued = recipient(opens=True, clicks=True)
    tracked = marks(tracker_keys=TRACKER_KEYS).content("acme", queued, render(queued), NOW)
    assert tracked.html is not None and tracked.text is not None
    assert 'href="mailto:a@b.c"' in tracked.html and "shop.example.com" not in tracked.html
    keys = TrackingKeys.parse(TRACKER_KEYS)
    click = tracked.text.split("https://t.example.com/c/")[1].rstrip(".")
    claim = keys.verify(click)
    assert (claim.kind, claim.tenant_id, claim.campaign_id, claim.contact_id, claim.url) == (
        Kind.CLICK, "acme", "c1", "k1", "https://shop.example.com/x")
    assert claim.sent_at == int(NOW.timestamp())
    pixel = tracked.html.split("https://t.example.com/o/")[1].split(".gif")[0]
    assert keys.verify(pixel).kind is Kind.OPEN


def test_only_opens_asked_leaves_links_as_written() -> None:
    queued = recipient(opens=True)
    tracked = marks(tracker_keys=TRACKER_KEYS).content("acme", queued, render(queued), NOW)
    assert tracked.text == TEXT and 'href="https://shop.example.com/x"' in (tracked.html or "")
    assert "https://t.example.com/o/" in (tracked.html or "")


def test_tracking_asked_without_keys_sends_untracked_and_logs_once_per_campaign() -> None:
    queued = recipient(opens=True, clicks=True)
    without = marks()
    content = render(queued)
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            assert without.content("acme", queued, content, NOW) is content
    assert [entry["campaign_id"] for entry in logs] == ["c1"]


def test_verp_sender_reads_back_to_the_mail_and_falls_back_when_too_long() -> None:
    with_verp = marks(bounce_verp_keys=VERP_KEYS, bounce_domain="b.example.com")
    address = with_verp.envelope_sender("acme", recipient())
    assert address is not None and address.startswith("bounces+")
    claim = read_address(address, "b.example.com", VerpKeys.parse(VERP_KEYS))
    assert claim == VerpClaim("acme", "c1", "k1")
    assert with_verp.envelope_sender("acme", recipient(contact="x" * 40)) == "bounces@b.example.com"
    assert marks().envelope_sender("acme", recipient()) is None


@pytest.mark.parametrize(("env", "variable"), [
    ({"tracker_keys": "nocolon"}, "TRACKER_KEYS"),
    ({"bounce_verp_keys": "toolong:x"}, "BOUNCE_VERP_KEYS"),
])
def test_keys_that_cannot_sign_are_refused_naming_the_variable(env: dict[str, str],
                                                               variable: str) -> None:
    with pytest.raises(ValueError, match=variable):
        marks(**env)


def test_old_templates_without_the_flags_decode_untracked() -> None:
    template = MessageTemplate.model_validate({"subject": "s", "from_address": "n@example.com"})
    assert (template.track_opens, template.track_clicks) == (False, False)


def _mail_through(marks_: MailMarks | None, queued: RecipientQueued) -> tuple[str, EmailMessage]:
    transport = FakeTransport()
    mailer = Mailer(transport, board=ControlBoard(), do_not_mail=DoNotMailList(),
                    limiter=RateLimiter(), policy=RetryPolicy(),
                    list_unsubscribe=ListUnsubscribe(b"secret", "https://api.example.com"),
                    bounds=SEND_BOUNDS, marks=marks_)
    envelope = wrap(queued, tenant_id="acme", aggregate_id="c1")
    mailer.mail(Work(cast(Message, None), envelope, queued, queued, 1, NOW, None), time.monotonic())
    [mail] = transport.mails
    parsed = message_from_bytes(mail.content, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return mail.sender, parsed


def test_the_mailer_tracks_bodies_and_sets_the_return_path_but_no_header_changes() -> None:
    queued = recipient(opens=True, clicks=True)
    full = marks(tracker_keys=TRACKER_KEYS, bounce_verp_keys=VERP_KEYS, bounce_domain="b.example.com")
    sender, tracked = _mail_through(full, queued)
    plain_sender, plain = _mail_through(None, queued)
    assert sender.startswith("bounces+") and sender.endswith("@b.example.com")
    assert plain_sender == "n@example.com"
    for name in ("From", "Message-ID", "List-Unsubscribe", "Subject", "To"):
        assert tracked[name] == plain[name], name
    html_part = tracked.get_body(("html",))
    assert html_part is not None and "https://t.example.com/o/" in html_part.get_content()


def test_an_untracked_mail_is_byte_for_byte_the_mail_without_marks() -> None:
    queued = recipient()
    without = build_mail(queued, render(queued), NOW)
    with_marks = build_mail(queued, marks(tracker_keys=TRACKER_KEYS).content(
        "acme", queued, render(queued), NOW), NOW)
    assert with_marks == without


def test_the_flags_survive_the_wire_and_untracked_records_are_written_as_before() -> None:
    from schemas.envelope import decode, encode

    tracked = decode(encode(wrap(recipient(opens=True, clicks=True), tenant_id="acme",
                                 aggregate_id="k1"))).payload
    assert isinstance(tracked, RecipientQueued)
    assert (tracked.template.track_opens, tracked.template.track_clicks) == (True, True)
    assert b"track_" not in encode(wrap(recipient(), tenant_id="acme", aggregate_id="k1"))
