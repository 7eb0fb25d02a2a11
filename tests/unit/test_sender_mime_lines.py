"""The MIME builder's lines written once (per campaign, per second) are the lines it would
write for each mail: the Date of every mail is exactly format_datetime of its own time, and
the From / X-Campaign-ID lines follow the campaign."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime

from schemas.events import MessageTemplate, RecipientQueued
from services.sender.mime import build_mail, message_id_for
from services.sender.render import render

TEMPLATE = MessageTemplate(subject="Hi {{ first_name }}", from_address="news@example.org",
                           body_text="Hello {{ first_name }}\n")


def recipient(campaign: str = "cmp-1", contact: str = "c1",
              template: MessageTemplate = TEMPLATE) -> RecipientQueued:
    return RecipientQueued(campaign_id=campaign, contact_id=contact, email="p@example.org",
                           first_name="Ada", template=template)


def header(content: bytes, name: str) -> str:
    for line in content.split(b"\r\n"):
        if line.startswith(name.encode() + b": "):
            return line.split(b": ", 1)[1].decode()
    raise AssertionError(f"no {name} header")


def date_of(now: datetime) -> str:
    r = recipient()
    return header(build_mail(r, render(r), now).content, "Date")


def test_the_date_is_format_datetime_of_each_mails_own_time() -> None:
    base = datetime(2026, 11, 30, 14, 0, 5, 100, tzinfo=UTC)
    times = [base, base.replace(microsecond=999_999), base + timedelta(seconds=1),
             base.astimezone(timezone(timedelta(hours=2))),  # the same instant, another zone
             base.astimezone(timezone(timedelta(hours=-5, minutes=-30))),
             base.replace(tzinfo=None),  # naive: "-0000"
             base.replace(tzinfo=None, microsecond=7)]
    for now in times * 2:  # the second pass reads what the first one wrote
        assert date_of(now) == format_datetime(now), now
    assert len({date_of(now) for now in times}) == 5


def test_from_and_campaign_lines_follow_each_campaign() -> None:
    other = MessageTemplate(subject="x", from_address="hello@mail.example.com", body_text="x")
    now = datetime.now(UTC)
    for campaign, template in [("cmp-1", TEMPLATE), ("cmp-2", TEMPLATE), ("cmp-1", other),
                               ("cmp-1", TEMPLATE)]:
        r = recipient(campaign, template=template)
        mail = build_mail(r, render(r), now)
        assert header(mail.content, "From") == template.from_address
        assert header(mail.content, "X-Campaign-ID") == campaign
        assert header(mail.content, "Message-ID") == message_id_for(
            campaign, "c1", template.from_address)


def test_header_order_is_unchanged() -> None:
    r = recipient()
    mail = build_mail(r, render(r), datetime.now(UTC), [("List-Unsubscribe", "<http://x/u>")])
    names = [line.split(b":")[0].decode() for line in mail.content.split(b"\r\n\r\n")[0].split(b"\r\n")]
    assert names == ["From", "To", "Subject", "Message-ID", "Date", "MIME-Version",
                     "X-Campaign-ID", "List-Unsubscribe", "Content-Type",
                     "Content-Transfer-Encoding"]


def test_message_id_escapes_colons() -> None:
    assert message_id_for("cmp:1", "ct:2", "a@example.org") == "<cmp=3A1.ct=3A2@example.org>"
