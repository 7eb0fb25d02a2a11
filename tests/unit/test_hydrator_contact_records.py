"""The hydrator's fast ContactUpserted decode (services.hydrator.contact_records) against the
pydantic decode: the same event for good records, the same refusal for bad ones."""

from __future__ import annotations

import json
import uuid

import msgspec
import orjson
import pytest

from schemas.contacts import ContactDeleted, ContactUpserted
from schemas.envelope import SchemaViolation, decode, encode, wrap
from schemas.events import CampaignCancelled
from services.hydrator import contact_records
from services.hydrator.audience import apply_to_stored
from services.hydrator.contact_records import (
    Upsert,
    _canonical_upsert,
    _fast_upsert,
    apply_record,
    contact_event,
    encode_stored,
    new_contact,
)

UPSERT = ContactUpserted(contact_id="c-1", email="ann@example.com", first_name="Ann", last_name="Lee",
                         attributes={"plan": "team"}, lists=["l-1", "l-2"])


def record(**changes):
    """A ContactUpserted record as JSON, with envelope or payload fields changed (None: removed),
    spelled with spaces after separators (so not as `encode` writes it)."""
    return json.dumps(_changed(changes)).encode()


def compact(**changes):
    """The same record spelled as `encode` writes it (compact, fields in the envelope's order):
    the form the canonical path reads."""
    return json.dumps(_changed(changes), separators=(",", ":"), ensure_ascii=False).encode()


def _changed(changes):
    data = json.loads(encode(wrap(UPSERT, tenant_id="acme", aggregate_id="c-1")))
    for path, value in changes.items():
        target, name = data, path
        if path.startswith("p_"):
            target, name = data["payload"], path[2:]
        if value is None:
            target.pop(name, None)
        else:
            target[name] = value
    return data


def pydantic_outcome(raw):
    try:
        payload = decode(raw).payload
    except SchemaViolation:
        return "refused"
    return payload.model_dump() if isinstance(payload, ContactUpserted | ContactDeleted) else "other"


def fast_outcome(raw):
    try:
        event = contact_event(raw)
    except SchemaViolation:
        return "refused"
    if isinstance(event, Upsert):
        return msgspec.structs.asdict(event)
    return "other" if event is None else event.model_dump()


GOOD = [
    record(),
    record(p_attributes=None, p_lists=None, p_first_name=None, p_last_name=None),
    record(causation_id="3f1b7c2e-8a4d-4f5e-9c6b-1a2b3c4d5e6f"),
    record(occurred_at="2026-12-07T08:00:00+02:00"),
    record(p_email="ann.o'neil+news@xn--bcher-kva.example"),
    record(p_first_name="x" * 200),
]
BAD = [
    b"not json", b"", b"null", b"[]", b'{"type": "ContactUpserted"}',
    record(id="not-a-uuid"), record(id=None), record(tenant_id="-bad"), record(tenant_id=""),
    record(aggregate_id="a b"), record(version=0), record(version="1"), record(version=2),
    record(occurred_at="2026-12-07T08:00:00"), record(occurred_at="2026-13-07T08:00:00Z"),
    record(occurred_at="yesterday"), record(correlation_id=7), record(extra="x"),
    record(p_contact_id="bad id"), record(p_contact_id=None), record(p_email="no-at-sign"),
    record(p_email="ann@Example.COM"), record(p_email=" ann@example.com"), record(p_email=None),
    record(p_first_name="x" * 201), record(p_last_name=5), record(p_attributes={"a": 1}),
    record(p_lists=["ok", "not ok"]), record(p_lists="l-1"), record(p_extra=True),
    record(type="ContactUpsertedX"), record(payload=None),
]


