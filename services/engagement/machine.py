"""Machine traffic told apart from people: pure functions over what a hit shows.

`classify(hit)` marks a single hit `machine` with the first reason that applies, in this
order: a HEAD request (no person's browser sends one to follow a link), no user agent, an
image proxy that fetches every pixel for the reader (Apple Mail Privacy Protection, Google's
and Yahoo's image proxies), a known link scanner or preview agent, and a click within the
scanner window of the mail's delivery (security gateways follow every link as the mail
arrives). `burst_clicks(...)` applies the one rule a single hit cannot show: every link of
one mail clicked within a second is a scanner, whoever it claims to be; a reader of a
recipient's clicks (the engagement projection) applies it.

Guarantee: the same hit always gets the same verdict (no clock, no state but a bounded memo
of what each user agent alone tells, which changes no verdict); a machine verdict
always names its reason, from a small fixed vocabulary (`scanner_agent:<name>` names one of
SCANNER_AGENTS), so it can be counted by reason.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from schemas.engagement import AgentClass
from services.engagement.tokens import Kind

# Apple Mail Privacy Protection fetches images through Apple's proxies, from Apple's own
# 17.0.0.0/8 (ARIN APPLE-WWNET), with the bare agent "Mozilla/5.0".
APPLE_PROXY_NETWORKS = (ipaddress.ip_network("17.0.0.0/8"),)
APPLE_PROXY_AGENT = "Mozilla/5.0"
# Gmail's image proxy (agent "... (via ggpht.com GoogleImageProxy)") fetches from Google's
# netblocks; these are the ones its fetches are seen from (Google's published SPF ranges).
GOOGLE_PROXY_NETWORKS = tuple(ipaddress.ip_network(block) for block in (
    "66.102.0.0/20", "66.249.80.0/20", "64.233.160.0/19", "72.14.192.0/18", "74.125.0.0/16",
))
# Address ranges only ever mark opens: a click from those networks may be a person on them.

# Image proxies by their agents (lower case, found anywhere in the user agent).
PROXY_AGENTS = (
    ("googleimageproxy", "google_image_proxy"),
    ("ggpht.com", "google_image_proxy"),
    ("yahoomailproxy", "yahoo_image_proxy"),
)
# Link scanners, previewers and HTTP libraries (lower case, anywhere in the user agent): what
# security gateways, chat previews and scripts send. A person's browser names none of them.
SCANNER_AGENTS = (
    "barracuda", "mimecast", "proofpoint", "symantec", "trendmicro", "trend micro",
    "fortiguard", "sophos", "forcepoint", "safelinks", "microsoft office existence discovery",
    "skypeuripreview", "facebookexternalhit", "slackbot", "discordbot", "telegrambot",
    "whatsapp", "headlesschrome", "phantomjs", "python-requests", "python-urllib", "aiohttp",
    "python-httpx", "curl/", "wget/", "go-http-client", "okhttp", "java/", "libwww-perl",
    "apache-httpclient", "bot", "spider", "crawler",
)
# Desktop and web mail clients that fetch a pixel themselves (a person opened the mail).
_MAIL_CLIENTS = ("thunderbird", "outlook", "microsoft office", "airmail", "spark", "mailbird")
_BROWSERS = ("chrome/", "firefox/", "safari/", "edg/", "opr/")
# Longest user agent looked at: a client sending more gets its first this many characters.
MAX_AGENT_LENGTH = 512
# Default window of "every link clicked at once".
BURST_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Hit:
    """One request to the tracker, as far as telling machines apart goes. `at` and
    `sent_at` are Unix seconds (the time of the hit; when the mail was sent, from the
    token); `address` the client's IP address (None when unknown)."""

    kind: Kind
    method: str
    user_agent: str
    address: str | None
    at: float
    sent_at: float


@dataclass(frozen=True, slots=True)
class Verdict:
    agent: AgentClass
    machine: bool
    reason: str | None = None


