"""Audience resolution over one partition's contacts: pure functions, no I/O.

A contact is stored once per tenant + normalised e-mail (its id is derived from both), so
resolving hand-picked ids, lists and segments over the contacts of a partition yields each
contact at most once, however many of them name it. Each contact of the audience is either
queued or excluded with one reason, never both, so queued + excluded is the raw audience.
Reasons, by precedence: deleted, suppressed:<reason>, unsubscribed (the contact's own state),
then excluded_list, excluded_segment (the campaign's exclusions).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiokafka.partitioner import murmur2

from schemas.contacts import (
    ContactEvent,
    ContactState,
    apply_contact_event,
    contact_key,
    exclusion_reason,
)
from schemas.events import Audience
from schemas.segments import evaluate

StoredContact = dict[str, Any]
# Reasons for contacts the campaign itself leaves out (its exclusion lists and segments).
EXCLUDED_BY_LIST = "excluded_list"
EXCLUDED_BY_SEGMENT = "excluded_segment"
Key = TypeVar("Key", str, bytes)


def to_stored(state: ContactState, *, partition: int, first_offset: int) -> StoredContact:
    """The JSON form kept in the hydrator's contacts table."""
    return {
        "id": state.id,
        "email": state.email,
        "first_name": state.first_name,
        "last_name": state.last_name,
        "attributes": dict(state.attributes),
        "lists": sorted(state.lists),
        "unsubscribed_lists": sorted(state.unsubscribed_lists),
        "globally_unsubscribed": state.globally_unsubscribed,
        "suppressed_reason": state.suppressed_reason,
        "deleted": state.deleted,
        "partition": partition,
        "first_offset": first_offset,
    }


def from_stored(stored: Mapping[str, Any]) -> ContactState:
    return ContactState(
        id=stored["id"],
        email=stored["email"],
        first_name=stored["first_name"],
        last_name=stored["last_name"],
        attributes=dict(stored["attributes"]),
        lists=frozenset(stored["lists"]),
        unsubscribed_lists=frozenset(stored.get("unsubscribed_lists", ())),
        globally_unsubscribed=stored.get("globally_unsubscribed", False),
        suppressed_reason=stored.get("suppressed_reason"),
        deleted=stored.get("deleted", False),
    )


def apply_to_stored(existing: Mapping[str, Any] | None, event: ContactEvent, *, offset: int,
                    partition: int) -> StoredContact | None:
    """The stored contact after one contact event (None: nothing to store yet).
    `first_offset` keeps when the contact first appeared, for audience snapshots."""
    state = apply_contact_event(from_stored(existing) if existing else None, event)
    if state is None:
        return None
    first_offset = existing["first_offset"] if existing else offset
    return to_stored(state, partition=partition, first_offset=first_offset)


def resolve_audience(
    contacts: Iterable[tuple[Key, StoredContact]],
    *,
    tenant_id: str,
    partition: int,
    audience: Audience,
    snapshot_offset: int,
    now: datetime | None = None,
) -> Iterator[tuple[Key, StoredContact, str | None]]:
    """Contacts of `tenant_id` in `partition`, known before the snapshot, that the audience
    names (by id, list or segment), each with the reason it must not be mailed, or None.
    Keys are the contacts' record keys (`tenant:contact`, str or bytes). `now` is the moment
    relative dates in segments are read against (the send request's time, so that a
    redone fan-out decides the same)."""
    prefix = f"{tenant_id}:"
    byte_prefix = prefix.encode()
    lists = set(audience.list_ids)
    ids = set(audience.contact_ids)
    segments = [s.criteria for s in audience.segments]
    excluded_lists = set(audience.exclude_list_ids)
    excluded_segments = [s.criteria for s in audience.exclude_segments]
    moment = now or datetime.now(UTC)
    for key, contact in contacts:
        own = key.startswith(byte_prefix) if isinstance(key, bytes) else key.startswith(prefix)
        if contact["partition"] != partition or not own:
            continue
        if contact["first_offset"] >= snapshot_offset:
            continue  # joined after sending started: not part of this campaign
        state: ContactState | None = None
        if not (contact["id"] in ids or not lists.isdisjoint(contact["lists"])):
            if not segments:
                continue
            state = from_stored(contact)
            if not any(evaluate(criteria, state, moment) for criteria in segments):
                continue
        reason = _exclusion(contact, audience.list_ids)
        if reason is None and excluded_lists and not excluded_lists.isdisjoint(contact["lists"]):
            reason = EXCLUDED_BY_LIST
        if reason is None and excluded_segments:
            state = state or from_stored(contact)
            if any(evaluate(criteria, state, moment) for criteria in excluded_segments):
                reason = EXCLUDED_BY_SEGMENT
        yield key, contact, reason


def key_partition(key: bytes, partitions: int) -> int:
    """The partition every producer of contacts.events writes `key` to: murmur2, as Java's
    default partitioner and librdkafka's murmur2_random (services/common/kafka.py)."""
    return (int(murmur2(key)) & 0x7FFFFFFF) % partitions


def unknown_picks(
    contact_ids: Iterable[str],
    *,
    tenant_id: str,
    partition: int,
    partitions: int,
    snapshot_offset: int,
    stored: Callable[[bytes], StoredContact | None],
) -> list[str]:
    """The hand-picked `contact_ids` that live in `partition` (by their record key, tenant +
    id) and name no contact of `tenant_id` known before the snapshot, sorted, each once.

    `stored(key)` is the partition's stored contact of that key, or None. Keys are tenant-
    scoped, so an id of another tenant's contact is unknown exactly like one that exists
    nowhere. A deleted contact is known (the audience excludes it as `deleted`)."""
    unknown: set[str] = set()
    for contact_id in set(contact_ids):
        key = contact_key(tenant_id, contact_id)
        if key_partition(key, partitions) != partition:
            continue  # another partition answers for it
        contact = stored(key)
        if contact is None or contact["first_offset"] >= snapshot_offset:
            unknown.add(contact_id)
    return sorted(unknown)


def _exclusion(contact: StoredContact, list_ids: list[str]) -> str | None:
    # Most contacts carry no flag at all: skip building their ContactState.
    if not (contact.get("deleted") or contact.get("suppressed_reason")
            or contact.get("globally_unsubscribed") or contact.get("unsubscribed_lists")):
        return None
    return exclusion_reason(from_stored(contact), list_ids)


def sum_exclusions(per_partition: Iterable[Mapping[str, int]]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for counts in per_partition:
        for reason, count in counts.items():
            totals[reason] = totals.get(reason, 0) + count
    return dict(sorted(totals.items()))