GOOD_CHANGES = [
    {}, {"p_attributes": None, "p_lists": None, "p_first_name": None, "p_last_name": None},
    {"causation_id": "3f1b7c2e-8a4d-4f5e-9c6b-1a2b3c4d5e6f"},
    {"occurred_at": "2026-12-07T08:00:00+02:00"}, {"occurred_at": "2024-02-29T23:59:59.5-11:30"},
    {"p_email": "ann.o'neil+news@xn--bcher-kva.example"}, {"p_first_name": "x" * 200},
    {"p_first_name": 'Zoë "Z" \\ O\'Neil'}, {"p_lists": ["l-2", "l-1", "l-2"]},
    {"p_contact_id": "c-2"},  # another contact id than the aggregate's: checked on its own
]
# The canonical spelling of records the canonical path must not accept as they are.
BAD_COMPACT = [
    compact(occurred_at="2026-13-07T08:00:00Z"), compact(occurred_at="2026-02-30T08:00:00Z"),
    compact(occurred_at="2026-12-07T24:00:00Z"), compact(occurred_at="2026-12-07T08:60:00Z"),
    compact(occurred_at="2026-12-07T08:00:00+24:00"), compact(occurred_at="2026-12-07T08:00:00"),
    compact(occurred_at="2026-12-07T08:00:00.1234567Z"), compact(occurred_at="2026-12-07 08:00:00Z"),
    compact(id="3F1B7C2E-8A4D-4F5E-9C6B-1A2B3C4D5E6F"), compact(id="3f1b7c2e8a4d4f5e9c6b1a2b3c4d5e6f"),
    compact(correlation_id="not-a-uuid"), compact(causation_id="x"), compact(tenant_id="-bad"),
    compact(tenant_id="a" * 65), compact(aggregate_id="a b"), compact(version=2),
    compact(type="ContactDeleted"), compact(p_contact_id="bad id"), compact(p_contact_id="c" * 129),
    compact(p_email="ann@Example.COM"), compact(p_email="no-at-sign"), compact(p_email="a" * 65 + "@example.com"),
    compact(p_first_name="x" * 201), compact(p_lists=["ok", "not ok"]), compact(p_lists=["bad id"]),
    compact(p_attributes={"a": 1}), compact(p_extra=True), compact(payload=None),
    compact(payload="text"), compact(payload=[1]),
    compact()[:-1] + b',"extra":1}', compact()[:-1] + b"}}", compact()[:-1] + b" x}", compact()[:-1],
    compact() + b"\n", b" " + compact(), compact().replace(b'"payload":', b'"payload" :'),
    compact().replace(b'"version":1', b'"version":1.0'),
    compact().replace(b'"version":1', b'"version":true'),
    compact().replace(b'"tenant_id":"acme"', b'"tenant_id":"\\u0061cme"'),
]


@pytest.mark.parametrize("raw", GOOD)
def test_good_upserts_take_the_fast_path_and_decode_the_same(raw):
    assert _fast_upsert(raw) is not None
    assert fast_outcome(raw) == pydantic_outcome(raw) != "refused"


@pytest.mark.parametrize("changes", GOOD_CHANGES)
def test_good_upserts_as_encode_writes_them_take_the_canonical_path(changes):
    raw = compact(**changes)
    assert _canonical_upsert(raw) is not None
    assert fast_outcome(raw) == pydantic_outcome(raw) != "refused"


def test_records_from_encode_itself_take_the_canonical_path():
    for causation in (None, "3f1b7c2e-8a4d-4f5e-9c6b-1a2b3c4d5e6f"):
        envelope = wrap(UPSERT, tenant_id="acme", aggregate_id="c-1",
                        causation_id=None if causation is None else uuid.UUID(causation))
        raw = encode(envelope)
        assert _canonical_upsert(raw) == contact_event(raw) == _fast_upsert(raw)


@pytest.mark.parametrize("raw", BAD)
def test_bad_records_get_the_pydantic_paths_outcome(raw):
    # Some are fixed up by the pydantic path (an upper-case domain is lower-cased, a
    # version string is coerced): whatever it decides, the fast decode decides the same.
    assert fast_outcome(raw) == pydantic_outcome(raw)