def agent_class(user_agent: str) -> AgentClass:
    """What kind of client a user agent names."""
    agent = user_agent[:MAX_AGENT_LENGTH].strip().lower()
    if not agent:
        return AgentClass.NONE
    if any(marker in agent for marker, _ in PROXY_AGENTS) or agent == APPLE_PROXY_AGENT.lower():
        return AgentClass.IMAGE_PROXY
    if any(marker in agent for marker in SCANNER_AGENTS):
        return AgentClass.SCANNER
    if any(marker in agent for marker in _MAIL_CLIENTS):
        return AgentClass.MAIL_CLIENT
    if any(marker in agent for marker in _BROWSERS):
        return AgentClass.BROWSER
    if "applewebkit" in agent:  # Apple Mail names WebKit but no Safari version
        return AgentClass.MAIL_CLIENT
    return AgentClass.OTHER


def classify(hit: Hit, *, scanner_window_seconds: float) -> Verdict:
    """The verdict on one hit (see the module docstring for the order of the rules)."""
    agent = hit.user_agent[:MAX_AGENT_LENGTH].strip()
    kind, proxy_reason, scanner_marker = _agent_facts(agent)
    if hit.method.upper() == "HEAD":
        return Verdict(kind, True, "head_request")
    if not agent:
        return Verdict(kind, True, "no_user_agent")
    if proxy_reason is not None:
        return Verdict(AgentClass.IMAGE_PROXY, True, proxy_reason)
    if hit.kind is Kind.OPEN:
        network = _network_of(hit.address)
        if agent == APPLE_PROXY_AGENT or network == "apple":
            return Verdict(AgentClass.IMAGE_PROXY, True, "apple_mpp")
        if network == "google":
            return Verdict(AgentClass.IMAGE_PROXY, True, "google_image_proxy")
    if scanner_marker is not None:
        return Verdict(AgentClass.SCANNER, True, f"scanner_agent:{scanner_marker}")
    if hit.kind is Kind.CLICK and hit.at - hit.sent_at < scanner_window_seconds:
        return Verdict(kind, True, "click_soon_after_delivery")
    return Verdict(kind, False)


# What the agent alone tells, remembered per agent: a tracker sees the same few agents over
# and over. Bounded (agents are cut at MAX_AGENT_LENGTH): at most about 2 MB.
@functools.lru_cache(maxsize=4096)
def _agent_facts(agent: str) -> tuple[AgentClass, str | None, str | None]:
    """The agent's class, the reason of the first image proxy it names, and the first
    scanner marker it holds (None when it names none)."""
    lowered = agent.lower()
    proxy = next((reason for marker, reason in PROXY_AGENTS if marker in lowered), None)
    scanner = next((marker for marker in SCANNER_AGENTS if marker in lowered), None)
    return agent_class(agent), proxy, scanner


def _network_of(address: str | None) -> str | None:
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if any(ip in net for net in APPLE_PROXY_NETWORKS):
        return "apple"
    if any(ip in net for net in GOOGLE_PROXY_NETWORKS):
        return "google"
    return None


def burst_clicks(clicks: Sequence[tuple[float, int]], links_in_mail: int,
                 window: float = BURST_SECONDS) -> frozenset[int]:
    """Of one recipient's clicks on one mail, as (Unix seconds, link index), the positions of
    those inside a span of at most `window` seconds that holds a click on every one of the
    mail's `links_in_mail` links: a scanner following them all. A mail with one link has no
    such burst (one click is what a person does)."""
    if links_in_mail < 2 or len(clicks) < links_in_mail:
        return frozenset()
    order = sorted(range(len(clicks)), key=lambda i: clicks[i][0])
    marked: set[int] = set()
    counts: dict[int, int] = {}
    start = 0
    for end, position in enumerate(order):
        counts[clicks[position][1]] = counts.get(clicks[position][1], 0) + 1
        while clicks[position][0] - clicks[order[start]][0] > window:
            first = clicks[order[start]][1]
            counts[first] -= 1
            if not counts[first]:
                del counts[first]
            start += 1
        if len(counts) >= links_in_mail:
            marked.update(order[start:end + 1])
    return frozenset(marked)
