"""The projector's record decoding (projections.recipient_records) refuses what the full schema
decode refuses for its JSON, shape, types and bounds, with the full decode's reasons (the
projector logs and skips those), and yields the full decode's facts, except that the character
rules of ids and addresses are the producers': a record breaking only one of those is read as
written."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from projections.facts import RecipientFact, recipient_fact
from projections.recipient_records import decode_record
from schemas.contacts import ContactUpserted
from schemas.envelope import Message, SchemaViolation, decode, encode, wrap
from schemas.events import EmailFailed, EmailSent, MessageTemplate, RecipientQueued

T0 = datetime(2030, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)

# The fields whose character rules (and the address's normalisation) the producers own, as
# the full decode names them, and how it words a breach of one.
ENVELOPE_AS_WRITTEN = {"id", "tenant_id", "aggregate_id", "correlation_id", "causation_id"}
PAYLOAD_AS_WRITTEN = {"campaign_id", "contact_id", "email", "template.from_address",
                      "template.subject"}
CHARACTER_RULE = re.compile(r"(String should match pattern|Value error, not a valid e-mail"
                            r"|Input should be a valid UUID)")


def character_rules_only(refusal: str) -> bool:
    """Whether the full decode's reasons are all breaches of those fields' character rules."""
    kind, _, reasons = refusal.partition(": ")
    fields = ENVELOPE_AS_WRITTEN if kind == "invalid envelope" else PAYLOAD_AS_WRITTEN
    for reason in reasons.split("; "):
        where, _, what = reason.partition(": ")
        if where not in fields or not CHARACTER_RULE.match(what):
            return False
    return True


def same_outcome(raw: bytes) -> None:
    """decode_record(raw) refuses what decode refuses, else yields the same fact, but for ids
    and addresses, which it reads as written."""
    try:
        full = recipient_fact(decode(raw))
        refusal = None
    except SchemaViolation as exc:
        full, refusal = None, str(exc)
    try:
        result = decode_record(raw)
    except SchemaViolation as exc:
        assert refusal == str(exc), raw
        return
    fact = result if isinstance(result, RecipientFact) else recipient_fact(result)
    if fact == full:
        return
    # Only a character rule can be at stake: the fact holds the values as written.
    assert isinstance(fact, RecipientFact), raw
    assert refusal is None or character_rules_only(refusal), (raw, refusal)
    data = json.loads(raw)
    assert (fact.event_id, fact.tenant_id, fact.campaign_id, fact.contact_id, fact.email) == (
        data["id"], data["tenant_id"], data["payload"]["campaign_id"],
        data["payload"]["contact_id"], data["payload"]["email"]), raw
    if full is not None:
        assert fact._replace(event_id=full.event_id, email=full.email) == full, raw


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
def test_deliveries_decode_to_the_facts_of_the_full_decode(raw: bytes) -> None:
    ours = decode_record(raw)
    assert isinstance(ours, RecipientFact)
    assert ours == recipient_fact(decode(raw))


@pytest.mark.parametrize("change", [
    {"attempt": "2"},  # coerced by the schema: the full decode reads it
    {"attempt": True},
    {"ambiguous": 1.0},
])
def test_values_the_schema_coerces_decode_as_the_full_decoder_does(
        change: dict[str, object]) -> None:
    raw = raw_sent(**change)
    result = decode_record(raw)
    assert isinstance(result, Message)
    assert recipient_fact(result) == recipient_fact(decode(raw))


@pytest.mark.parametrize("mutate", [
    lambda d: d["payload"].update(attempt=0),
    lambda d: d["payload"].update(ambiguous=-1),
    lambda d: d["payload"].update(smtp_reply=250),
    lambda d: d["payload"].update(extra="x"),
    lambda d: d["payload"].pop("email"),
    lambda d: d["payload"].update(email="k" * 250 + "@x.com"),
    lambda d: d["payload"].update(campaign_id=""),
    lambda d: d.update(tenant_id="t" * 65),
    lambda d: d.update(occurred_at="2030-01-01T12:00:00"),  # no offset
    lambda d: d.update(occurred_at="2030-02-30T12:00:00Z"),
    lambda d: d.update(id="not-a-uuid"),
    lambda d: d.update(version=3),
    lambda d: d.update(extra="x"),
])
def test_invalid_deliveries_are_refused_with_the_full_decoders_reason(mutate) -> None:
    data = json.loads(raw_sent())
    mutate(data)
    raw = json.dumps(data).encode()
    with pytest.raises(SchemaViolation) as full:
        decode(raw)
    with pytest.raises(SchemaViolation) as ours:
        decode_record(raw)
    assert str(ours.value) == str(full.value)


@pytest.mark.parametrize(("field", "value"), [
    ("tenant_id", "bad tenant"), ("payload.campaign_id", "has space"),
    ("payload.email", "k1@EXAMPLE.com"), ("payload.email", "no-at-sign"),
    ("id", "12345678-1234-5678-1234-56781234567G"),
])
def test_ids_and_addresses_are_read_as_written(field: str, value: str) -> None:
    # Their character rules are the producers' (schemas.base), not checked again here.
    data = json.loads(raw_sent())
    target = data["payload"] if field.startswith("payload.") else data
    target[field.removeprefix("payload.")] = value
    raw = json.dumps(data).encode()
    fact = decode_record(raw)
    assert isinstance(fact, RecipientFact)
    assert value in (fact.event_id, fact.tenant_id, fact.campaign_id, fact.email)
    same_outcome(raw)


def test_malformed_bytes_are_rejected_with_the_full_decoders_reason() -> None:
    with pytest.raises(SchemaViolation, match="malformed JSON"):
        decode_record(b"{nope")
    with pytest.raises(SchemaViolation):
        decode_record(None)


@pytest.mark.parametrize("email", [
    "k1@example.com", "K.One+tag@example.co.uk", "k1@Example.com", " k1@example.com",
    "k1@example", "k1@@example.com", "k1@exa_mple.com", "a" * 65 + "@example.com",
])
def test_addresses_decode_as_the_full_decoder_does_or_as_written(email: str) -> None:
    same_outcome(raw_sent(email=email))


@pytest.mark.parametrize("raw", [
    b" " + raw_failed() + b"\n",  # whitespace around the document
    raw_sent().replace(b'"attempt": 2', b'"attempt": 2' + b"0" * 30),  # beyond 64 bits
    raw_sent().replace(b'"attempt": 2', b'"attempt": NaN'),
    raw_sent().replace(b'"ambiguous": 1', b'"ambiguous": 1, "ambiguous": 0'),  # repeated key
    raw_sent().replace(b'"smtp_reply": "250 ok"', b'"smtp_reply": "\\ud800"'),  # lone surrogate
])
def test_json_edge_cases_decode_as_the_full_decoder_does(raw: bytes) -> None:
    same_outcome(raw)


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


def test_a_recipient_queued_decodes_to_the_fact_of_the_full_decode() -> None:
    raw = raw_queued()
    ours = decode_record(raw)
    assert isinstance(ours, RecipientFact)
    assert ours == recipient_fact(decode(raw))
    assert (ours.status, ours.contact_id, ours.email) == ("queued", "k1", "k1@example.com")


@pytest.mark.parametrize("flags", [{"track_opens": True}, {"track_opens": True, "track_clicks": True}])
def test_a_tracked_recipient_queued_takes_the_fast_decode(flags, monkeypatch) -> None:
    raw = raw_queued(lambda d: d["payload"]["template"].update(flags))
    expected = recipient_fact(decode(raw))
    # The full decode is what a record outside the fast shape falls back to: not this one.
    monkeypatch.setattr("projections.recipient_records.decode", _refuse_full_decode)
    assert decode_record(raw) == expected


def _refuse_full_decode(raw: object) -> None:
    raise AssertionError("took the full decode")


@pytest.mark.parametrize("mutate", [
    lambda d: d["payload"]["template"].update(subject=""),
    lambda d: d["payload"]["template"].update(subject="x" * 999),
    lambda d: d["payload"]["template"].update(extra="x"),
    lambda d: d["payload"]["template"].update(body_text=5),
    lambda d: d["payload"]["template"].pop("from_address"),
    lambda d: d["payload"].update(attributes={"plan": 5}),
    lambda d: d["payload"].update(first_name=None),
])
def test_invalid_recipient_queued_is_refused_with_the_full_decoders_reason(mutate) -> None:
    raw = raw_queued(mutate)
    with pytest.raises(SchemaViolation) as full:
        decode(raw)
    with pytest.raises(SchemaViolation) as ours:
        decode_record(raw)
    assert str(ours.value) == str(full.value)


@pytest.mark.parametrize("mutate", [
    lambda d: d["payload"]["template"].update(subject="two\nlines"),  # the sender's to refuse
    lambda d: d["payload"]["template"].update(from_address="not an address"),
    lambda d: d["payload"].update(email="k1@example"),
    lambda d: d.update(aggregate_id="has space"),
])
def test_recipient_queued_ids_addresses_and_header_are_read_as_written(mutate) -> None:
    raw = raw_queued(mutate)
    assert isinstance(decode_record(raw), RecipientFact)
    same_outcome(raw)


@pytest.mark.parametrize("mutate", [
    lambda d: d["payload"].pop("first_name"),  # a default
    lambda d: d["payload"]["template"].pop("body_html"),
    lambda d: d["payload"].update(email="K1@EXAMPLE.com"),  # normalised by the schema
    lambda d: d["payload"]["template"].update(subject="x" * 998),
    lambda d: d.update(version=2),  # no such version: the full decode words it
])
def test_unusual_recipient_queued_decodes_as_the_full_decoder_does(mutate) -> None:
    same_outcome(raw_queued(mutate))


# --- deliveries exactly as schemas.envelope.encode writes them ---------------------------------

def encoded_sent(**payload: object) -> bytes:
    fields: dict[str, object] = dict(campaign_id="c-1", contact_id="k1", email="k1@example.com",
                                     message_id="<k1@mx>", attempt=2, smtp_reply="250 ok",
                                     ambiguous=1)
    fields.update(payload)
    return encode(wrap(EmailSent(**fields), tenant_id="acme", aggregate_id="c-1",
                       occurred_at=T0, causation_id=uuid.UUID(int=7)))


def encoded_failed(**payload: object) -> bytes:
    fields: dict[str, object] = dict(campaign_id="c-1", contact_id="k1", email="k1@example.com",
                                     attempt=3, reason="550 no such user", permanent=True,
                                     smtp_code=550)
    fields.update(payload)
    return encode(wrap(EmailFailed(**fields), tenant_id="acme", aggregate_id="c-1",
                       occurred_at=T0.astimezone(timezone(timedelta(hours=-5)))))


@pytest.mark.parametrize("raw", [
    encoded_sent(), encoded_sent(ambiguous=0, smtp_reply="", message_id=""),
    encoded_sent(email="O'Brien+news@mail.example.org", attempt=999_999_999),
    encoded_failed(), encoded_failed(smtp_code=None, permanent=False, reason=""),
    encoded_failed(smtp_code=-1),
], ids=["sent", "sent-empty", "sent-odd-address", "failed", "failed-no-code", "failed-minus"])
def test_encoded_deliveries_decode_to_facts_equal_to_the_full_decodes(raw: bytes) -> None:
    fact = decode_record(raw)
    assert isinstance(fact, RecipientFact)
    assert fact == recipient_fact(decode(raw))
    assert decode_record(raw.decode()) == fact


@pytest.mark.parametrize("raw", [
    encoded_sent(smtp_reply='250 "queued"'),  # escaped quote
    encoded_sent(message_id="<k1@mx>\x01"),  # a control character, escaped by JSON
    encoded_sent(smtp_reply="250 d\u00e9j\u00e0 vu"),  # non-ASCII
    encoded_sent(email="k\u00e9@example.com"),
    encoded_sent(attempt=1_000_000_000),
    encoded_failed(smtp_code=0),
])
def test_escapes_and_other_values_decode_as_the_full_decoder_does(
        raw: bytes) -> None:
    same_outcome(raw)


# Substitutes that probe every rule: quotes and escapes, separators, case, digits, signs,
# characters the address and id rules refuse, whitespace, non-ASCII, a NUL.
_SUBSTITUTES = ['"', "\\", " ", ",", ":", "{", "}", "A", "z", "0", "9", "-", "+", ".", "@",
                "_", "<", ";", "\x00", "\x7f", "\u00e9", ""]


def spaced(raw: bytes) -> bytes:
    """The same document with JSON's default separators."""
    return json.dumps(json.loads(raw)).encode()