@pytest.mark.parametrize("raw", BAD_COMPACT)
def test_the_canonical_path_leaves_what_it_cannot_vouch_for_to_the_others(raw):
    assert _canonical_upsert(raw) is None
    assert fast_outcome(raw) == pydantic_outcome(raw)


def test_an_invalid_list_id_is_never_remembered_and_a_full_memory_starts_over(monkeypatch):
    monkeypatch.setattr(contact_records, "_valid_list_ids", set())
    monkeypatch.setattr(contact_records, "REMEMBERED", 3)
    assert _canonical_upsert(compact(p_lists=["not ok"])) is None
    assert _canonical_upsert(compact(p_lists=["not ok"])) is None
    assert contact_records._valid_list_ids == set()
    for name in ("a", "b", "c", "d"):
        assert _canonical_upsert(compact(p_lists=[name])) is not None
    assert contact_records._valid_list_ids == {"d"}


def test_an_invalid_date_is_never_remembered(monkeypatch):
    monkeypatch.setattr(contact_records, "_valid_dates", set())
    assert _canonical_upsert(compact(occurred_at="2026-02-30T08:00:00Z")) is None
    assert _canonical_upsert(compact(occurred_at="2026-02-28T08:00:00Z")) is not None
    assert contact_records._valid_dates == {b"2026-02-28"}


def test_refused_records_raise_schema_violation_with_the_reason():
    with pytest.raises(SchemaViolation, match="contact_id"):
        contact_event(record(p_contact_id="bad id"))
    with pytest.raises(SchemaViolation):
        contact_event(None)


def test_other_contact_events_and_other_types():
    deleted = encode(wrap(ContactDeleted(contact_id="c-1"), tenant_id="acme", aggregate_id="c-1"))
    assert contact_event(deleted) == ContactDeleted(contact_id="c-1")
    cancelled = encode(wrap(CampaignCancelled(reason="x"), tenant_id="acme", aggregate_id="camp-1"))
    assert contact_event(cancelled) is None


STORED_BEFORE = [
    None,
    {"id": "c-1", "email": "old@example.com", "first_name": "O", "last_name": "L",
     "attributes": {"plan": "free", "city": "Oslo"}, "lists": ["l-0", "l-2"],
     "unsubscribed_lists": ["l-9"], "globally_unsubscribed": False, "suppressed_reason": None,
     "deleted": False, "partition": 4, "first_offset": 3},
    {"id": "c-1", "email": "", "first_name": "", "last_name": "", "attributes": {}, "lists": [],
     "unsubscribed_lists": [], "globally_unsubscribed": True, "suppressed_reason": "bounce",
     "deleted": True, "partition": 4, "first_offset": 1},
    # An older stored form without the flag fields.
    {"id": "c-1", "email": "old@example.com", "first_name": "", "last_name": "", "attributes": {},
     "lists": ["l-5"], "partition": 4, "first_offset": 2},
]


@pytest.mark.parametrize("existing", STORED_BEFORE)
def test_an_upsert_folds_onto_the_stored_form_as_apply_to_stored_does(existing):
    fast = contact_event(record())
    assert isinstance(fast, Upsert)
    assert apply_record(existing, fast, offset=9, partition=4) == apply_to_stored(
        existing, UPSERT, offset=9, partition=4)


@pytest.mark.parametrize("changes", GOOD_CHANGES)
def test_a_new_contacts_stored_bytes_are_those_of_the_general_fold(changes):
    raw = compact(**changes)
    event = contact_event(raw)
    assert isinstance(event, Upsert)
    stored = new_contact(event, offset=9, partition=4)
    folded = apply_record(None, event, offset=9, partition=4)
    assert folded is not None and stored == encode_stored(folded)
    pydantic_event = decode(raw).payload
    assert isinstance(pydantic_event, ContactUpserted)
    assert orjson.loads(stored) == apply_to_stored(None, pydantic_event, offset=9, partition=4)
