"""The import's view of contacts.events: a tenant's contacts that an address must land on.

`scan_contacts(settings, tenant_id, present=...)` reads every partition of contacts.events
from the start to its end as of the scan and never commits a consumer position. It returns:
- `identities`: for each identity (`schemas.base.email_identity`) with a contact under an id
  other than the identity's own (`contact_id_for`; contacts created before ids followed the
  identity, from a mixed-case local part), every contact of that identity folded by
  `apply_contact_event`, keyed by the identity's own id. `identity_merge` decides from it
  which contact rows go to and what is merged. Memory: O(such contacts), few or none.
- `present` (only when asked, for skip-existing): the ids of the tenant's contacts present now,
  O(the tenant's contacts) memory. A contact counts as present after a ContactUpserted and
  absent again after a ContactDeleted.

Cost: O(records of the topic) time: one JSON parse per upsert of the tenant (most records), a
full decode only for the few contacts it keeps. When old contacts were found, a second pass
reads the topic's keys again for the contacts under those identities' own ids. The answer is
a snapshot: a contact created by someone else during an import is not in it.

Known gap: a flag written for an old contact before its first upsert (only possible from a
producer other than the import) is not seen here, so a merge does not carry it over; the
contact itself keeps it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import orjson
from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition

from schemas.contacts import (
    CONTACT_EVENT_TYPES,
    ContactDeleted,
    ContactEvent,
    ContactUpserted,
    apply_contact_event,
)
from schemas.envelope import SchemaViolation, decode
from services.cli.contact_records import ContactIds
from services.cli.identity_merge import KnownContact
from services.cli.publishing import TopicUnavailable
from services.common.kafka import make_consumer
from services.common.settings import Settings
from services.common.topics import CONTACTS, topic_name

# How long the scan waits for a record before deciding the broker has stalled: guards against
# hanging on a partition that never reaches its end (e.g. an open transaction).
SCAN_IDLE_TIMEOUT_SECONDS = 30.0
# Consumer group named by the scan; it assigns partitions and never commits.
SCAN_GROUP = "campaignctl-contacts-scan"
# Records taken per consume() call, and how long one call waits: consume() returns only once
# it has the whole batch or the wait is over, so a short wait keeps the end of a small topic
# from costing the whole idle timeout.
SCAN_BATCH = 2_000
SCAN_WAIT_SECONDS = 0.2
_UPSERT = b'"ContactUpserted"'


def track_existing(existing: set[str], tenant_id: str, key: bytes | None, value: bytes | None) -> None:
    """Update the set of a tenant's present contact ids with one contacts.events record.

    Records of other tenants (told by the key, `tenant:contact`) are skipped unread; a
    ContactUpserted adds its contact, a ContactDeleted removes it, other types change nothing.
    """
    prefix = f"{tenant_id}:".encode()
    if key is None or value is None or not key.startswith(prefix):
        return
    try:
        kind = json.loads(value).get("type")
    except (ValueError, AttributeError):
        return  # not ours to judge: consumers of the topic dead-letter it
    contact_id = key[len(prefix):].decode(errors="replace")
    if kind == "ContactUpserted":
        existing.add(contact_id)
    elif kind == "ContactDeleted":
        existing.discard(contact_id)


@dataclass
class TenantContacts:
    """What a scan found for one tenant (see the module docstring)."""

    identities: dict[str, dict[str, KnownContact]] = field(default_factory=dict)
    present: set[str] | None = None


class IdentityScan:
    """The fold of one tenant's contacts.events records behind `scan_contacts` (no I/O)."""

    def __init__(self, tenant_id: str, *, present: bool = False) -> None:
        self.prefix = f"{tenant_id}:".encode()
        self.ids = ContactIds(tenant_id)
        self.result = TenantContacts(present=set() if present else None)
        self.own_id: dict[str, str] = {}  # kept contact id -> its identity's own id
        self._wanted: dict[str, str] = {}  # own ids looked for by the second pass -> themselves

    def first_pass(self, key: bytes | None, value: bytes | None) -> None:
        if key is None or value is None or not key.startswith(self.prefix):
            return
        contact_id = key[len(self.prefix):].decode(errors="replace")
        present = self.result.present
        if contact_id in self.own_id:
            kind = self._fold(contact_id, value)
            if present is not None and kind is ContactUpserted:
                present.add(contact_id)
            elif present is not None and kind is ContactDeleted:
                present.discard(contact_id)
            return
        if present is None and _UPSERT not in value:
            return
        try:
            data = orjson.loads(value)
            kind = data["type"]
        except (ValueError, TypeError, KeyError):
            return  # not ours to judge: consumers of the topic dead-letter it
        if present is not None:
            if kind == "ContactUpserted":
                present.add(contact_id)
            elif kind == "ContactDeleted":
                present.discard(contact_id)
        if kind != "ContactUpserted":
            return
        email = data.get("payload", {}).get("email")
        if not isinstance(email, str):
            return
        identity = email.lower()
        if identity == email:
            return  # stored lower-case: its id has always been its identity's own
        own = self.ids.of(identity)
        if own != contact_id:
            self.own_id[contact_id] = own
            self._fold(contact_id, value)

    def wanted(self) -> set[str]:
        """The identities' own ids the second pass must fold (those not already kept)."""
        self._wanted = {own: own for own in set(self.own_id.values()) if own not in self.own_id}
        return set(self._wanted)

    def second_pass(self, key: bytes | None, value: bytes | None) -> None:
        if key is None or value is None or not key.startswith(self.prefix):
            return
        contact_id = key[len(self.prefix):].decode(errors="replace")
        if contact_id in self._wanted:
            self.own_id.setdefault(contact_id, contact_id)
            self._fold(contact_id, value)

    def _fold(self, contact_id: str, value: bytes) -> type | None:
        """Fold one record into a kept contact; the type of its event, if it was one."""
        try:
            message = decode(value)
        except SchemaViolation:
            return None
        payload = message.payload
        if not isinstance(payload, CONTACT_EVENT_TYPES) or getattr(payload, "contact_id", None) != contact_id:
            return None
        event = cast(ContactEvent, payload)
        contacts = self.result.identities.setdefault(self.own_id[contact_id], {})
        known = contacts.get(contact_id)
        state = apply_contact_event(None if known is None else known.state, event)
        if state is not None:
            first = message.envelope.occurred_at if known is None else known.first_upserted
            contacts[contact_id] = KnownContact(state, first)
        return type(payload)


