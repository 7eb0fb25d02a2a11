"""A rendered mail's bodies with tracking: links through signed redirects, an open pixel.

`track_bodies(html, text, ...)` is the one call a sender makes per recipient, after
rendering. Pure: strings and ids in, strings out.

Guarantees:
- Only `<a href>` links with an absolute http(s) URL are rewritten, each to
  `<tracker>/c/<token>` whose signed token carries the URL as written; mailto:, tel:,
  anchors, relative and other links, links of the tracker itself, links under a
  `keep_prefixes` entry (our one-click unsubscribe page) and links carrying
  `data-no-track` are left exactly as they were, as is every other byte of the HTML outside
  the rewritten tags. The HTML is read by the standard library's HTML parser, so text that
  merely looks like a tag (in a comment, a script, an attribute) is never touched.
- Each distinct URL is one link of the mail: its index is the order of first appearance
  (HTML first, then the text body), the same token at each occurrence, so "every link
  clicked at once" counts distinct links.
- The open pixel (`<tracker>/o/<token>.gif`, 1x1) goes before the HTML body's last
  `</body>`, or at its end when it has none. A text-only mail has no pixel.
- The text body's URLs are rewritten only when asked (`text_links`): bare http(s) URLs,
  trailing sentence punctuation left outside the link.
- A URL no token may carry (over the length bound, non-ASCII) stays as written.
"""

from __future__ import annotations

import html as html_escape
import re
from collections.abc import Sequence
from dataclasses import dataclass
from html.parser import HTMLParser

from services.common.settings import TrackerSettings
from services.engagement.tokens import TrackingKeys, trackable_url

PIXEL_PATH = "/o/{token}.gif"
CLICK_PATH = "/c/{token}"
# Text bodies are not HTML: a URL there is a run of characters a URL may hold.
_TEXT_URL = re.compile(r"https?://[^\s<>\"'()\[\]{}]+", re.IGNORECASE)
# Sentence punctuation right after a URL in prose is not part of it.
_TRAILING = ".,;:!?"
_SCHEMES = ("http://", "https://")


@dataclass(frozen=True)
class TrackingSite:
    """Where the tracker answers and how it signs: the same for every mail of a sender.
    `keep_prefixes`: URLs under these stay as written (the one-click unsubscribe page)."""

    keys: TrackingKeys
    base_url: str
    keep_prefixes: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, tracker: TrackerSettings, public_api_url: str) -> TrackingSite | None:
        """The site of TRACKER_KEYS and TRACKER_PUBLIC_URL, keeping the one-click unsubscribe
        page under `public_api_url` as it is; None without keys (tracking off). ValueError
        for keys that cannot sign."""
        text = tracker.tracker_keys.get_secret_value()
        if not text.strip():
            return None
        return cls(TrackingKeys.parse(text), tracker.tracker_public_url,
                   (public_api_url.rstrip("/") + "/unsubscribe",))

    def keeps(self, url: str) -> bool:
        own = self.base_url.rstrip("/") + "/"
        return url.startswith((own, *self.keep_prefixes))


@dataclass(frozen=True)
class TrackedBodies:
    """The bodies to mail, and the tracked links in index order."""

    html: str | None
    text: str | None
    links: tuple[str, ...]