def longest_ids() -> bytes:
    """Every id at its longest (tenant 64, entities 128), the address's labels at theirs."""
    return encode(wrap(EmailSent(
        campaign_id="c:" + "9" * 126, contact_id="X" * 128,
        email="a.b-c+d@" + "a" * 63 + "." + "b" * 62 + ".cd", message_id="<m>", attempt=1),
        tenant_id="T" + "t_.-" * 15 + "tt9", aggregate_id="c:" + "9" * 126, occurred_at=T0))


@pytest.mark.parametrize("make", [
    encoded_sent, encoded_failed, lambda: spaced(encoded_sent()),
    lambda: spaced(encoded_failed()), raw_queued, longest_ids,
], ids=["sent", "failed", "sent-spaced", "failed-spaced", "queued", "longest-ids"])
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
    ('"version":2', '"version":3'),
    ('"version":2', '"version":2.0'),
    ('"attempt":2', '"attempt":"2"'),
    ('"ambiguous":1', '"ambiguous":-1'),
    ('"type":"EmailSent"', '"type":"EmailFailed"'),
    ('"causation_id":"00000000-0000-0000-0000-000000000007"',
     '"causation_id":"00000000000000000000000000000007"'),
    ('"id":"', '"id":"{'),
])
def test_dates_lengths_and_versions_decode_as_the_full_decoder_does(
        change: tuple[str, str]) -> None:
    text = encoded_sent().decode()
    assert change[0] in text
    same_outcome(text.replace(change[0], change[1]).encode())


