"""Audience resolution in the hydrator: lists, ids, snapshot, tenants and exclusions."""

from __future__ import annotations

from datetime import UTC, datetime

from schemas.contacts import (
    ContactDeleted,
    ContactListMembershipAdded,
    ContactSuppressed,
    ContactUnsubscribed,
    ContactUpserted,
    contact_key,
)
from schemas.events import Audience, AudienceSegment
from schemas.segments import parse_criteria
from services.hydrator.audience import (
    apply_to_stored,
    key_partition,
    resolve_audience,
    sum_exclusions,
    unknown_picks,
)


def stored(events, offset=0, partition=0):
    contact = None
    for event in events:
        contact = apply_to_stored(contact, event, offset=offset, partition=partition)
    return contact


def upsert(cid, lists=()):
    return ContactUpserted(contact_id=cid, email=f"{cid}@example.com", lists=list(lists))


def resolve(table, audience, snapshot=100, tenant="t", partition=0):
    return {key: reason for key, _, reason in resolve_audience(
        table.items(), tenant_id=tenant, partition=partition, audience=audience, snapshot_offset=snapshot)}


def test_each_contact_of_the_audience_is_queued_or_excluded_with_a_reason():
    table = {
        "t:a": stored([upsert("a", ["l1", "l2"])]),
        "t:b": stored([upsert("b", ["l2"]), ContactSuppressed(contact_id="b", reason="hard_bounce")]),
        "t:c": stored([upsert("c", ["l1"]), ContactUnsubscribed(contact_id="c")]),
        "t:d": stored([upsert("d", ["l1"]), ContactUnsubscribed(contact_id="d", list_id="l1")]),
        "t:e": stored([upsert("e", ["l1", "l3"]), ContactUnsubscribed(contact_id="e", list_id="l3")]),
        "t:f": stored([upsert("f"), ContactDeleted(contact_id="f")]),
        "t:g": stored([upsert("g", ["other"])]),
        "u:a": stored([upsert("a", ["l1"])]),  # another tenant
    }
    got = resolve(table, Audience(list_ids=["l1", "l2"], contact_ids=["f"]))
    assert got == {
        "t:a": None,
        "t:b": "suppressed:hard_bounce",
        "t:c": "unsubscribed",
        "t:d": "unsubscribed",
        "t:e": None,       # left l3 only, and l3 is not targeted
        "t:f": "deleted",  # hand-picked, but deleted
    }


def test_snapshot_and_partition_limit_the_audience():
    table = {
        "t:early": stored([upsert("early", ["l"])], offset=5),
        "t:late": stored([upsert("late", ["l"])], offset=50),
        "t:elsewhere": stored([upsert("elsewhere", ["l"])], offset=1, partition=3),
    }
    assert resolve(table, Audience(list_ids=["l"]), snapshot=50) == {"t:early": None}


def test_first_offset_is_kept_across_updates():
    contact = stored([upsert("a", ["l"])], offset=3)
    updated = apply_to_stored(contact, upsert("a", ["m"]), offset=90, partition=0)
    assert updated is not None and updated["first_offset"] == 3 and updated["lists"] == ["l", "m"]


def test_events_before_any_upsert_store_nothing_but_a_flag():
    assert apply_to_stored(None, ContactListMembershipAdded(contact_id="x", list_id="l"), offset=0,
                           partition=0) is None
    flagged = apply_to_stored(None, ContactSuppressed(contact_id="x", reason="complaint"), offset=0, partition=0)
    assert flagged is not None and flagged["deleted"] and flagged["suppressed_reason"] == "complaint"
    # The upsert that creates the contact keeps the flag: it is excluded, not mailed.
    contact = apply_to_stored(flagged, upsert("x", ["l"]), offset=1, partition=0)
    assert contact is not None and not contact["deleted"] and contact["suppressed_reason"] == "complaint"
    assert resolve({"t:x": contact}, Audience(list_ids=["l"]), snapshot=50) == {"t:x": "suppressed:complaint"}


def test_exclusions_are_summed_by_reason():
    assert sum_exclusions([{"unsubscribed": 1}, {"unsubscribed": 2, "deleted": 1}]) == {
        "deleted": 1, "unsubscribed": 3}


def attrs(cid, lists=(), **attributes):
    return ContactUpserted(contact_id=cid, email=f"{cid}@example.com", lists=list(lists), attributes=attributes)


def segment(segment_id, criteria):
    return AudienceSegment(segment_id=segment_id, criteria=parse_criteria(criteria))


