"""Audience resolution over one partition's contacts: pure functions, no I/O.

A contact is stored once per tenant + normalised e-mail (its id is derived from both), so
resolving lists and hand-picked ids over the contacts of a partition yields each recipient
at most once, however many of the campaign's lists it is in.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from schemas.contacts import ContactUpserted
from schemas.events import Audience

StoredContact = dict[str, Any]


def merge_contact(existing: Mapping[str, Any] | None, upsert: ContactUpserted, *, offset: int,
                  partition: int) -> StoredContact:
    """The stored form of a contact after an upsert: fields replaced, lists and attributes
    added to; `first_offset` keeps when the contact first appeared (for audience snapshots)."""
    lists = set(existing["lists"]) if existing else set()
    lists.update(upsert.lists)
    attributes = dict(existing["attributes"]) if existing else {}
    attributes.update(upsert.attributes)
    return {
        "id": upsert.contact_id,
        "email": upsert.email,
        "first_name": upsert.first_name,
        "last_name": upsert.last_name,
        "attributes": attributes,
        "lists": sorted(lists),
        "partition": partition,
        "first_offset": existing["first_offset"] if existing else offset,
    }


def select_recipients(
    contacts: Iterable[tuple[str, StoredContact]],
    *,
    tenant_id: str,
    partition: int,
    audience: Audience,
    snapshot_offset: int,
) -> Iterator[tuple[str, StoredContact]]:
    """Contacts of `tenant_id` in `partition`, known before the snapshot, in the audience."""
    prefix = f"{tenant_id}:"
    lists = set(audience.list_ids)
    ids = set(audience.contact_ids)
    for key, contact in contacts:
        if contact["partition"] != partition or not key.startswith(prefix):
            continue
        if contact["first_offset"] >= snapshot_offset:
            continue  # joined after sending started: not part of this campaign
        if contact["id"] in ids or not lists.isdisjoint(contact["lists"]):
            yield key, contact


def gather(reported: Mapping[str, int], partitions: int) -> int | None:
    """Total recipients once every partition has reported, else None."""
    if len(reported) < partitions:
        return None
    return sum(reported.values())
