"""The message bytes: MIME structure, headers, deterministic Message-ID, encodings."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import format_datetime, formataddr

import pytest

from schemas.events import MessageTemplate, RecipientQueued
from services.sender.mime import (
    _date_line,
    _mailbox,
    build_mail,
    encoded_words,
    message_id_for,
    unstructured,
)
from services.sender.render import header_safe, render

NOW = datetime(2026, 3, 1, 12, 30, tzinfo=UTC)


def recipient(
    subject: str = "Hello {{ first_name }}",
    text: str | None = "Hi {{ first_name }}",
    html: str | None = "<p>Hi {{ first_name }}</p>",
    **overrides: object,
) -> RecipientQueued:
    fields: dict[str, object] = {
        "campaign_id": "cmp-42",
        "contact_id": "ct-7",
        "email": "jane@example.org",
        "first_name": "Jane",
        "last_name": "Doe",
        "template": MessageTemplate(
            subject=subject, from_address="news@Mail.Example.com", body_text=text, body_html=html
        ),
    }
    fields.update(overrides)
    return RecipientQueued.model_validate(fields)


def body(msg: EmailMessage, subtype: str) -> str:
    """A part's text with line ends as Python writes them (the wire form uses CRLF)."""
    part = msg.get_body((subtype,))
    assert part is not None
    return str(part.get_content()).replace("\r\n", "\n")


