"""Audience resolution over one partition's contacts: pure functions, no I/O.

A contact is stored once per tenant + normalised e-mail (its id is derived from both), so
resolving lists and hand-picked ids over the contacts of a partition yields each contact at
most once, however many of the campaign's lists it is in. Each contact of the audience is
either queued or excluded with a reason (unsubscribed, suppressed:<reason>, deleted), never
both, so queued + excluded is the raw audience.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from schemas.contacts import ContactEvent, ContactState, apply_contact_event, exclusion_reason
from schemas.events import Audience

StoredContact = dict[str, Any]


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
    contacts: Iterable[tuple[str, StoredContact]],
    *,
    tenant_id: str,
    partition: int,
    audience: Audience,
    snapshot_offset: int,
) -> Iterator[tuple[str, StoredContact, str | None]]:
    """Contacts of `tenant_id` in `partition`, known before the snapshot, that the audience
    names (by list or id), each with the reason it must not be mailed, or None."""
    prefix = f"{tenant_id}:"
    lists = set(audience.list_ids)
    ids = set(audience.contact_ids)
    for key, contact in contacts:
        if contact["partition"] != partition or not key.startswith(prefix):
            continue
        if contact["first_offset"] >= snapshot_offset:
            continue  # joined after sending started: not part of this campaign
        if contact["id"] in ids or not lists.isdisjoint(contact["lists"]):
            yield key, contact, exclusion_reason(from_stored(contact), audience.list_ids)


def gather(reported: Mapping[str, int], partitions: int) -> int | None:
    """Total recipients once every partition has reported, else None."""
    if len(reported) < partitions:
        return None
    return sum(reported.values())


def sum_exclusions(per_partition: Iterable[Mapping[str, int]]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for counts in per_partition:
        for reason, count in counts.items():
            totals[reason] = totals.get(reason, 0) + count
    return dict(sorted(totals.items()))