def scan_contacts(settings: Settings, tenant_id: str, *, present: bool = False) -> TenantContacts:
    """The tenant's contacts an import must know about (module docstring). Raises
    TopicUnavailable when a read fails or stalls for SCAN_IDLE_TIMEOUT_SECONDS."""
    scan = IdentityScan(tenant_id, present=present)
    topic = topic_name(CONTACTS, settings)
    _read_topic(settings, topic, scan.first_pass)
    if scan.wanted():
        _read_topic(settings, topic, scan.second_pass)
    return scan.result


def existing_contact_ids(settings: Settings, tenant_id: str) -> set[str]:
    """The tenant's present contact ids (see `scan_contacts`)."""
    found = scan_contacts(settings, tenant_id, present=True).present
    assert found is not None
    return found


def _read_topic(settings: Settings, topic: str, handle: Callable[[bytes | None, bytes | None], None]) -> None:
    """Every record of every partition of `topic`, from the start to the end as of now."""
    consumer = make_consumer(settings, SCAN_GROUP, **{"enable.partition.eof": True})
    try:
        try:
            metadata = consumer.list_topics(topic, timeout=SCAN_IDLE_TIMEOUT_SECONDS)
        except KafkaException as exc:
            raise TopicUnavailable(f"reading {topic} failed: {exc}") from None
        unread = set(metadata.topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(unread)])
        idle_since = time.monotonic()
        while unread:
            batch = consumer.consume(SCAN_BATCH, SCAN_WAIT_SECONDS)
            if not batch:
                if time.monotonic() - idle_since > SCAN_IDLE_TIMEOUT_SECONDS:
                    raise TopicUnavailable(f"reading {topic} stalled with {len(unread)} partitions unread")
                continue
            idle_since = time.monotonic()
            for msg in batch:
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        raise TopicUnavailable(f"reading {topic} failed: {err.str()}")
                    unread.discard(msg.partition())
                    continue
                handle(msg.key(), msg.value())
    finally:
        consumer.close()

