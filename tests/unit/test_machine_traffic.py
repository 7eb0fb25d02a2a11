"""Machine traffic: image proxies, link scanners, HEAD requests, early clicks and bursts are
marked with their reason; people's mail clients and browsers are not."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.engagement import AgentClass
from services.engagement.machine import Hit, Verdict, agent_class, burst_clicks, classify
from services.engagement.tokens import Kind

SENT = 1_800_000_000.0
CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/131.0.0.0 Safari/537.36")
APPLE_MAIL = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"
THUNDERBIRD = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Thunderbird/128.5.0"
GMAIL_PROXY = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
YAHOO_PROXY = ("Mozilla/5.0 (Windows NT 6.1; WOW64) AppleWebKit/537.36 (KHTML, like Gecko) "
               "Chrome/42.0.2311.135 Safari/537.36 Edge/12.246 YahooMailProxy; "
               "https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html")


def verdict(kind: Kind = Kind.OPEN, agent: str = CHROME, *, method: str = "GET",
            address: str | None = "127.0.0.1", after: float = 3600.0, window: float = 10.0) -> Verdict:
    return classify(Hit(kind, method, agent, address, SENT + after, SENT), scanner_window_seconds=window)


@pytest.mark.parametrize(("kind", "agent", "expected"), [
    (Kind.OPEN, CHROME, AgentClass.BROWSER),
    (Kind.OPEN, APPLE_MAIL, AgentClass.MAIL_CLIENT),
    (Kind.OPEN, THUNDERBIRD, AgentClass.MAIL_CLIENT),
    (Kind.CLICK, CHROME, AgentClass.BROWSER),
    (Kind.CLICK, "SomethingElse/1.0", AgentClass.OTHER),
])
def test_people_are_people(kind: Kind, agent: str, expected: AgentClass) -> None:
    assert verdict(kind, agent) == Verdict(expected, False)


@pytest.mark.parametrize(("agent", "address", "reason"), [
    ("Mozilla/5.0", "127.0.0.1", "apple_mpp"),  # MPP's bare agent, wherever it comes from
    (APPLE_MAIL, "17.58.100.7", "apple_mpp"),  # from Apple's 17.0.0.0/8
    (GMAIL_PROXY, "127.0.0.1", "google_image_proxy"),
    (CHROME, "66.102.8.12", "google_image_proxy"),
    (YAHOO_PROXY, None, "yahoo_image_proxy"),
])
def test_image_proxies_open_as_machines(agent: str, address: str | None, reason: str) -> None:
    assert verdict(Kind.OPEN, agent, address=address) == Verdict(AgentClass.IMAGE_PROXY, True, reason)


def test_address_ranges_mark_opens_only() -> None:
    assert verdict(Kind.CLICK, CHROME, address="17.58.100.7") == Verdict(AgentClass.BROWSER, False)
    assert verdict(Kind.OPEN, CHROME, address="not an address") == Verdict(AgentClass.BROWSER, False)
    assert verdict(Kind.OPEN, CHROME, address="::1") == Verdict(AgentClass.BROWSER, False)


@pytest.mark.parametrize(("agent", "marker"), [
    ("Mozilla/5.0 (compatible; BarracudaCentral/1.0)", "barracuda"),
    ("python-requests/2.32.3", "python-requests"),
    ("curl/8.5.0", "curl/"),
    ("Microsoft Office Existence Discovery", "microsoft office existence discovery"),
    ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", "bot"),
    ("Mozilla/5.0 HeadlessChrome/120.0.0.0 Safari/537.36", "headlesschrome"),
])
def test_scanner_agents_are_machines_with_their_name(agent: str, marker: str) -> None:
    assert verdict(Kind.CLICK, agent) == Verdict(AgentClass.SCANNER, True, f"scanner_agent:{marker}")


def test_head_requests_and_missing_agents_are_machines() -> None:
    assert verdict(Kind.CLICK, CHROME, method="HEAD") == Verdict(AgentClass.BROWSER, True, "head_request")
    assert verdict(Kind.OPEN, CHROME, method="head").reason == "head_request"
    assert verdict(Kind.CLICK, "  ") == Verdict(AgentClass.NONE, True, "no_user_agent")


def test_a_click_within_the_window_of_delivery_is_a_scanner() -> None:
    assert verdict(Kind.CLICK, CHROME, after=3.0) == Verdict(AgentClass.BROWSER, True,
                                                           "click_soon_after_delivery")
    assert verdict(Kind.CLICK, CHROME, after=10.0).machine is False
    assert verdict(Kind.CLICK, CHROME, after=3.0, window=0).machine is False
    assert verdict(Kind.OPEN, CHROME, after=1.0).machine is False  # people open at once


def test_every_link_clicked_within_a_second_is_a_burst() -> None:
    scan = [(SENT + 100.0, 0), (SENT + 100.3, 2), (SENT + 100.9, 1)]
    assert burst_clicks(scan, 3) == {0, 1, 2}
    person = [(SENT + 100.0, 0), (SENT + 140.0, 1), (SENT + 300.0, 2)]
    assert burst_clicks(person, 3) == frozenset()
    assert burst_clicks([(SENT, 0), (SENT + 0.1, 1)], 3) == frozenset()  # not every link
    assert burst_clicks([(SENT, 0)], 1) == frozenset()  # one link: one click is a person's
    later = [(SENT + 5.0, 0), *scan]  # a person's click before the scanner's burst
    assert burst_clicks(later, 3) == {1, 2, 3}
    assert burst_clicks([(SENT, 0), (SENT + 0.5, 0), (SENT + 2.0, 1)], 2) == frozenset()


@given(st.text(max_size=600), st.sampled_from([Kind.OPEN, Kind.CLICK]),
       st.sampled_from(["GET", "HEAD"]), st.one_of(st.none(), st.ip_addresses().map(str)),
       st.floats(-1e6, 1e6))
def test_every_verdict_is_stable_and_names_a_reason_when_machine(
        agent: str, kind: Kind, method: str, address: str | None, after: float) -> None:
    hit = Hit(kind, method, agent, address, SENT + after, SENT)
    first = classify(hit, scanner_window_seconds=10)
    assert first == classify(hit, scanner_window_seconds=10)
    assert first.machine == (first.reason is not None)
    assert first.agent in set(AgentClass) and agent_class(agent) in set(AgentClass)
