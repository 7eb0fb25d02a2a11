"""The hydrator's contacts replicas against a real broker: the background refresh
(Replicas.catch_up_all) sends one offsets request for all partitions and reads only replicas
behind (and still wanted as their turn comes); a catch-up to a send's snapshot ends at the partition's end as the broker reports it,
past transaction markers and aborted records (never delivered), and waits for a transaction
still open at the snapshot."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from confluent_kafka import Message, Producer

from schemas.base import normalise_email
from schemas.contacts import ContactUpserted, contact_id_for, contact_key
from schemas.envelope import Envelope, encode, wrap
from services.common.kafka import make_producer, partition_reader, read_to_end
from services.common.topics import CONTACTS, topic_name
from services.hydrator.replica import Replicas
from tests.integration.test_hydrator import snapshot
from tests.kafka_io import publish

pytestmark = pytest.mark.integration


def _contacts(tenant: str, count: int, start: int = 0) -> list[tuple[bytes, Envelope]]:
    records = []
    for i in range(start, start + count):
        email = normalise_email(f"person{i}@example.com")
        cid = contact_id_for(tenant, email)
        payload = ContactUpserted(contact_id=cid, email=email, first_name="F", lists=["a"])
        records.append((contact_key(tenant, cid), wrap(payload, tenant_id=tenant, aggregate_id=cid)))
    return records


def test_refresh_reaches_every_partitions_end_and_then_reads_nothing(settings, tmp_path):
    tenant = "acme"
    publish(settings, CONTACTS, _contacts(tenant, 200))
    ends = snapshot(settings)
    partitions = set(range(CONTACTS.partitions))
    replicas = Replicas(settings, topic_name(CONTACTS, settings), tmp_path)
    try:
        assert replicas.catch_up_all(partitions) == ends
        held = sum(len(list(replicas.get(p).tenant_contacts(tenant))) for p in partitions)
        assert held == 200
        # Nothing new: the same positions.
        assert replicas.catch_up_all(partitions) == ends
        # New contacts on some partitions: those replicas catch up, the rest stay put.
        publish(settings, CONTACTS, _contacts(tenant, 30, start=200))
        later = snapshot(settings)
        assert later != ends
        assert replicas.catch_up_all(partitions) == later
        held = sum(len(list(replicas.get(p).tenant_contacts(tenant))) for p in partitions)
        assert held == 230
    finally:
        replicas.close()


def test_refresh_skips_the_partitions_no_longer_wanted(settings, tmp_path):
    # The hydrator's head start: partitions asked for as their turn comes, not all at once.
    tenant = "acme"
    publish(settings, CONTACTS, _contacts(tenant, 200))
    ends = snapshot(settings)
    skipped = {p for p, end in ends.items() if end > 0 and p % 2}
    assert skipped
    replicas = Replicas(settings, topic_name(CONTACTS, settings), tmp_path)
    try:
        asked: list[int] = []

        def wanted(partition: int) -> bool:
            asked.append(partition)
            return partition not in skipped

        positions = replicas.catch_up_all(set(range(CONTACTS.partitions)), wanted=wanted)
        assert sorted(asked) == sorted(p for p, end in ends.items() if end > 0)
        assert positions == {p: 0 if p in skipped else end for p, end in ends.items()}
        assert all(replicas.get(p).next_offset() == 0 for p in skipped)
        # Wanted again later: caught up from where they stood.
        assert replicas.catch_up_all(set(range(CONTACTS.partitions))) == ends
    finally:
        replicas.close()


def _transactional_producer(settings, name: str) -> Producer:
    producer = make_producer(settings, **{"transactional.id": f"{settings.topic_prefix}{name}"})
    producer.init_transactions(30)
    return producer


def _produce_all(producer: Producer, topic: str, records) -> None:
    for key, envelope in records:
        producer.produce(topic, key=key, value=encode(envelope))


def test_a_partition_ending_in_transaction_markers_is_caught_up_at_once(settings, tmp_path):
    # As the API's outbox relay writes contacts.events: committed transactions, whose commit
    # markers take each partition's last offset, and an aborted one.
    tenant, topic = "acme", topic_name(CONTACTS, settings)
    producer = _transactional_producer(settings, "contacts-writer")
    producer.begin_transaction()
    _produce_all(producer, topic, _contacts(tenant, 40))
    producer.commit_transaction(30)
    producer.begin_transaction()
    _produce_all(producer, topic, _contacts(tenant, 10, start=40))
    producer.flush(30)
    producer.abort_transaction(30)
    ends = snapshot(settings)  # what a send's contacts_snapshot holds
    replicas = Replicas(settings, topic, tmp_path)
    try:
        started = time.monotonic()
        for partition, end in ends.items():
            assert replicas.get(partition).catch_up(end) == end
        assert time.monotonic() - started < 15, "catch-up waited for a record that never comes"
        held = sum(len(list(replicas.get(p).tenant_contacts(tenant))) for p in ends)
        assert held == 40  # the aborted transaction's contacts are not there
        # The stored offsets are the partitions' ends: the refresh has nothing left to read.
        assert replicas.catch_up_all(set(ends)) == ends
    finally:
        replicas.close()


def test_a_catch_up_to_a_snapshot_inside_an_open_transaction_waits_for_its_outcome(settings, tmp_path):
    tenant, topic = "acme", topic_name(CONTACTS, settings)
    publish(settings, CONTACTS, _contacts(tenant, 12))
    producer = _transactional_producer(settings, "slow-writer")
    producer.begin_transaction()
    _produce_all(producer, topic, _contacts(tenant, 24, start=12))
    producer.flush(30)
    ends = snapshot(settings)  # high watermarks: past the open transaction's records
    replicas = Replicas(settings, topic, tmp_path)
    try:
        with ThreadPoolExecutor(1) as pool:
            caught_up = pool.submit(lambda: {p: replicas.get(p).catch_up(e) for p, e in ends.items()})
            time.sleep(2.0)
            assert not caught_up.done(), "caught up past records whose transaction is still open"
            producer.commit_transaction(30)
            positions = caught_up.result(timeout=30)
        assert all(positions[p] >= end for p, end in ends.items())
        held = sum(len(list(replicas.get(p).tenant_contacts(tenant))) for p in ends)
        assert held == 36
    finally:
        replicas.close()


def test_read_to_end_returns_the_end_past_a_closing_commit_marker(settings):
    producer = _transactional_producer(settings, "marker-writer")
    topic = topic_name(CONTACTS, settings)
    producer.begin_transaction()
    producer.produce(topic, key=b"k", value=b"v", partition=0)
    producer.commit_transaction(30)
    reader = partition_reader(settings, f"{settings.topic_prefix}probe")
    try:
        seen: list[Message] = []
        assert read_to_end(reader, topic, 0, 0, seen.append) == 2  # the record, then the marker
        assert len(seen) == 1
    finally:
        reader.close()
