"""The projector's fast decoder yields exactly the facts of the full schema decode, and hands
everything that is not plainly canonical to the full decode (which keeps rejecting bad input)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from projections.facts import RecipientFact, recipient_fact
from projections.fast_decode import _canonical_delivery, decode_record
from schemas.contacts import ContactUpserted
from schemas.envelope import Message, SchemaViolation, decode, encode, wrap
from schemas.events import EmailFailed, EmailSent, MessageTemplate, RecipientQueued

T0 = datetime(2030, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)


def raw_sent(**payload_overrides: object) -> bytes:
    payload = EmailSent(campaign_id="c-1", contact_id="k1", email="k1@example.com",
                        message_id="<k1@mx>", attempt=2, smtp_reply="250 ok", ambiguous=1)
    data = json.loads(encode(wrap(payload, tenant_id="acme", aggregate_id="c-1",
                                  occurred_at=T0)))
    data["payload"].update(payload_overrides)
    return json.dumps(data).encode()


def raw_failed() -> bytes:
    payload = EmailFailed(campaign_id="c-1", contact_id="k1", email="k1@example.com", attempt=3,
                          reason="550 no", permanent=True, smtp_code=550)
    return encode(wrap(payload, tenant_id="acme", aggregate_id="c-1", occurred_at=T0))


@pytest.mark.parametrize("raw", [raw_sent(), raw_failed()], ids=["sent", "failed"])
def test_canonical_deliveries_take_the_fast_path_and_equal_the_full_decode(raw: bytes) -> None:
    fast = decode_record(raw)
    assert isinstance(fast, RecipientFact)
    assert fast == recipient_fact(decode(raw))


@pytest.mark.parametrize("change", [
    {"email": "k1@EXAMPLE.com"},  # normalised by the schema: the full path does it
    {"attempt": True},
    {"smtp_reply": 250},
])
def test_anything_unusual_takes_the_full_path(change: dict[str, object]) -> None:
    raw = raw_sent(**change)
    try:
        full: Message | None = decode(raw)
    except SchemaViolation:
        full = None
    if full is None:
        with pytest.raises(SchemaViolation):
            decode_record(raw)
    else:
        result = decode_record(raw)
        assert isinstance(result, Message)
        assert recipient_fact(result) == recipient_fact(full)


@pytest.mark.parametrize("mutate", [
    lambda d: d["payload"].update(attempt=0),
    lambda d: d["payload"].update(extra="x"),
    lambda d: d.update(tenant_id="bad tenant"),
    lambda d: d.update(occurred_at="2030-01-01T12:00:00"),
    lambda d: d.update(id="not-a-uuid"),
])
def test_invalid_deliveries_are_still_rejected(mutate) -> None:
    data = json.loads(raw_sent())
    mutate(data)
    with pytest.raises(SchemaViolation):
        decode_record(json.dumps(data).encode())


def test_malformed_bytes_are_rejected_with_the_full_decoders_reason() -> None:
    with pytest.raises(SchemaViolation, match="malformed JSON"):
        decode_record(b"{nope")
    with pytest.raises(SchemaViolation):
        decode_record(None)


@pytest.mark.parametrize("email", [
    "k1@example.com", "K.One+tag@example.co.uk", "k1@Example.com", " k1@example.com",
    "k1@example", "k1@@example.com", "k1@exa_mple.com", "a" * 65 + "@example.com",
])
def test_the_address_shortcut_agrees_with_the_schema(email: str) -> None:
    raw = raw_sent(email=email)
    try:
        expected = recipient_fact(decode(raw))
    except SchemaViolation:
        with pytest.raises(SchemaViolation):
            decode_record(raw)
        return
    result = decode_record(raw)
    fact = result if isinstance(result, RecipientFact) else recipient_fact(result)
    assert fact == expected


def test_an_id_valid_as_a_campaign_is_not_thereby_a_valid_tenant() -> None:
    data = json.loads(raw_sent())
    data["payload"]["campaign_id"] = "has:colon"
    assert isinstance(decode_record(json.dumps(data).encode()), RecipientFact)
    data["tenant_id"] = "has:colon"
    with pytest.raises(SchemaViolation):
        decode_record(json.dumps(data).encode())


@pytest.mark.parametrize("raw", [
    b" " + raw_failed() + b"\n",  # whitespace around the document
    raw_sent().replace(b'"attempt": 2', b'"attempt": 2' + b"0" * 30),  # beyond 64 bits
    raw_sent().replace(b'"attempt": 2', b'"attempt": NaN'),
    raw_sent().replace(b'"ambiguous": 1', b'"ambiguous": 1, "ambiguous": 0'),  # repeated key
    raw_sent().replace(b'"smtp_reply": "250 ok"', b'"smtp_reply": "\\ud800"'),  # lone surrogate
])
def test_json_edge_cases_decode_as_the_full_decoder_does(raw: bytes) -> None:
    try:
        expected = recipient_fact(decode(raw))
    except SchemaViolation:
        with pytest.raises(SchemaViolation):
            decode_record(raw)
        return
    result = decode_record(raw)
    fact = result if isinstance(result, RecipientFact) else recipient_fact(result)
    assert fact == expected


def raw_queued(mutate: object = None) -> bytes:
    payload = RecipientQueued(
        campaign_id="c-1", contact_id="k1", email="k1@example.com", first_name="Kay",
        attributes={"plan": "gold"},
        template=MessageTemplate(subject="Spring sale", from_address="news@example.com",
                                 body_text="Hi {{first_name}}", body_html=None))
    data = json.loads(encode(wrap(payload, tenant_id="acme", aggregate_id="k1",
                                  occurred_at=T0)))
    if callable(mutate):
        mutate(data)
    return json.dumps(data).encode()


def test_a_canonical_recipient_queued_takes_the_fast_path_and_equals_the_full_decode() -> None:
    raw = raw_queued()
    fast = decode_record(raw)
    assert isinstance(fast, RecipientFact)
    assert fast == recipient_fact(decode(raw))
    assert (fast.status, fast.contact_id, fast.email) == ("queued", "k1", "k1@example.com")


@pytest.mark.parametrize("mutate", [
    lambda d: d["payload"]["template"].update(subject="two\nlines"),  # header injection
    lambda d: d["payload"]["template"].update(subject=""),
    lambda d: d["payload"]["template"].update(subject="x" * 999),
    lambda d: d["payload"]["template"].update(from_address="not an address"),
    lambda d: d["payload"]["template"].update(extra="x"),
    lambda d: d["payload"]["template"].update(body_text=5),
    lambda d: d["payload"].update(attributes={"plan": 5}),
    lambda d: d["payload"].update(email="k1@example"),
    lambda d: d.update(aggregate_id="has space"),
])
def test_invalid_recipient_queued_is_still_rejected(mutate) -> None:
    raw = raw_queued(mutate)
    with pytest.raises(SchemaViolation):
        decode(raw)  # the schema refuses it ...
    with pytest.raises(SchemaViolation):
        decode_record(raw)  # ... and so does the fast decoder


@pytest.mark.parametrize("mutate", [
    lambda d: d["payload"].pop("first_name"),  # a default: valid, but not the canonical shape
    lambda d: d["payload"]["template"].pop("body_html"),
    lambda d: d["payload"].update(email="K1@EXAMPLE.com"),  # normalised by the schema
    lambda d: d["payload"]["template"].update(subject="x" * 998),
    lambda d: d.update(version=2),  # no such version: the full decode words it
])
def test_unusual_recipient_queued_decodes_as_the_full_decoder_does(mutate) -> None:
    raw = raw_queued(mutate)
    try:
        expected = recipient_fact(decode(raw))
    except SchemaViolation:
        with pytest.raises(SchemaViolation):
            decode_record(raw)
        return
    result = decode_record(raw)
    fact = result if isinstance(result, RecipientFact) else recipient_fact(result)
    assert fact == expected


# --- the first tier: the canonical text of a delivery, matched as a whole ----------------------

def canonical_sent(**payload: object) -> bytes:
    fields: dict[str, object] = dict(campaign_id="c-1", contact_id="k1", email="k1@example.com",
                                     message_id="<k1@mx>", attempt=2, smtp_reply="250 ok",
                                     ambiguous=1)
    fields.update(payload)
    return encode(wrap(EmailSent(**fields), tenant_id="acme", aggregate_id="c-1",
                       occurred_at=T0, causation_id=uuid.UUID(int=7)))


def canonical_failed(**payload: object) -> bytes:
    fields: dict[str, object] = dict(campaign_id="c-1", contact_id="k1", email="k1@example.com",
                                     attempt=3, reason="550 no such user", permanent=True,
                                     smtp_code=550)
    fields.update(payload)
    return encode(wrap(EmailFailed(**fields), tenant_id="acme", aggregate_id="c-1",
                       occurred_at=T0.astimezone(timezone(timedelta(hours=-5)))))


def same_outcome(raw: bytes) -> None:
    """decode_record(raw) refuses what decode refuses, else yields the same fact."""
    try:
        expected = recipient_fact(decode(raw))
    except SchemaViolation:
        with pytest.raises(SchemaViolation):
            decode_record(raw)
        return
    result = decode_record(raw)
    fact = result if isinstance(result, RecipientFact) else recipient_fact(result)
    assert fact == expected, raw


@pytest.mark.parametrize("raw", [
    canonical_sent(), canonical_sent(ambiguous=0, smtp_reply="", message_id=""),
    canonical_sent(email="O'Brien+news@mail.example.org", attempt=999_999_999),
    canonical_failed(), canonical_failed(smtp_code=None, permanent=False, reason=""),
    canonical_failed(smtp_code=-1),
], ids=["sent", "sent-empty", "sent-odd-address", "failed", "failed-no-code", "failed-minus"])
def test_the_canonical_text_of_a_delivery_is_matched_whole_and_equals_the_full_decode(
        raw: bytes) -> None:
    fact = _canonical_delivery(raw)
    assert fact is not None
    assert fact == recipient_fact(decode(raw))
    assert decode_record(raw) == fact


@pytest.mark.parametrize("raw", [
    canonical_sent(smtp_reply='250 "queued"'),  # escaped quote: the dict way
    canonical_sent(message_id="<k1@mx>\x01"),  # a control character, escaped by JSON
    canonical_sent(smtp_reply="250 d\u00e9j\u00e0 vu"),  # non-ASCII
    canonical_sent(email="k\u00e9@example.com"),
    canonical_sent(attempt=1_000_000_000),  # beyond the expression's integers
    canonical_failed(smtp_code=0),
])
def test_deliveries_outside_the_canonical_text_still_decode_as_the_full_decoder_does(
        raw: bytes) -> None:
    same_outcome(raw)


# Substitutes that probe every rule: quotes and escapes, separators, case, digits, signs,
# characters the address and id rules refuse, whitespace, non-ASCII, a NUL.
_SUBSTITUTES = ['"', "\\", " ", ",", ":", "{", "}", "A", "z", "0", "9", "-", "+", ".", "@",
                "_", "<", ";", "\x00", "\x7f", "\u00e9", ""]


def spaced(raw: bytes) -> bytes:
    """The same document with JSON's default separators: not the canonical text, so it
    takes the second tier (the dict checks)."""
    return json.dumps(json.loads(raw)).encode()


@pytest.mark.parametrize("make", [
    canonical_sent, canonical_failed, lambda: spaced(canonical_sent()),
    lambda: spaced(canonical_failed()), raw_queued,
], ids=["sent", "failed", "sent-dict", "failed-dict", "queued-dict"])
def test_every_one_character_change_decodes_as_the_full_decoder_does(make) -> None:
    text = make().decode()
    for at in range(len(text)):
        for substitute in _SUBSTITUTES:
            if substitute != text[at]:
                same_outcome((text[:at] + substitute + text[at + 1:]).encode())


@pytest.mark.parametrize("change", [
    ('"occurred_at":"2030-01-01T12:00:00.123456Z"', '"occurred_at":"2030-02-30T12:00:00Z"'),
    ('"occurred_at":"2030-01-01T12:00:00.123456Z"', '"occurred_at":"2030-01-01T24:00:00Z"'),
    ('"occurred_at":"2030-01-01T12:00:00.123456Z"', '"occurred_at":"2030-01-01T12:00:00+25:00"'),
    ('"occurred_at":"2030-01-01T12:00:00.123456Z"', '"occurred_at":"2030-01-01T12:00:00+05:30"'),
    ('"email":"k1@example.com"', '"email":"' + "k" * 64 + "@" + "d" * 60 + ".example.com" + '"'),
    ('"email":"k1@example.com"', '"email":"k1@' + "d" * 62 + "." + "e" * 62 + "." + "f" * 62
     + "." + "g" * 62 + '.com"'),  # over 254 characters
    ('"causation_id":"00000000-0000-0000-0000-000000000007"', '"causation_id":null'),
    ('"version":2', '"version":1'),
])
def test_dates_lengths_and_versions_decode_as_the_full_decoder_does(
        change: tuple[str, str]) -> None:
    text = canonical_sent().decode()
    assert change[0] in text
    same_outcome(text.replace(change[0], change[1]).encode())


def _contact_record(first_name: str) -> bytes:
    return encode(wrap(ContactUpserted(contact_id="k1", email="k1@example.com",
                                       first_name=first_name, lists=["all"]),
                       tenant_id="acme", aggregate_id="k1", occurred_at=T0))


@pytest.mark.parametrize("first_name", ["Ann", "EmailSent", '"RecipientQueued"'],
                         ids=["no-fast-type-named", "fast-type-as-a-value", "quoted-fast-type"])
def test_other_types_decode_as_the_full_decoder_does_whatever_their_values_say(
        first_name: str) -> None:
    raw = _contact_record(first_name)
    fast, full = decode_record(raw), decode(raw)
    assert isinstance(fast, Message) and isinstance(full, Message)
    assert (fast.envelope, fast.payload) == (full.envelope, full.payload)
    text = raw.decode()
    from_text = decode_record(text)
    assert isinstance(from_text, Message) and from_text.payload == full.payload


@pytest.mark.parametrize("raw", [b'{"type":"ContactUpserted"', b'{"type":"EmailSent"', b"\xff"],
                         ids=["other-type", "fast-type", "not-utf8"])
def test_broken_records_are_refused_with_the_full_decoders_words(raw: bytes) -> None:
    with pytest.raises(SchemaViolation) as full:
        decode(raw)
    with pytest.raises(SchemaViolation) as fast:
        decode_record(raw)
    assert str(fast.value) == str(full.value)
