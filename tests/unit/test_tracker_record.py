"""The tracker's direct hit writer gives exactly the schema path's bytes for every hit it
writes, and declines (None) whatever it cannot write plainly, so the schema path (which
validates) handles it."""

from __future__ import annotations

import random
import uuid
from dataclasses import replace

import pytest

from schemas.engagement import AgentClass, LinkClicked
from schemas.envelope import decode
from services.engagement.machine import SCANNER_AGENTS, Hit, Verdict, classify
from services.engagement.tokens import Kind, TrackingClaim
from services.tracker.app import hit_event, schema_hit_value
from services.tracker.record import hit_record, new_request_id

AGENTS = [
    "", "Mozilla/5.0", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131.0 Safari/537.36",
    "Mozilla/5.0 (via ggpht.com GoogleImageProxy)", "Thunderbird/128.0", "curl/8.5.0",
    "Mozilla/5.0 Macintosh AppleWebKit/605.1.15", "Mözilla/5.0 Ünïcode Browser/1.0 Firefox/130.0",
    "エージェント/1.0", "\tSpaced Agent \n", "x" * 600, *SCANNER_AGENTS,
]
ADDRESSES = [None, "127.0.0.1", "17.1.2.3", "66.102.1.1", "::1", "not an address"]
URL_CHARS = "abcXYZ019-._~:/?#[]@!$&'()*+,;=%\"\\`{}|^"


def random_claim(rng: random.Random) -> TrackingClaim:
    ids = "ABCxyz019_.:-"
    tenant = rng.choice("abcXYZ019") + "".join(rng.choice("abc019_.-") for _ in range(rng.randint(0, 63)))
    campaign = rng.choice("aZ9") + "".join(rng.choice(ids) for _ in range(rng.randint(0, 127)))
    contact = rng.choice("aZ9") + "".join(rng.choice(ids) for _ in range(rng.randint(0, 127)))
    sent_at = rng.randint(0, 2_000_000_000)
    if rng.random() < 0.5:
        return TrackingClaim(Kind.OPEN, tenant, campaign, contact, sent_at)
    count = rng.randint(1, 10_000)
    url = rng.choice(("https://", "http://", "HTTPS://")) + "".join(
        rng.choice(URL_CHARS) for _ in range(rng.randint(1, 2000)))
    return TrackingClaim(Kind.CLICK, tenant, campaign, contact, sent_at, rng.randrange(count),
                         count, url)


def random_hit(rng: random.Random, claim: TrackingClaim) -> Hit:
    at = claim.sent_at + rng.choice((0.0, 0.5, 3.25, 11.0, rng.uniform(0, 10**6)))
    if rng.random() < 0.2:
        at = float(int(at))  # whole seconds: no fraction written
    return Hit(claim.kind, rng.choice(("GET", "HEAD", "get")), rng.choice(AGENTS),
               rng.choice(ADDRESSES), at, claim.sent_at)


def test_random_hits_give_the_schema_paths_bytes() -> None:
    rng = random.Random(20261207)
    written = 0
    for _ in range(3000):
        claim = random_claim(rng)
        hit = random_hit(rng, claim)
        verdict = classify(hit, scanner_window_seconds=10.0)
        request_id = uuid.uuid4()
        direct = hit_record(claim, str(request_id), verdict, hit.at)
        expected = schema_hit_value(claim, request_id, verdict, hit.at)
        assert direct is not None, claim  # every genuine token's claim takes the direct path
        assert direct == expected, (claim, hit)
        assert hit_event(claim, request_id, hit, 10.0)[1] == expected
        written += 1
    assert written == 3000


def test_quotes_and_backslashes_in_a_url_are_escaped_as_the_schema_escapes_them() -> None:
    url = 'https://x.example/a"b\\c?d="e"&f=\\\\'
    claim = TrackingClaim(Kind.CLICK, "acme", "c1", "p1", 1_800_000_000, 0, 1, url)
    verdict = Verdict(AgentClass.BROWSER, False)
    request_id = uuid.uuid4()
    direct = hit_record(claim, str(request_id), verdict, 1_800_000_100.25)
    assert direct == schema_hit_value(claim, request_id, verdict, 1_800_000_100.25)
    payload = decode(direct).payload
    assert isinstance(payload, LinkClicked) and payload.url == url


CLICK = TrackingClaim(Kind.CLICK, "acme", "c1", "p1", 1_800_000_000, 0, 2, "https://x.example/")


@pytest.mark.parametrize(("claim", "verdict"), [
    (replace(CLICK, url="https://x.example/ü"), Verdict(AgentClass.BROWSER, False)),
    (replace(CLICK, url="https://x.example/\n"), Verdict(AgentClass.BROWSER, False)),
    (replace(CLICK, url="https://x.example/" + "a" * 2048), Verdict(AgentClass.BROWSER, False)),
    (replace(CLICK, url=""), Verdict(AgentClass.BROWSER, False)),
    (replace(CLICK, link_index=2), Verdict(AgentClass.BROWSER, False)),
    (replace(CLICK, link_index=-1), Verdict(AgentClass.BROWSER, False)),
    (replace(CLICK, link_index=True), Verdict(AgentClass.BROWSER, False)),
    (replace(CLICK, tenant_id="bad tenant"), Verdict(AgentClass.BROWSER, False)),
    (replace(CLICK, campaign_id='c"1'), Verdict(AgentClass.BROWSER, False)),
    (replace(CLICK, contact_id="ü"), Verdict(AgentClass.BROWSER, False)),
    (CLICK, Verdict(AgentClass.BROWSER, True)),
    (CLICK, Verdict(AgentClass.BROWSER, False, "head_request")),
    (CLICK, Verdict(AgentClass.SCANNER, True, 'scanner "quoted"')),
    (CLICK, Verdict(AgentClass.SCANNER, True, "")),
])
def test_what_it_cannot_write_plainly_it_declines(claim: TrackingClaim, verdict: Verdict) -> None:
    assert hit_record(claim, str(uuid.uuid4()), verdict, 1_800_000_100.0) is None


def test_a_declined_hit_goes_through_the_schema_path() -> None:
    claim = replace(CLICK, url="https://x.example/ü")  # never in a token: the schema allows it
    hit = Hit(Kind.CLICK, "GET", "Mozilla/5.0 Firefox/130.0", None, 1_800_000_100.0, 1_800_000_000)
    request_id = uuid.uuid4()
    _, value, machine = hit_event(claim, request_id, hit, 10.0)
    message = decode(value)
    assert not machine and message.envelope.id == request_id
    assert isinstance(message.payload, LinkClicked) and message.payload.url == claim.url
    broken = replace(CLICK, link_index=5)
    with pytest.raises(ValueError):
        hit_event(broken, request_id, hit, 10.0)  # the schema refuses it, as before


def test_new_request_ids_are_version_4_uuids() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_a_forked_child_hands_out_ids_of_its_own() -> None:
    import os

    new_request_id()  # the parent has ids read ahead
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child process
        os.write(writer, new_request_id().encode())
        os._exit(0)
    os.close(writer)
    os.waitpid(child, 0)
    child_id = os.read(reader, 64).decode()
    os.close(reader)
    assert uuid.UUID(child_id).version == 4
    assert child_id != new_request_id()