def _contact_record(first_name: str) -> bytes:
    return encode(wrap(ContactUpserted(contact_id="k1", email="k1@example.com",
                                       first_name=first_name, lists=["all"]),
                       tenant_id="acme", aggregate_id="k1", occurred_at=T0))


@pytest.mark.parametrize("first_name", ["Ann", "EmailSent", '"RecipientQueued"'],
                         ids=["no-ours-type-named", "ours-type-as-a-value", "quoted-ours-type"])
def test_other_types_decode_as_the_full_decoder_does_whatever_their_values_say(
        first_name: str) -> None:
    raw = _contact_record(first_name)
    ours, full = decode_record(raw), decode(raw)
    assert isinstance(ours, Message) and isinstance(full, Message)
    assert (ours.envelope, ours.payload) == (full.envelope, full.payload)
    text = raw.decode()
    from_text = decode_record(text)
    assert isinstance(from_text, Message) and from_text.payload == full.payload


@pytest.mark.parametrize("raw", [b'{"type":"ContactUpserted"', b'{"type":"EmailSent"', b"\xff"],
                         ids=["other-type", "ours-type", "not-utf8"])
def test_broken_records_are_refused_with_the_full_decoders_words(raw: bytes) -> None:
    with pytest.raises(SchemaViolation) as full:
        decode(raw)
    with pytest.raises(SchemaViolation) as ours:
        decode_record(raw)
    assert str(ours.value) == str(full.value)


