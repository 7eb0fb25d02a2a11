"""The hydrator's fast ContactUpserted decode (services.hydrator.contact_records) against the
pydantic decode: the same event for good records, the same refusal for bad ones."""

from __future__ import annotations

import json

import msgspec
import pytest

from schemas.contacts import ContactDeleted, ContactUpserted
from schemas.envelope import SchemaViolation, decode, encode, wrap
from schemas.events import CampaignCancelled
from services.hydrator.audience import apply_to_stored
from services.hydrator.contact_records import Upsert, _fast_upsert, apply_record, contact_event

UPSERT = ContactUpserted(contact_id="c-1", email="ann@example.com", first_name="Ann", last_name="Lee",
                         attributes={"plan": "team"}, lists=["l-1", "l-2"])


def record(**changes):
    """A ContactUpserted record as JSON, with envelope or payload fields changed (None: removed)."""
    data = json.loads(encode(wrap(UPSERT, tenant_id="acme", aggregate_id="c-1")))
    for path, value in changes.items():
        target, name = data, path
        if path.startswith("p_"):
            target, name = data["payload"], path[2:]
        if value is None:
            target.pop(name, None)
        else:
            target[name] = value
    return json.dumps(data).encode()


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


@pytest.mark.parametrize("raw", GOOD)
def test_good_upserts_take_the_fast_path_and_decode_the_same(raw):
    assert _fast_upsert(raw) is not None
    assert fast_outcome(raw) == pydantic_outcome(raw) != "refused"


@pytest.mark.parametrize("raw", BAD)
def test_bad_records_get_the_pydantic_paths_outcome(raw):
    # Some are fixed up by the pydantic path (an upper-case domain is lower-cased, a
    # version string is coerced): whatever it decides, the fast decode decides the same.
    assert fast_outcome(raw) == pydantic_outcome(raw)


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
