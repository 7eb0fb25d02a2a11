"""The native canonical-delivery matcher (projections/_canonical.c) against its reference, the
regular expression path (`fast_decode._canonical_delivery`): the same fact, or None, for every
input, canonical records and hundreds of thousands of near misses alike."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest

from projections import _canonical, fast_decode
from projections.fast_decode import _canonical_delivery, decode_record
from schemas.envelope import encode, wrap
from schemas.events import EmailFailed, EmailSent

# Characters worth putting anywhere: grammar punctuation, each class's edges, control and
# non-ASCII characters.
_PROBES = ['"', "\\", "0", "1", "9", "a", "f", "g", "z", "A", "Z", "T", "-", "+", ".", ":", "_",
           "@", ",", "{", "}", " ", "~", "\x7f", "\x1f", "\t", "é", "!", "[", "]", "?", "="]


def _sent(tenant: str = "acme", **overrides: object) -> str:
    payload = {"campaign_id": "cmp-1", "contact_id": "c-1", "email": "ann@example.com",
               "message_id": "<c-1@cmp-1>", "attempt": 1, "smtp_reply": "250 2.0.0 Ok: queued",
               **overrides}
    return encode(wrap(EmailSent(**payload), tenant_id=tenant,
                       aggregate_id=str(payload["campaign_id"]))).decode()


def _failed(tenant: str = "acme", **overrides: object) -> str:
    payload = {"campaign_id": "cmp-1", "contact_id": "c-1", "email": "ann@example.com",
               "attempt": 3, "reason": "550 5.1.1 no such user", "permanent": True,
               "smtp_code": 550, **overrides}
    return encode(wrap(EmailFailed(**payload), tenant_id=tenant,
                       aggregate_id=str(payload["campaign_id"]))).decode()


def _seeds() -> list[str]:
    seeds = [
        _sent(),
        _sent(attempt=123456789, ambiguous=1, message_id="", smtp_reply=""),
        # every id at its longest (tenant 64, entities 128), labels at theirs
        _sent(tenant="T" + "t_.-" * 15 + "tt9", email="a.b-c+d@mail-1.sub.example.co",
              contact_id="X" * 128,
              campaign_id="c:" + "9" * 126),
        _failed(),
        _failed(smtp_code=None, permanent=False, reason=""),
        _failed(smtp_code=-421, ambiguous=987654321),
        _failed(smtp_code=0, email="x@" + "a" * 63 + "." + "b" * 62 + ".cd"),
    ]
    # Other timestamps, offsets and causation ids, spelled as encode would spell them.
    base = _sent()
    seeds.append(base.replace('"causation_id":null',
                              '"causation_id":"0123abcd-0000-4000-8000-00000000beef"'))
    stamp = base.split('"occurred_at":"')[1].split('"')[0]
    for other in ("2024-02-29T23:59:59.5+05:30", "2000-01-01T00:00:00-00:00",
                  "0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999-23:59"):
        seeds.append(base.replace(stamp, other))
    return seeds


def _same(text: str | bytes) -> None:
    native, reference = _canonical.match(text), _canonical_delivery(text)
    assert native == reference, text
    assert type(native) is type(reference)
    if native is not None and reference is not None:
        # Equal datetimes may still differ in their zone; the facts must not.
        assert native.occurred_at.utcoffset() == reference.occurred_at.utcoffset()
        assert native.occurred_at.tzinfo == reference.occurred_at.tzinfo


def _near_misses(text: str) -> Iterator[str]:
    for i in range(len(text) + 1):
        if i < len(text):
            yield text[:i] + text[i + 1:]  # a character dropped
        for probe in _PROBES:
            yield text[:i] + probe + text[i:]  # one added
            if i < len(text):
                yield text[:i] + probe + text[i + 1:]  # one replaced


def test_every_seed_is_canonical_for_both() -> None:
    for seed in _seeds():
        assert _canonical_delivery(seed) is not None, seed
        _same(seed)
        _same(seed.encode())


def test_one_character_from_canonical_both_agree() -> None:
    checked = 0
    for seed in _seeds():
        for text in _near_misses(seed):
            _same(text)
            checked += 1
        # bytes too, where the text is ASCII (bytes of non-ASCII text: UTF-8, never canonical)
        _same(seed.replace("a", "é", 1).encode())
    assert checked > 100_000


def test_random_edits_both_agree() -> None:
    rng = random.Random(20261130)
    seeds = _seeds()
    for _ in range(30_000):
        text = list(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(text))
            action = rng.random()
            if action < 0.4:
                text[i] = rng.choice(_PROBES)
            elif action < 0.7:
                del text[i]
            else:
                # a run of a character already there: lengths of ids, digits, labels
                text[i:i] = text[i] * rng.randint(1, 70)
        _same("".join(text).encode() if rng.random() < 0.5 else "".join(text))


@pytest.mark.parametrize("year", [1, 1900, 2000, 2023, 2024, 9999])
def test_every_day_of_the_year_both_agree(year: int) -> None:
    base = _sent()
    stamp = base.split('"occurred_at":"')[1].split('"')[0]
    for month in range(0, 14):
        for day in range(0, 33):
            _same(base.replace(stamp, f"{year:04d}-{month:02d}-{day:02d}T12:00:00Z"))


@pytest.mark.parametrize("zone", ["Z", "+00:00", "-00:00", "+23:59", "-12:30", "+24:00",
                                  "+05:60", "+5:30", "+05", "z", "UTC"])
@pytest.mark.parametrize("fraction", ["", ".1", ".12", ".123", ".1234", ".12345", ".123456",
                                      ".1234567", "."])
def test_zones_and_fractions_both_agree(zone: str, fraction: str) -> None:
    base = _sent()
    stamp = base.split('"occurred_at":"')[1].split('"')[0]
    _same(base.replace(stamp, f"2026-11-30T23:59:59{fraction}{zone}"))


def test_the_fact_carries_the_right_values() -> None:
    fact = _canonical.match(_failed(smtp_code=-421, ambiguous=2).encode())
    assert fact is not None
    assert (fact.type, fact.status, fact.attempt, fact.smtp_code, fact.ambiguous, fact.detail) == (
        "EmailFailed", "failed", 3, -421, 2, "550 5.1.1 no such user")
    offset = _canonical.match(_seeds()[8])
    assert offset is not None
    assert offset.occurred_at == datetime(2024, 2, 29, 23, 59, 59, 500000,
                                          tzinfo=timezone(timedelta(hours=5, minutes=30)))
    utc = _canonical.match(_seeds()[9])
    assert utc is not None and utc.occurred_at.tzinfo is UTC


def test_other_inputs_are_none() -> None:
    canonical = _sent().encode()
    assert _canonical.match(bytearray(canonical)) is None
    assert _canonical.match(memoryview(canonical)) is None
    assert _canonical.match(b"") is None
    assert _canonical.match("") is None


def test_the_projector_decodes_through_the_native_matcher() -> None:
    # Built at install: a missing extension would silently cost the projector ~2.5 us a record.
    assert fast_decode._match_canonical is _canonical.match
    raw = _sent().encode()
    assert decode_record(raw) == _canonical_delivery(raw) is not None