def track_bodies(
    html: str | None, text: str | None, *, site: TrackingSite, tenant_id: str,
    campaign_id: str, contact_id: str, sent_at: int, opens: bool, clicks: bool,
    text_links: bool = False,
) -> TrackedBodies:
    """The bodies with the campaign's tracking (see the module docstring); `sent_at` (Unix
    seconds) goes into every token, so the tracker can tell a click right after delivery."""
    parsed = _parsed(html) if html is not None and (opens or clicks) else None
    html_links = _anchors(parsed, site) if parsed is not None and clicks else []
    text_spans = _text_urls(text, site) if text is not None and clicks and text_links else []
    links = tuple(dict.fromkeys([url for _, _, url, _ in html_links]
                                + [url for _, _, url in text_spans]))
    base = site.base_url.rstrip("/")
    tokens = {
        url: base + CLICK_PATH.format(token=site.keys.sign_click(
            tenant_id, campaign_id, contact_id, sent_at=sent_at, link_index=index,
            links_in_mail=len(links), url=url))
        for index, url in enumerate(links)
    }
    edits: list[tuple[int, int, str]] = [
        (start, end, _tag_with_href(attrs, tokens[url])) for start, end, url, attrs in html_links
    ]
    if html is not None and parsed is not None and opens:
        pixel_at = len(html) if parsed.body_end is None else parsed.body_end
        token = site.keys.sign_open(tenant_id, campaign_id, contact_id, sent_at=sent_at)
        src = html_escape.escape(base + PIXEL_PATH.format(token=token), quote=True)
        edits.append((pixel_at, pixel_at, f'<img src="{src}" width="1" height="1" alt="" '
                                          'style="border:0;width:1px;height:1px" />'))
    new_html = _spliced(html, edits) if html is not None else None
    new_text = (_spliced(text, [(s, e, tokens[url]) for s, e, url in text_spans])
                if text is not None else None)
    return TrackedBodies(new_html, new_text, links)


Attributes = list[tuple[str, str | None]]


class _AnchorFinder(HTMLParser):
    """Start offsets and raw lengths of `<a>` tags, their attributes, and where the last
    `</body>` starts."""

    def __init__(self, source: str) -> None:
        super().__init__(convert_charrefs=True)
        self._line_starts = [0] + [m.end() for m in re.finditer("\n", source)]
        self.anchors: list[tuple[int, int, Attributes]] = []
        self.body_end: int | None = None

    def _offset(self) -> int:
        line, column = self.getpos()
        return self._line_starts[line - 1] + column

    def handle_starttag(self, tag: str, attrs: Attributes) -> None:
        if tag == "a":
            start = self._offset()
            raw = self.get_starttag_text() or ""
            self.anchors.append((start, start + len(raw), attrs))

    def handle_endtag(self, tag: str) -> None:
        if tag == "body":
            self.body_end = self._offset()


def _parsed(source: str) -> _AnchorFinder:
    finder = _AnchorFinder(source)
    finder.feed(source)
    finder.close()
    return finder


def _anchors(parsed: _AnchorFinder, site: TrackingSite) -> list[tuple[int, int, str, Attributes]]:
    """The `<a>` tags to rewrite: (start, end, URL, attributes)."""
    found = []
    for start, end, attrs in parsed.anchors:
        names = [name for name, _ in attrs]
        if "data-no-track" in names or names.count("href") != 1:
            continue  # a second href is ambiguous: which one a client follows varies
        url = (dict(attrs)["href"] or "").strip()
        if _tracked(url, site):
            found.append((start, end, url, attrs))
    return found


def _tracked(url: str, site: TrackingSite) -> bool:
    return url.lower().startswith(_SCHEMES) and trackable_url(url) and not site.keeps(url)


def _tag_with_href(attrs: Attributes, href: str) -> str:
    parts = ["<a"]
    for name, value in attrs:
        if name == "href":
            value = href
        parts.append(f" {name}" if value is None
                     else f' {name}="{html_escape.escape(value, quote=True)}"')
    return "".join(parts) + ">"


def _text_urls(text: str, site: TrackingSite) -> list[tuple[int, int, str]]:
    found = []
    for match in _TEXT_URL.finditer(text):
        url = match.group().rstrip(_TRAILING)
        if _tracked(url, site):
            found.append((match.start(), match.start() + len(url), url))
    return found


def _spliced(source: str, edits: Sequence[tuple[int, int, str]]) -> str:
    """`source` with each (start, end) span replaced; spans never overlap."""
    out, at = [], 0
    for start, end, replacement in sorted(edits, key=lambda e: (e[0], e[1])):
        out += [source[at:start], replacement]
        at = end
    out.append(source[at:])
    return "".join(out)
