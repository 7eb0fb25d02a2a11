"""Per-recipient rendering of a campaign template. Pure: values in, strings out, no I/O.

Placeholders: `{{ first_name }}`, `{{ last_name }}`, `{{ email }}` and `{{ attr.KEY }}` (a
contact attribute), each with an optional fallback, `{{ first_name | "there" }}`, used when
the value is missing, empty or only whitespace. An unknown placeholder renders as its
fallback, or as nothing. Text that only looks like a placeholder (`{{ }}`, an unclosed `{{`)
is left as written.

Guarantees:
- Whatever a placeholder produces (contact value or fallback) is HTML-escaped in the HTML
  body, so contact data can never inject markup or script into a mail.
- The subject carries no CR, LF or other control character, whatever the contact data holds,
  so a rendered value can never inject a header.
- Rendering never raises for any recipient: a missing value is the fallback, not an error.
"""

from __future__ import annotations

import functools
import html
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from schemas.events import RecipientQueued

# `{{ name }}`, `{{ attr.KEY }}`, optionally `| "fallback"` or `| 'fallback'`.
_PLACEHOLDER = re.compile(
    r"\{\{\s*"
    r"(?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[^\s|{}]+)?)"
    r"\s*(?:\|\s*(?:\"(?P<dq>[^\"]*)\"|'(?P<sq>[^']*)')\s*)?"
    r"\}\}"
)
# Header values: line breaks become one space (keeps "Jane\nDoe" readable), every other
# control character goes; a CR or LF in a header is how header injection starts.
_LINE_BREAKS = re.compile(r"[\r\n]+")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_ATTRIBUTE_PREFIX = "attr."


@dataclass(frozen=True)
class Placeholder:
    name: str
    fallback: str


Segment = str | Placeholder


@dataclass(frozen=True)
class RenderedContent:
    """The personalised parts of one mail."""

    subject: str
    text: str | None
    html: str | None


@functools.lru_cache(maxsize=1024)
def parse(source: str) -> tuple[Segment, ...]:
    """Split a template into literal text and placeholders (cached: one campaign renders the
    same few templates for every recipient)."""
    segments: list[Segment] = []
    position = 0
    for match in _PLACEHOLDER.finditer(source):
        if match.start() > position:
            segments.append(source[position : match.start()])
        fallback = match.group("dq") if match.group("dq") is not None else match.group("sq")
        segments.append(Placeholder(match.group("name"), fallback or ""))
        position = match.end()
    if position < len(source):
        segments.append(source[position:])
    return tuple(segments)


def recipient_fields(recipient: RecipientQueued) -> dict[str, str]:
    """The values placeholders can name, attributes under `attr.`."""
    fields = {
        "first_name": recipient.first_name,
        "last_name": recipient.last_name,
        "email": recipient.email,
    }
    for key, value in recipient.attributes.items():
        fields[_ATTRIBUTE_PREFIX + key] = value
    return fields


def render_text(
    source: str, fields: Mapping[str, str], escape: Callable[[str], str] = str
) -> str:
    """Fill every placeholder of `source`; `escape` is applied to what placeholders produce."""
    parts: list[str] = []
    for segment in parse(source):
        if isinstance(segment, str):
            parts.append(segment)
            continue
        value = fields.get(segment.name, "")
        if not value.strip():
            value = segment.fallback
        parts.append(escape(value))
    return "".join(parts)


def header_safe(value: str) -> str:
    """A value fit for a header line: no CR/LF (each run becomes a space), no controls."""
    if value.isprintable():  # no CR, LF or control at all: the common case, without a regex
        return value.strip()
    return _CONTROLS.sub("", _LINE_BREAKS.sub(" ", value)).strip()


def _html_escape(value: str) -> str:
    return html.escape(value, quote=True)


def render(recipient: RecipientQueued) -> RenderedContent:
    """Subject, text body and HTML body of the recipient's template, personalised."""
    template = recipient.template
    fields = recipient_fields(recipient)
    return RenderedContent(
        subject=header_safe(render_text(template.subject, fields, header_safe)),
        text=render_text(template.body_text, fields) if template.body_text is not None else None,
        html=(
            render_text(template.body_html, fields, _html_escape)
            if template.body_html is not None
            else None
        ),
    )
