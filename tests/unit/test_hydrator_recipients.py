"""The hydrator's hand-written recipient records decode to what the schema path would write,
and the gatherer emits each campaign's CampaignHydrated once, after its last partition."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from schemas.envelope import decode, encode, wrap, wrap_caused_by
from schemas.events import (
    MAX_UNKNOWN_CONTACT_IDS,
    Audience,
    CampaignHydrated,
    HydrationPartitionReported,
    HydrationRequested,
    MessageTemplate,
    RecipientExcluded,
    RecipientQueued,
)
from services.hydrator.gather import ReportGatherer
from services.hydrator.recipients import RecipientRecords

TEMPLATE = MessageTemplate(subject="Hi {{ first_name }} — ünïcode", from_address="news@example.com",
                           body_text='quotes " and \\ backslashes', body_html="<p>x</p>")
AT = datetime(2026, 11, 29, 14, 0, 0, 123456, tzinfo=UTC)
CONTACT = {"id": "c-1", "email": "Zoë.O'Brien@example.com", "first_name": 'Ann "the" Bell',
           "last_name": "Ünal\nnewline", "attributes": {"plan": "pro", "city": "Zürich"}}


def cause():
    request = HydrationRequested(campaign_id="camp-1", partition=3, partitions=12, snapshot_offset=5,
                                 template=TEMPLATE, audience=Audience(list_ids=["l"]))
    return wrap(request, tenant_id="acme", aggregate_id="camp-1")


def schema_path(payload, cause_env, event_id):
    env = wrap_caused_by(payload, cause_env, aggregate_id="camp-1")
    return decode(encode(env.model_copy(update={"id": uuid.UUID(event_id), "occurred_at": AT})))


def test_queued_record_decodes_to_the_schema_paths_message():
    cause_env = cause()
    records = RecipientRecords(campaign_id="camp-1", template=TEMPLATE, cause=cause_env, occurred_at=AT)
    got = decode(records.queued(CONTACT))
    expected = schema_path(RecipientQueued(
        campaign_id="camp-1", contact_id="c-1", email=CONTACT["email"], first_name=CONTACT["first_name"],
        last_name=CONTACT["last_name"], attributes=CONTACT["attributes"], template=TEMPLATE,
    ), cause_env, records.event_id("c-1"))
    assert got.envelope == expected.envelope
    assert got.payload == expected.payload


def test_excluded_record_decodes_to_the_schema_paths_message():
    cause_env = cause()
    records = RecipientRecords(campaign_id="camp-1", template=TEMPLATE, cause=cause_env, occurred_at=AT)
    got = decode(records.excluded(CONTACT, "suppressed:hard_bounce"))
    expected = schema_path(RecipientExcluded(
        campaign_id="camp-1", contact_id="c-1", email=CONTACT["email"], reason="suppressed:hard_bounce",
    ), cause_env, records.event_id("c-1"))
    assert got.envelope == expected.envelope and got.payload == expected.payload


def test_a_redone_fan_out_writes_the_same_event_ids():
    cause_env = cause()
    first = RecipientRecords(campaign_id="camp-1", template=TEMPLATE, cause=cause_env)
    again = RecipientRecords(campaign_id="camp-1", template=TEMPLATE, cause=cause_env)
    assert decode(first.queued(CONTACT)).envelope.id == decode(again.queued(CONTACT)).envelope.id
    assert first.event_id("c-1") != first.event_id("c-2")
    assert first.event_id("c-1") == str(uuid.uuid5(first._ids, "c-1"))


def report(campaign, partition, queued, excluded=None, partitions=3):
    return HydrationPartitionReported(campaign_id=campaign, partition=partition, partitions=partitions,
                                      queued=queued, excluded=excluded or {})


def test_gatherer_emits_once_after_the_last_partition():
    gatherer = ReportGatherer()
    assert gatherer.add(report("a", 0, 5, {"deleted": 1})) is None
    assert gatherer.add(report("b", 0, 1)) is None
    assert gatherer.add(report("a", 0, 5, {"deleted": 1})) is None  # repeated: counted once
    assert gatherer.add(report("a", 2, 7, {"unsubscribed": 2, "deleted": 1})) is None
    assert gatherer.add(report("a", 1, 0)) == CampaignHydrated(
        total=12, excluded={"deleted": 2, "unsubscribed": 2})
    assert gatherer.add(report("a", 1, 0)) is None  # after completion: nothing more
    assert "a" not in gatherer.gathering and "b" in gatherer.gathering


def test_gatherer_names_every_partitions_unknown_ids_sorted_and_sums_their_count():
    gatherer = ReportGatherer()
    parts = [
        HydrationPartitionReported(campaign_id="a", partition=0, partitions=3, queued=1,
                                   unknown_contact_ids=["zed", "amy"], unknown_contact_count=2),
        HydrationPartitionReported(campaign_id="a", partition=1, partitions=3, queued=0),
        HydrationPartitionReported(campaign_id="a", partition=2, partitions=3, queued=2,
                                   unknown_contact_ids=["kim"], unknown_contact_count=1),
    ]
    assert [gatherer.add(p) for p in parts[:2]] == [None, None]
    assert gatherer.add(parts[2]) == CampaignHydrated(
        total=3, unknown_contact_ids=["amy", "kim", "zed"], unknown_contact_count=3)


def test_gatherer_names_at_most_the_bound_and_counts_every_unknown_id():
    gatherer = ReportGatherer()
    ids = sorted(f"id-{i:05d}" for i in range(2 * MAX_UNKNOWN_CONTACT_IDS))
    halves = [ids[0::2], ids[1::2]]  # each partition's own ids, each within the bound
    hydrated = None
    for partition, mine in enumerate(halves):
        hydrated = gatherer.add(HydrationPartitionReported(
            campaign_id="a", partition=partition, partitions=2, queued=0,
            unknown_contact_ids=mine, unknown_contact_count=len(mine) + 5))  # +5 beyond the list
    assert hydrated is not None
    assert hydrated.unknown_contact_ids == ids[:MAX_UNKNOWN_CONTACT_IDS]
    assert hydrated.unknown_contact_count == 2 * MAX_UNKNOWN_CONTACT_IDS + 10