def build(r: RecipientQueued, now: datetime = NOW) -> tuple[bytes, EmailMessage]:
    mail = build_mail(r, render(r), now)
    parsed = message_from_bytes(mail.content, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return mail.content, parsed


def test_text_and_html_make_multipart_alternative() -> None:
    _, msg = build(recipient())
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert body(msg, "plain") == "Hi Jane\n"
    assert body(msg, "html") == "<p>Hi Jane</p>\n"
    assert not msg.defects and all(not p.defects for p in parts)


def test_text_only_is_a_single_text_plain_part() -> None:
    _, msg = build(recipient(html=None))
    assert msg.get_content_type() == "text/plain"
    assert not msg.is_multipart()
    assert body(msg, "plain") == "Hi Jane\n"
    assert msg.get_content_charset() == "utf-8"


def test_html_only_gets_a_plain_part_derived_from_it() -> None:
    html = "<html><head><style>p{}</style></head><p>Hi {{ first_name }}</p><p>A &amp; B<br>C</p>"
    _, msg = build(recipient(text=None, html=html))
    assert msg.get_content_type() == "multipart/alternative"
    assert body(msg, "plain") == "Hi Jane\nA & B\nC\n"


def test_no_body_at_all_is_an_empty_text_part() -> None:
    _, msg = build(recipient(text=None, html=None))
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content().strip() == ""


def test_headers() -> None:
    _, msg = build(recipient())
    assert msg["From"] == "news@mail.example.com"  # domain normalised by the schema
    assert msg["To"] == "Jane Doe <jane@example.org>"
    assert msg["To"].addresses[0].addr_spec == "jane@example.org"
    assert msg["Subject"] == "Hello Jane"
    assert msg["Message-ID"] == "<cmp-42.ct-7@mail.example.com>"
    assert msg["X-Campaign-ID"] == "cmp-42"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Date"].datetime == NOW


def test_to_without_a_name_is_the_bare_address() -> None:
    _, msg = build(recipient(first_name="", last_name=""))
    assert msg["To"] == "jane@example.org"


def test_message_id_is_deterministic_per_campaign_and_contact() -> None:
    a = build_mail(recipient(), render(recipient()), NOW)
    b = build_mail(recipient(), render(recipient()), NOW + timedelta(hours=1))
    other = recipient(contact_id="ct-8")
    c = build_mail(other, render(other), NOW)
    assert a.message_id == b.message_id == "<cmp-42.ct-7@mail.example.com>"
    assert c.message_id == "<cmp-42.ct-8@mail.example.com>"
    assert message_id_for("c", "k", "x@y.org") == "<c.k@y.org>"


def test_message_id_escapes_colons_that_ids_may_hold() -> None:
    r = recipient(campaign_id="tenant:cmp", contact_id="a:b")
    _, msg = build(r)
    assert msg["Message-ID"] == "<tenant=3Acmp.a=3Ab@mail.example.com>"


def test_same_inputs_same_bytes() -> None:
    assert build(recipient())[0] == build(recipient())[0]


def test_date_keeps_the_given_offset() -> None:
    tz = timezone(timedelta(hours=2))
    _, msg = build(recipient(), now=datetime(2026, 3, 1, 14, 30, tzinfo=tz))
    assert msg["Date"].datetime == NOW


def test_wire_form_is_crlf_ascii_with_short_header_lines() -> None:
    long_subject = "Grüße aus Zürich, {{ first_name }}! " + "Lots of news inside. " * 20
    raw, msg = build(
        recipient(subject=long_subject, first_name="Zoë", text="Ünïcödé\nline two", html="<p>ü</p>")
    )
    assert b"\n" not in raw.replace(b"\r\n", b"")
    head, _, _ = raw.partition(b"\r\n\r\n")
    assert head.isascii()
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    assert msg["Subject"] == render(recipient(subject=long_subject, first_name="Zoë")).subject
    assert msg["To"].addresses[0].display_name == "Zoë Doe"
    assert body(msg, "plain") == "Ünïcödé\nline two\n"


def test_long_ascii_subject_is_folded_at_spaces_not_encoded() -> None:
    subject = "word " * 40 + "end"
    raw, msg = build(recipient(subject=subject))
    assert b"=?utf-8?" not in raw.partition(b"\r\n\r\n")[0]
    assert msg["Subject"] == subject


def test_values_cannot_inject_headers() -> None:
    _, msg = build(
        recipient(first_name="Jane\r\nBcc: victim@example.com", subject="Hi {{ first_name }}")
    )
    assert msg["Bcc"] is None
    assert msg["Subject"] == "Hi Jane Bcc: victim@example.com"
    assert msg["To"].addresses[0].addr_spec == "jane@example.org"


def test_name_with_specials_is_quoted() -> None:
    _, msg = build(recipient(first_name="Doe,", last_name="<Jane>"))
    assert msg["To"].addresses[0].display_name == "Doe, <Jane>"
    assert msg["To"].addresses[0].addr_spec == "jane@example.org"


def test_boundary_cannot_occur_in_quoted_printable_bodies() -> None:
    raw, msg = build(recipient(text="=_ trick --=_abc", html="<p>=_</p>"))
    boundary = msg.get_boundary()
    assert boundary is not None and boundary.startswith("=_")
    assert body(msg, "plain") == "=_ trick --=_abc\n"
    assert raw.count(boundary.encode()) == 4  # header, two delimiters, the close


def test_lines_starting_with_a_dot_are_left_for_the_smtp_layer() -> None:
    raw, msg = build(recipient(text=".\n.hidden", html=None))
    assert body(msg, "plain") == ".\n.hidden\n"
    assert re.search(rb"\r\n\.hidden\r\n", raw)  # dot-stuffing is the transport's job


def test_encoded_words_respect_the_length_limit_and_split_on_characters() -> None:
    words = encoded_words("ü" * 100 + "😀" * 30)
    assert all(len(w) <= 75 for w in words)
    assert unstructured("short") == "short"


# Names and addresses the To fast path must write exactly as formataddr does (or leave to it).
_NAMES = ["Ada Lovelace", "Ada", "O'Brien", "Jane Q. Public", 'Ann "Nan" Lee', "Doe, John",
          "a\\b", "[x]", "x@y", "tab\there", "José", "李 雷", "  padded  ", "#!$%&*+-/=?^_`{|}~"]
_ADDRESSES = ["ada@example.com", "jos\u00e9@example.com"]


def test_to_is_written_as_formataddr_writes_it() -> None:
    for name in _NAMES:
        for address in _ADDRESSES:
            clean = header_safe(name)
            if not clean.isascii():
                continue  # encoded words: not formataddr's job here
            try:
                expected = formataddr((clean, address))
            except UnicodeEncodeError:
                with pytest.raises(UnicodeEncodeError):
                    _mailbox(name, address)
                continue
            assert _mailbox(name, address) == expected, (name, address)


def test_date_line_follows_every_second_and_offset() -> None:
    base = datetime(2026, 3, 1, 9, 0, 0, 999_999, tzinfo=UTC)
    times = [base, base + timedelta(microseconds=1), base + timedelta(seconds=1),
             base.astimezone(timezone(timedelta(hours=2))), base, base.replace(tzinfo=None),
             base - timedelta(days=30000)]
    for when in times:
        assert _date_line(when) == f"Date: {format_datetime(when.replace(microsecond=0))}\r\n".encode()
