"""Rewriting a rendered mail for tracking: which links become signed redirects, where the
pixel goes, and that nothing else of the HTML changes."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.settings import TrackerSettings
from services.engagement.rewrite import TrackedBodies, TrackingSite, track_bodies
from services.engagement.tokens import Kind, TrackingKeys

KEYS = TrackingKeys([("k1", b"rewrite-test-secret-0123456789ab")])
TRACKER = "https://t.example"
UNSUBSCRIBE = "https://api.example/unsubscribe"
SITE = TrackingSite(KEYS, TRACKER + "/", keep_prefixes=(UNSUBSCRIBE,))
TRACKED = re.compile(re.escape(TRACKER) + r"/c/([A-Za-z0-9_.-]+)")


def tracked(html: str | None = None, text: str | None = None, *, opens: bool = True,
            clicks: bool = True, text_links: bool = False) -> TrackedBodies:
    return track_bodies(html, text, site=SITE, tenant_id="acme", campaign_id="camp-1",
                        contact_id="c-7", sent_at=1_800_000_000, opens=opens, clicks=clicks,
                        text_links=text_links)


class Hrefs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "a" and values.get("href") is not None:
            self.hrefs.append(values["href"] or "")
        if tag == "img":
            self.images.append(values.get("src") or "")


def parsed(html: str) -> Hrefs:
    parser = Hrefs()
    parser.feed(html)
    parser.close()
    return parser


def claim_of(url: str):  # noqa: ANN201 - a TrackingClaim
    match = TRACKED.fullmatch(url)
    assert match, url
    return KEYS.verify(match.group(1))


def test_http_links_become_signed_redirects_to_the_same_url() -> None:
    html = ('<p><a href="https://shop.example/a?x=1&amp;y=2" class="big">Shop</a>'
            ' <a href="HTTP://old.example/">Old</a></p>')
    out = tracked(html, opens=False)
    hrefs = parsed(out.html or "").hrefs
    claims = [claim_of(h) for h in hrefs]
    assert [c.url for c in claims] == ["https://shop.example/a?x=1&y=2", "HTTP://old.example/"]
    assert [(c.kind, c.link_index, c.links_in_mail) for c in claims] == [(Kind.CLICK, 0, 2), (Kind.CLICK, 1, 2)]
    assert {(c.tenant_id, c.campaign_id, c.contact_id, c.sent_at) for c in claims} == {
        ("acme", "camp-1", "c-7", 1_800_000_000)}
    assert 'class="big">Shop</a>' in (out.html or "")
    assert out.links == ("https://shop.example/a?x=1&y=2", "HTTP://old.example/")


@pytest.mark.parametrize("href", [
    "mailto:ann@example.com", "tel:+4930123", "#top", "/relative/path", "javascript:alert(1)",
    f"{UNSUBSCRIBE}?token=abc", f"{TRACKER}/c/already", "ftp://files.example/", "",
    "https://bücher.example/", "https://x.example/" + "a" * 3000,
])
def test_other_links_stay_exactly_as_written(href: str) -> None:
    html = f'<body><a href="{href}">x</a></body>'
    out = tracked(html, opens=False)
    assert out.html == html and out.links == ()


def test_opt_outs_and_ambiguous_anchors_stay_as_written() -> None:
    html = ('<a data-no-track href="https://a.example/">a</a>'
            '<a href="https://b.example/" href="https://c.example/">b</a><a name="x">anchor</a>')
    assert tracked(html, opens=False).html == html


def test_things_that_only_look_like_links_are_not_touched() -> None:
    html = ('<!-- <a href="https://hidden.example/">old</a> -->'
            '<script>var s = "<a href=\\"https://script.example/\\">";</script>'
            '<p title="<a href=https://attr.example/>">text</p>'
            '<a href="https://real.example/">real</a>')
    out = tracked(html, opens=False)
    assert out.links == ("https://real.example/",)
    before, after = html.split('<a href="https://real.example/">')
    assert (out.html or "").startswith(before) and (out.html or "").endswith(after)


def test_every_byte_outside_the_rewritten_tags_is_kept() -> None:
    html = ('<!DOCTYPE html>\r\n<html>\n <body style="x">\n  <p>Hi&nbsp;{{ name }}</p>\n'
            '  <A HREF=https://x.example/one TARGET=_blank>one</A>\n'
            '  <a href=\'https://x.example/two\'/>\n </body>\n</html>\n')
    out = tracked(html, opens=False).html or ""
    skeleton = TRACKED.sub("URL", re.sub(r"<a [^>]*>", "<a>", out, flags=re.I))
    assert skeleton == re.sub(r"<a [^>]*>", "<a>", html, flags=re.I)
    assert len(parsed(out).hrefs) == 2


def test_the_same_url_twice_is_one_link_with_one_token() -> None:
    html = '<a href="https://x.example/">1</a><a href="https://y.example/">2</a><a href="https://x.example/">3</a>'
    hrefs = parsed(tracked(html, opens=False).html or "").hrefs
    assert hrefs[0] == hrefs[2] != hrefs[1]
    assert [claim_of(h).link_index for h in hrefs] == [0, 1, 0]
    assert {claim_of(h).links_in_mail for h in hrefs} == {2}


def test_the_pixel_goes_before_the_last_body_end_or_at_the_end() -> None:
    out = tracked('<html><body><p>x</p></body></html>', clicks=False)
    assert out.html is not None
    assert re.fullmatch(r'<html><body><p>x</p><img src="[^"]+" width="1" height="1" alt="" '
                        r'style="[^"]+" /></body></html>', out.html)
    [src] = parsed(out.html).images
    match = re.fullmatch(re.escape(TRACKER) + r"/o/([A-Za-z0-9_.-]+)\.gif", src)
    assert match
    assert KEYS.verify(match.group(1)).kind is Kind.OPEN
    bare = tracked("<p>no body tag</p>", clicks=False).html or ""
    assert bare.startswith("<p>no body tag</p><img ")


def test_nothing_changes_without_tracking_and_text_only_mail_has_no_pixel() -> None:
    html = '<body><a href="https://x.example/">x</a></body>'
    assert tracked(html, "see https://x.example/", opens=False, clicks=False) == TrackedBodies(
        html, "see https://x.example/", ())
    assert tracked(None, "plain text", clicks=False) == TrackedBodies(None, "plain text", ())


def test_text_links_only_when_asked_punctuation_left_outside() -> None:
    text = "Shop now: https://shop.example/a?b=1. Or (https://two.example/x)! Leave: " + UNSUBSCRIBE + "?t=1"
    assert tracked(None, text).text == text
    out = tracked('<a href="https://two.example/x">x</a>', text, text_links=True)
    assert out.links == ("https://two.example/x", "https://shop.example/a?b=1")
    words = (out.text or "").split()
    assert words[2].endswith(".") and claim_of(words[2][:-1]).url == "https://shop.example/a?b=1"
    assert claim_of(words[4][1:-2]).link_index == 0  # the HTML's link: the same index
    assert words[-1] == UNSUBSCRIBE + "?t=1"


fragments = st.lists(st.sampled_from([
    "<p>", "</p>", "text ", "&amp;", "<br/>", '<a href="https://a.example/x">', "</a>",
    '<a href="mailto:x@example.com">', "<!-- c -->", "<b>", "</b>", "<a>", '<a href=#z>',
    "</body>", "<script>if (a < b) {}</script>", '<img src="https://i.example/p.png">', "\n",
]), max_size=30)


@settings(max_examples=200, deadline=None)
@given(fragments)
def test_any_html_keeps_its_untracked_links_and_gains_one_pixel(parts: list[str]) -> None:
    html = "".join(parts)
    out = tracked(html).html or ""
    before, after = parsed(html), parsed(out)
    assert len(after.hrefs) == len(before.hrefs)
    for old, new in zip(before.hrefs, after.hrefs, strict=True):
        assert new == old or claim_of(new).url == old
    assert len(after.images) == len(before.images) + 1


def test_the_site_of_the_settings_keeps_the_unsubscribe_page() -> None:
    off = TrackerSettings(tracker_keys="")
    assert TrackingSite.from_settings(off, "https://api.example") is None
    on = TrackerSettings(tracker_keys="k1:rewrite-test-secret-0123456789ab",
                         tracker_public_url="https://t.example")
    site = TrackingSite.from_settings(on, "https://api.example/")
    assert site is not None and site.base_url == "https://t.example"
    assert site.keeps(UNSUBSCRIBE + "?token=x") and not site.keeps("https://shop.example/")
    with pytest.raises(ValueError):
        TrackingSite.from_settings(TrackerSettings(tracker_keys="k1:short"), "https://api.example")
