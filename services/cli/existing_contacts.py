"""The skip-existing mode's view of contacts.events: which of a tenant's contacts exist now.

Guarantee: `existing_contact_ids` reads every partition of contacts.events from the start to
its end as of the scan (O(records of the topic) time, O(the tenant's contacts) memory) and
never commits a consumer position. A contact counts as present after a ContactUpserted and
absent again after a ContactDeleted; the answer is a snapshot, so a contact created by someone
else during an import is not in it.
"""

from __future__ import annotations

import json

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition

from services.cli.publishing import TopicUnavailable
from services.common.kafka import make_consumer
from services.common.settings import Settings
from services.common.topics import CONTACTS, topic_name

# How long the scan waits for a record before deciding the broker has stalled: guards against
# hanging on a partition that never reaches its end (e.g. an open transaction).
SCAN_IDLE_TIMEOUT_SECONDS = 30.0
# Consumer group named by the scan; it assigns partitions and never commits.
SCAN_GROUP = "campaignctl-contacts-scan"


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


def existing_contact_ids(settings: Settings, tenant_id: str) -> set[str]:
    """The tenant's present contact ids: every partition of contacts.events read from the
    start until the consumer reports its end. Raises TopicUnavailable when the scan fails or
    stalls for SCAN_IDLE_TIMEOUT_SECONDS."""
    topic = topic_name(CONTACTS, settings)
    consumer = make_consumer(settings, SCAN_GROUP, **{"enable.partition.eof": True})
    existing: set[str] = set()
    try:
        try:
            metadata = consumer.list_topics(topic, timeout=SCAN_IDLE_TIMEOUT_SECONDS)
        except KafkaException as exc:
            raise TopicUnavailable(f"reading {topic} failed: {exc}") from None
        unread = set(metadata.topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(unread)])
        while unread:
            msg = consumer.poll(SCAN_IDLE_TIMEOUT_SECONDS)
            if msg is None:
                raise TopicUnavailable(f"reading {topic} stalled with {len(unread)} partitions unread")
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    raise TopicUnavailable(f"reading {topic} failed: {err.str()}")
                unread.discard(msg.partition())
                continue
            track_existing(existing, tenant_id, msg.key(), msg.value())
    finally:
        consumer.close()
    return existing