def test_ids_lists_and_segments_overlap_into_one_recipient_each_minus_exclusions():
    now = datetime(2026, 11, 29, tzinfo=UTC)
    table = {
        "t:a": stored([attrs("a", ["l1"], plan="pro")]),           # list and segment
        "t:b": stored([attrs("b", [], plan="pro")]),               # segment only
        "t:c": stored([attrs("c", [], plan="free")]),              # picked only
        "t:d": stored([attrs("d", ["l1", "vip"], plan="pro")]),    # in an exclusion list
        "t:e": stored([attrs("e", [], plan="pro", signup="2026-11-20")]),  # matches the exclusion segment
        "t:f": stored([attrs("f", ["l1"], plan="pro"), ContactSuppressed(contact_id="f", reason="complaint")]),
        "t:g": stored([attrs("g", [], plan="free")]),              # named by nothing
        "t:h": stored([attrs("h", ["vip"], plan="team")]),         # only in the exclusion list
    }
    audience = Audience(
        contact_ids=["c", "a"], list_ids=["l1"],
        segments=[segment("pro", {"op": "in", "field": "attr.plan", "values": ["pro", "team"]})],
        exclude_list_ids=["vip"],
        exclude_segments=[segment("new", {"op": "after", "field": "attr.signup", "value": "30 days ago"})],
    )
    got = {key: reason for key, _, reason in resolve_audience(
        table.items(), tenant_id="t", partition=0, audience=audience, snapshot_offset=100, now=now)}
    assert got == {
        "t:a": None, "t:b": None, "t:c": None,
        "t:d": "excluded_list",
        "t:e": "excluded_segment",
        "t:f": "suppressed:complaint",   # the contact's own state comes first
        "t:h": "excluded_list",
    }


def test_relative_dates_are_read_against_the_send_time():
    table = {"t:e": stored([attrs("e", [], signup="2026-11-20")])}
    audience = Audience(segments=[segment("new", {"op": "after", "field": "attr.signup", "value": "30 days ago"})])

    def resolve_at(now):
        return [key for key, _, _ in resolve_audience(
            table.items(), tenant_id="t", partition=0, audience=audience, snapshot_offset=100, now=now)]
    assert resolve_at(datetime(2026, 11, 29, tzinfo=UTC)) == ["t:e"]
    assert resolve_at(datetime(2027, 1, 29, tzinfo=UTC)) == []


# --- hand-picked ids that name no contact ---------------------------------------------------

PARTITIONS = 12


def in_partition(tenant, partition, count, prefix="id"):
    """`count` contact ids whose record key (tenant + id) lives in `partition`."""
    found: list[str] = []
    i = 0
    while len(found) < count:
        cid = f"{prefix}-{i}"
        if key_partition(contact_key(tenant, cid), PARTITIONS) == partition:
            found.append(cid)
        i += 1
    return found


def picks(ids, table, *, tenant="t", partition=0, snapshot=100):
    return unknown_picks(ids, tenant_id=tenant, partition=partition, partitions=PARTITIONS,
                         snapshot_offset=snapshot, stored=lambda key: table.get(key.decode()))


def test_a_pick_is_unknown_where_its_key_lives_when_the_tenant_has_no_such_contact():
    known, missing = in_partition("t", 3, 2)
    elsewhere = in_partition("t", 4, 1)[0]
    table = {f"t:{known}": stored([upsert(known)], partition=3)}
    assert picks([known, missing, elsewhere, missing], table, partition=3) == [missing]
    assert picks([known, missing, elsewhere], table, partition=4) == [elsewhere]
    # Over every partition, each unknown pick is named exactly once.
    everywhere = [i for p in range(PARTITIONS) for i in picks([known, missing, elsewhere], table, partition=p)]
    assert sorted(everywhere) == sorted([missing, elsewhere])


def test_another_tenants_contact_is_unknown_exactly_like_an_id_that_exists_nowhere():
    theirs, nowhere = in_partition("t", 5, 2)
    table = {f"other:{theirs}": stored([upsert(theirs)], partition=5)}  # tenant "other" has it
    assert picks([theirs, nowhere], table, partition=5) == sorted([theirs, nowhere])


def test_a_deleted_contact_is_known_and_one_that_joined_after_the_snapshot_is_not():
    deleted, late = in_partition("t", 0, 2)
    table = {f"t:{deleted}": stored([upsert(deleted), ContactDeleted(contact_id=deleted)], offset=3),
             f"t:{late}": stored([upsert(late)], offset=150)}
    assert picks([deleted, late], table, snapshot=100) == [late]
    got = resolve(table, Audience(contact_ids=[deleted, late]), snapshot=100)
    assert got == {f"t:{deleted}": "deleted"}  # the deleted pick is an exclusion, not unknown


# Kafka's own test vectors for Java's Utils.murmur2 (clients' UtilsTest), as signed ints.
JAVA_MURMUR2 = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536,
                b"a-little-bit-longer-string": -1486304829, b"abc": 479470107,
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971}


def test_the_partition_of_a_key_is_javas_murmur2_as_every_producer_uses():
    for key, java in JAVA_MURMUR2.items():
        for partitions in (1, 6, 12, 7):
            assert key_partition(key, partitions) == (java & 0x7FFFFFFF) % partitions
