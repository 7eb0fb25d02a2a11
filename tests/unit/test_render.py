"""Rendering of campaign templates: placeholders, fallbacks, escaping, header safety."""

from __future__ import annotations

import re

import pytest

from schemas.events import MessageTemplate, RecipientQueued
from services.sender.render import header_safe, parse, render, render_text


def recipient(**overrides: object) -> RecipientQueued:
    template = overrides.pop("template", None) or MessageTemplate(
        subject="Hello {{ first_name }}",
        from_address="news@example.com",
        body_text="Hi {{ first_name }} {{ last_name }}",
        body_html="<p>Hi {{ first_name }}</p>",
    )
    fields: dict[str, object] = {
        "campaign_id": "c-1",
        "contact_id": "k-1",
        "email": "jane@example.org",
        "first_name": "Jane",
        "last_name": "Doe",
        "attributes": {"city": "Zürich", "plan": "gold"},
        "template": template,
    }
    fields.update(overrides)
    return RecipientQueued.model_validate(fields)


def template(subject: str = "s", text: str | None = None, html: str | None = None) -> MessageTemplate:
    return MessageTemplate(
        subject=subject, from_address="news@example.com", body_text=text, body_html=html
    )


FIELDS = {"first_name": "Jane", "last_name": "", "email": "jane@example.org", "attr.city": "Zürich"}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("Hi {{ first_name }}!", "Hi Jane!"),
        ("Hi {{first_name}}!", "Hi Jane!"),
        ("{{ email }}", "jane@example.org"),
        ("from {{ attr.city }}", "from Zürich"),
        ('{{ last_name | "friend" }}', "friend"),
        ("{{ last_name | 'friend' }}", "friend"),
        ('{{ first_name | "friend" }}', "Jane"),
        ("[{{ last_name }}]", "[]"),
        ("[{{ nickname }}]", "[]"),
        ('{{ nickname | "pal" }}', "pal"),
        ('{{ attr.missing | "n/a" }}', "n/a"),
        ("{{ attr.missing }}", ""),
        ("no placeholders", "no placeholders"),
        ("{{ }} and {{ unclosed", "{{ }} and {{ unclosed"),
        ("{{ first_name }}{{ first_name }}", "JaneJane"),
        ('{{ first_name | "a | b" }}', "Jane"),
    ],
)
def test_placeholders_and_fallbacks(source: str, expected: str) -> None:
    assert render_text(source, FIELDS) == expected


def test_whitespace_only_value_takes_the_fallback() -> None:
    assert render_text('{{ first_name | "there" }}', {"first_name": "   "}) == "there"


def test_parse_is_cached_per_template() -> None:
    assert parse("Hi {{ first_name }}") is parse("Hi {{ first_name }}")


def test_render_fills_subject_text_and_html() -> None:
    content = render(recipient())
    assert content.subject == "Hello Jane"
    assert content.text == "Hi Jane Doe"
    assert content.html == "<p>Hi Jane</p>"


def test_missing_bodies_stay_missing() -> None:
    content = render(recipient(template=template("only a subject")))
    assert (content.text, content.html) == (None, None)


def test_attributes_render_in_every_part() -> None:
    t = template("{{ attr.plan }} plan", "City: {{ attr.city }}", "<b>{{ attr.city }}</b>")
    content = render(recipient(template=t))
    assert content.subject == "gold plan"
    assert content.text == "City: Zürich"
    assert content.html == "<b>Zürich</b>"


def test_html_values_are_escaped_but_template_markup_is_not() -> None:
    t = template(html='<p class="x">Hi {{ first_name }} {{ attr.bio | "<i>none</i>" }}</p>')
    content = render(recipient(first_name='<script>alert("x")</script>&', template=t))
    assert content.html == (
        '<p class="x">Hi &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp; '
        "&lt;i&gt;none&lt;/i&gt;</p>"
    )


def test_text_body_is_not_escaped() -> None:
    content = render(recipient(first_name="<Jane & co>", template=template(text="{{ first_name }}")))
    assert content.text == "<Jane & co>"


def test_subject_never_carries_line_breaks_or_controls() -> None:
    t = template("Hi {{ first_name }} {{ attr.x }}")
    content = render(
        recipient(first_name="Jane\r\nBcc: victim@example.com", attributes={"x": "a\nb\x00c\td"},
                  template=t)
    )
    assert "\r" not in content.subject and "\n" not in content.subject
    assert "\x00" not in content.subject
    assert content.subject == "Hi Jane Bcc: victim@example.com a bc\td"


def test_header_safe_strips_breaks_and_trims() -> None:
    assert header_safe("  a\r\n\r\nb\rc\nd\x7f ") == "a b c d"


def test_body_keeps_line_breaks_from_values() -> None:
    content = render(recipient(attributes={"x": "line1\nline2"}, template=template(text="{{ attr.x }}")))
    assert content.text == "line1\nline2"


@pytest.mark.parametrize("value", ["Ada", "  Ada  ", "a\tb", "a\r\nb", "a\x00b\x7f", "\u2028x",
                                   "x\x85y", "Jos\u00e9", "", " ", "\u00a0nbsp\u00a0"])
def test_header_safe_is_the_same_with_and_without_its_shortcut(value: str) -> None:
    slow = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", re.sub(r"[\r\n]+", " ", value)).strip()
    assert header_safe(value) == slow