def _with_time(stamp: str) -> bytes:
    text = encoded_sent().decode()
    return text.replace('"2030-01-01T12:00:00.123456Z"', f'"{stamp}"').encode()


@pytest.mark.parametrize("year", [1, 1900, 2024, 9999])
def test_every_day_of_the_year_decodes_as_the_full_decoder_does(year: int) -> None:
    for month in range(0, 14):
        for day in range(0, 33):
            same_outcome(_with_time(f"{year:04d}-{month:02d}-{day:02d}T12:00:00Z"))


@pytest.mark.parametrize("zone", ["Z", "+00:00", "-00:00", "+23:59", "-12:30", "+24:00",
                                  "+05:60", "+5:30", "+05", "z", "UTC", ""])
@pytest.mark.parametrize("fraction", ["", ".1", ".123", ".123456", "."])
def test_zones_and_fractions_decode_as_the_full_decoder_does(zone: str, fraction: str) -> None:
    raw = _with_time(f"2026-11-30T23:59:59{fraction}{zone}")
    same_outcome(raw)
    try:
        full = recipient_fact(decode(raw))
    except SchemaViolation:
        return
    result = decode_record(raw)
    assert isinstance(result, RecipientFact) and full is not None
    assert result.occurred_at.utcoffset() == full.occurred_at.utcoffset()  # and the same offset


def test_digits_beyond_the_microsecond_are_rounded_not_truncated() -> None:
    # The one documented difference (pydantic never writes such times).
    result = decode_record(_with_time("2026-11-30T23:59:59.1234567Z"))
    assert isinstance(result, RecipientFact)
    assert result.occurred_at == datetime(2026, 11, 30, 23, 59, 59, 123457, tzinfo=UTC)


def test_the_fact_carries_the_records_values() -> None:
    fact = decode_record(encoded_failed(smtp_code=-421, ambiguous=2))
    assert isinstance(fact, RecipientFact)
    assert (fact.type, fact.status, fact.attempt, fact.smtp_code, fact.ambiguous, fact.detail,
            fact.tenant_id, fact.campaign_id, fact.contact_id, fact.email) == (
        "EmailFailed", "failed", 3, -421, 2, "550 no such user", "acme", "c-1", "k1",
        "k1@example.com")
    assert fact.occurred_at == T0 and fact.occurred_at.utcoffset() == timedelta(hours=-5)
    raw = encoded_sent()
    sent = decode_record(raw)
    assert isinstance(sent, RecipientFact)
    assert (sent.status, sent.attempt, sent.ambiguous, sent.smtp_code, sent.detail) == (
        "sent", 2, 1, None, None)
    assert sent.event_id == str(decode(raw).envelope.id)
