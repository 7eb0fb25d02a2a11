"""Wire schemas: envelope round trip, strictness, upcasting, committed JSON Schema files."""

from __future__ import annotations

import json
import uuid
from datetime import datetime

import pytest
from pydantic import ValidationError

from schemas import registry
from schemas.base import InvalidEmail, Record, normalise_email
from schemas.commands import CreateCampaign, SendCampaign
from schemas.envelope import SchemaViolation, decode, encode, wrap
from schemas.export import OUT, rendered


def test_round_trip_keeps_ids_and_payload():
    cmd = SendCampaign(contact_ids=["a"], list_ids=["l"])
    env = wrap(cmd, tenant_id="acme", aggregate_id="c1")
    msg = decode(encode(env))
    assert msg.payload == cmd
    assert msg.envelope.id == env.id == msg.envelope.correlation_id
    assert msg.envelope.type == "SendCampaign" and msg.envelope.version == 2
    assert msg.envelope.occurred_at.tzinfo is not None


def test_records_are_frozen_and_closed():
    cmd = SendCampaign(list_ids=["l"])
    with pytest.raises(ValidationError):
        setattr(cmd, "list_ids", [])  # noqa: B010 - mypy rejects the assignment this checks
    with pytest.raises(ValidationError, match="Extra inputs"):
        SendCampaign.model_validate({"list_ids": ["l"], "surprise": 1})


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{nope", "malformed JSON"),
        (b"[]", "invalid envelope"),
        (None, "empty record value"),
    ],
)
def test_bad_bytes_are_a_schema_violation(raw, reason):
    with pytest.raises(SchemaViolation, match=reason):
        decode(raw)


def test_unknown_type_and_naive_time_are_rejected():
    env = json.loads(encode(wrap(SendCampaign(list_ids=["l"]), tenant_id="t", aggregate_id="c")))
    with pytest.raises(SchemaViolation, match="unknown message type"):
        decode(json.dumps({**env, "type": "Nope"}))
    with pytest.raises(SchemaViolation, match="invalid envelope"):
        decode(json.dumps({**env, "occurred_at": datetime(2026, 1, 1).isoformat()}))  # noqa: DTZ001
    with pytest.raises(SchemaViolation, match="newer than this code"):
        decode(json.dumps({**env, "version": 9}))


def test_header_injection_in_subject_is_refused():
    with pytest.raises(ValidationError):
        CreateCampaign(name="n", subject="hi\r\nBcc: victim@example.com", from_address="a@example.com",
                       body_text="b")


def test_campaign_needs_a_body():
    with pytest.raises(ValidationError, match="body_text, body_html or both"):
        CreateCampaign(name="n", subject="s", from_address="a@example.com")


@pytest.mark.parametrize("bad", ["", "no-at", "a@b", "a b@example.com", "a@exa mple.com", "x" * 300 + "@e.com"])
def test_invalid_emails(bad):
    with pytest.raises(InvalidEmail):
        normalise_email(bad)


def test_email_normalisation_lowercases_the_domain_only():
    assert normalise_email("  Jane.Doe@Example.COM ") == "Jane.Doe@example.com"


def test_old_versions_are_upcast_on_read():
    @registry.message(f"TestThing{uuid.uuid4().hex}", 2)
    class Thing(Record):
        name: str
        size: int

    type_name, _ = registry.wire_name(Thing)
    registry.upcaster(type_name, 1)(lambda payload: {**payload, "size": 0})
    thing = registry.load(type_name, 1, {"name": "old"})
    assert thing == Thing(name="old", size=0)


def test_committed_json_schemas_are_current():
    committed = {p.name: p.read_text() for p in OUT.glob("*.json")}
    current = {name: text for name, text in rendered().items() if not name.startswith("TestThing")}
    assert committed == current, "schemas/json is stale: run `make schemas`"


def test_an_event_caused_by_a_message_keeps_its_tenant_and_flow():
    from schemas.envelope import wrap_caused_by

    cause = wrap(SendCampaign(list_ids=["l"]), tenant_id="acme", aggregate_id="c1")
    effect = wrap_caused_by(SendCampaign(list_ids=["m"]), cause, aggregate_id="c2")
    assert (effect.tenant_id, effect.aggregate_id) == ("acme", "c2")
    assert effect.correlation_id == cause.correlation_id and effect.causation_id == cause.id
    assert wrap_caused_by(SendCampaign(list_ids=["m"]), cause).aggregate_id == "c1"


@pytest.mark.parametrize("type_name", ["CampaignHydrated", "HydrationPartitionReported"])
def test_hydration_facts_of_v1_and_v2_upcast_to_none_unknown(type_name):
    from schemas.events import CampaignHydrated, HydrationPartitionReported

    base = {"total": 4} if type_name == "CampaignHydrated" else {
        "campaign_id": "c1", "partition": 0, "partitions": 12, "queued": 4}
    for version, payload in ((1, base), (2, {**base, "excluded": {"deleted": 1}})):
        loaded = registry.load(type_name, version, dict(payload))
        assert isinstance(loaded, CampaignHydrated | HydrationPartitionReported)
        assert (loaded.unknown_contact_ids, loaded.unknown_contact_count) == ([], 0)
        assert loaded.excluded == payload.get("excluded", {})


def test_unknown_contact_ids_are_bounded_and_well_formed():
    from schemas.events import MAX_UNKNOWN_CONTACT_IDS, CampaignHydrated

    CampaignHydrated(total=0, unknown_contact_ids=["a"] * MAX_UNKNOWN_CONTACT_IDS,
                     unknown_contact_count=MAX_UNKNOWN_CONTACT_IDS * 3)
    with pytest.raises(ValidationError):
        CampaignHydrated(total=0, unknown_contact_ids=["a"] * (MAX_UNKNOWN_CONTACT_IDS + 1))
    with pytest.raises(ValidationError):
        CampaignHydrated(total=0, unknown_contact_ids=["not an id"], unknown_contact_count=1)
