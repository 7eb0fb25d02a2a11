"""Local replicas of contacts.events partitions: the contacts a hydrator resolves audiences on.

Each partition's contacts live in their own RocksDB database (rocksdict) on the hydrator's
disk, keyed by the record key (`tenant:contact`, so one tenant's contacts of a partition are a
prefix range) with the stored contact as compact JSON, plus the next contacts.events offset to
apply. Contact events and that offset are written in one atomic write batch, so a replica is
always the fold of a prefix of its partition: after a crash or a restart it resumes where it
stopped, and a partition that moves to another instance is caught up there from that
instance's own replica (or from offset 0) by reading contacts.events, which keeps every event
forever. contacts.events is the changelog: nothing else is written to Kafka. For that reason
the databases keep no write-ahead log: RocksDB flushes its memtables in write order, so
after a crash a replica holds what its last flush held, still whole batches with their
offset (a prefix), and re-reads the rest; a clean close flushes everything.

Progress shows as the consumer group `<prefix>hydrator-replicas` (committed offsets, for lag
tools), though a replica resumes from its own stored offset.

Guarantees: `catch_up(until)` returns once every record before `until` is applied (the
snapshot of a send), whichever producer wrote the partition: the stored next offset is where
the broker says the partition is read up to, past transaction markers and aborted records
(never delivered as records), so a partition whose last offset is a marker (the API's outbox
relay publishes transactionally) is caught up, not waited on; memory stays flat, whatever
the number of contacts or partitions: the working set is one consumer batch per catching-up
reader (a small shared pool of readers, not one per partition), and RocksDB keeps the rest on
disk behind ONE block cache shared by every replica (index and bloom filter blocks included)
and small write buffers.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import orjson
import structlog
from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, Message, TopicPartition
from rocksdict import BlockBasedOptions, Cache, Options, Rdict, WriteBatch, WriteOptions

from schemas.contacts import CONTACT_EVENT_TYPES, ContactEvent
from schemas.envelope import SchemaViolation
from services.common.kafka import CLIENT_LOG, partition_reader
from services.common.settings import Settings
from services.hydrator.audience import StoredContact
from services.hydrator.contact_records import Upsert, apply_record, contact_event, encode_stored, new_contact

log = structlog.get_logger("hydrator.replica")

# Every contact event, so a new one (e.g. ContactUnsuppressed) is never skipped here.
CONTACT_EVENTS = CONTACT_EVENT_TYPES
# Sorts before every record key (keys start with a tenant id), so prefix scans never meet it.
NEXT_OFFSET_KEY = b"\x00next-offset"
REPLICAS_GROUP = "hydrator-replicas"
BATCH_SIZE = 5_000
POLL_SECONDS = 0.2
# Bounds a catch-up that hears nothing at all from the broker.
IDLE_TIMEOUT_SECONDS = 60.0


# RocksDB memory: memtables per replica, ONE block cache for all of them (with the index and
# filter blocks in it, so their memory is bounded by it too, not by the number of files).
WRITE_BUFFER_BYTES = 4 * 2**20
SHARED_BLOCK_CACHE_BYTES = 32 * 2**20
# Bloom filter bits per key: an import's upserts are mostly new contacts, whose look-up the
# filter answers without reading a data block.
BLOOM_BITS_PER_KEY = 10
# Share of each memtable's memory given to its bloom filter (~50 bits per key at our sizes).
MEMTABLE_BLOOM_RATIO = 0.02
# Kafka prefetch per reader while it catches up (its queue is empty otherwise). 2 MiB
# fetches with a short backoff keep up with decoding; bigger only grows the process.
FETCH_BYTES = 2 * 2**20
FETCH_QUEUE_BACKOFF_MS = 10
# Replicas caught up at once by the background refresh: two overlap one's broker waits with
# the other's decoding; more would only add memory (the decoding holds the GIL).
REFRESH_THREADS = 2
# Bounds the background refresh's offsets request on a broker that does not answer.
END_OFFSETS_TIMEOUT_SECONDS = 10.0
# Readers shared by all replicas: the refresh's threads plus the fan-outs' catch-ups.
READERS = REFRESH_THREADS + 2


class CatchUpStalled(RuntimeError):
    """A replica did not move for IDLE_TIMEOUT_SECONDS short of the offset it must reach:
    the broker is silent, or a transaction on the partition stayed open that long. Nothing
    half-applied: the replica stays the fold of a prefix of its partition; try again."""

    def __init__(self, partition: int, position: int, until: int | None) -> None:
        target = "its end" if until is None else f"offset {until}"
        super().__init__(f"contacts partition {partition} stuck at offset {position} short of {target}"
                         f" for {IDLE_TIMEOUT_SECONDS:g} s (broker silent or a transaction still open)")
        self.partition, self.position, self.until = partition, position, until


def next_position(position: int, offsets: Sequence[int], end: int | None) -> int:
    """Where a replica at `position` stands after a batch: past its last record (`offsets`),
    and at least at `end`, the partition's end the broker reported for read_committed
    readers (the end-of-partition event), which lies past transaction markers and aborted
    records that are never delivered. Never moves back."""
    after = position
    if offsets:
        after = max(after, max(offsets) + 1)
    if end is not None:
        after = max(after, end)
    return after


def _options(cache: Cache) -> Options:
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    options.set_max_open_files(256)
    options.set_write_buffer_size(WRITE_BUFFER_BYTES)
    options.set_max_write_buffer_number(2)
    # A bloom filter over each memtable's keys: the multi-get of an import's new contacts
    # otherwise searches the memtables' skip lists for keys that are not there.
    options.set_memtable_prefix_bloom_ratio(MEMTABLE_BLOOM_RATIO)
    options.set_memtable_whole_key_filtering(True)
    table = BlockBasedOptions()
    table.set_block_cache(cache)
    table.set_bloom_filter(BLOOM_BITS_PER_KEY, False)
    table.set_cache_index_and_filter_blocks(True)
    table.set_pin_l0_filter_and_index_blocks_in_cache(True)
    options.set_block_based_table_factory(table)
    return options


class ReaderPool:
    """At most READERS contacts.events consumers, lent to one catch-up at a time: a
    consumer per partition held a fetch queue each (memory grew with the partitions)."""

    def __init__(self, settings: Settings, size: int = READERS) -> None:
        self.settings = settings
        self._idle: queue.LifoQueue[Consumer] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)
        self._all: list[Consumer] = []
        self._lock = threading.Lock()

    def borrow(self) -> Consumer:
        """An idle reader (or a new one while fewer than `size` exist); waits for one."""
        self._slots.acquire()
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            reader = self._new()
            with self._lock:
                self._all.append(reader)
            return reader

    def give_back(self, reader: Consumer) -> None:
        self._idle.put(reader)
        self._slots.release()

    def _new(self) -> Consumer:
        return Consumer({
            "bootstrap.servers": self.settings.kafka_bootstrap_servers,
            "logger": CLIENT_LOG,
            "group.id": self.settings.group(REPLICAS_GROUP),
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            # Bounded prefetch (librdkafka's default queue is 64 MiB per consumer); the short
            # backoff refetches as soon as the queue has room, so 2 MiB keep up.
            "fetch.max.bytes": FETCH_BYTES,
            "queued.max.messages.kbytes": FETCH_BYTES // 1024,
            "max.partition.fetch.bytes": FETCH_BYTES,
            "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
            # The end of the partition is noticed after this long, not the default 500 ms.
            "fetch.wait.max.ms": 50,
        })

    def close(self) -> None:
        with self._lock:
            readers, self._all = self._all, []
        for reader in readers:
            reader.close()


class ContactReplica:
    """One contacts.events partition folded into a local RocksDB database."""

    def __init__(self, settings: Settings, topic: str, partition: int, path: Path, *,
                 readers: ReaderPool | None = None, cache: Cache | None = None) -> None:
        self.settings = settings
        self.topic = topic
        self.partition = partition
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = Rdict(str(path), options=_options(cache or Cache(SHARED_BLOCK_CACHE_BYTES)))
        # No write-ahead log: see the module docstring (a crash loses only a suffix).
        unlogged = WriteOptions()
        # rocksdict's stubs declare a method; the binding has a property.
        unlogged.disable_wal = True  # type: ignore[method-assign,assignment]
        self.db.set_write_options(unlogged)
        self.lock = threading.Lock()
        self._own_readers = readers is None
        self._readers = readers or ReaderPool(settings, size=1)

    def next_offset(self) -> int:
        raw = self.db.get(NEXT_OFFSET_KEY)
        return int(raw) if raw is not None else 0

    def catch_up(self, until: int | None = None) -> int:
        """Apply contacts.events of this partition up to `until` (exclusive), or up to its
        current end when None; returns the next offset to apply.

        Where the partition ends comes from the broker (the end-of-partition event's offset),
        not from the last record delivered: a transaction's commit or abort marker takes the
        last offset and is never delivered, so a replica that counted only records would
        wait for it forever. Raises CatchUpStalled when the replica has not moved for
        IDLE_TIMEOUT_SECONDS (broker silent, or a transaction still open that long)."""
        with self.lock:
            position = self.next_offset()
            if until is not None and position >= until:
                return position
            consumer = self._readers.borrow()
            try:
                return self._catch_up(consumer, position, until)
            finally:
                self._readers.give_back(consumer)

    def _catch_up(self, consumer: Consumer, position: int, until: int | None) -> int:
        if until is None:
            # The background refresh runs every half second over every held partition:
            # one offsets request settles an idle one, instead of a fetch waiting for EOF.
            _, high = consumer.get_watermark_offsets(
                TopicPartition(self.topic, self.partition), timeout=10, cached=False)
            if position >= high:
                return position
        consumer.assign([TopicPartition(self.topic, self.partition, position)])
        try:
            moved_at = time.monotonic()
            while until is None or position < until:
                batch = consumer.consume(BATCH_SIZE, POLL_SECONDS)
                records: list[Message] = []
                end: int | None = None
                for msg in batch:
                    error = msg.error()
                    if error is None:
                        records.append(msg)
                    elif error.code() == KafkaError._PARTITION_EOF:
                        end = msg.offset()
                    else:
                        raise KafkaException(error)
                # One partition's records come in offset order: the last one is the furthest.
                last = [records[-1].offset() or 0] if records else []
                after = next_position(position, last, end)
                if after > position:
                    moved_at = time.monotonic()
                    # The fold and the offset it reaches in one write, records or none.
                    position = self._apply(records, after)
                    # Progress for operators (consumer lag of the group) and the bench;
                    # the replica's own offset, not this commit, is what resumes it.
                    consumer.commit(offsets=[TopicPartition(self.topic, self.partition, position)],
                                    asynchronous=True)
                elif time.monotonic() - moved_at >= IDLE_TIMEOUT_SECONDS:
                    raise CatchUpStalled(self.partition, position, until)
                if end is not None and until is None:
                    break  # the end of the partition as it stood when asked
        finally:
            consumer.unassign()
        return position

    def _apply(self, records: Sequence[Message], next_offset: int) -> int:
        """Fold a batch into the database atomically with `next_offset`, where the partition
        is read up to (past the batch's records, and any transaction markers after them)."""
        offsets: list[int] = []
        keys: list[bytes] = []
        events: list[ContactEvent | Upsert] = []
        for msg in records:
            key = msg.key()
            if key is None:
                continue
            try:
                event = contact_event(msg.value())
            except SchemaViolation as exc:
                log.warning("contact record skipped", partition=self.partition, offset=msg.offset(),
                            reason=str(exc))
                continue
            if event is not None:
                offsets.append(msg.offset() or 0)
                keys.append(key)
                events.append(event)
        # The batch's stored contacts in ONE multi-get, not a look-up per record.
        unique = list(dict.fromkeys(keys))
        found = cast(list[bytes | None], self.db.get(cast(list[str | int | float | bytes | bool], unique))
                     ) if unique else []
        batch = WriteBatch(raw_mode=True)
        if len(unique) == len(keys):
            # Each key once (an import): a new contact's upsert is encoded straight to bytes.
            for key, raw, offset, event in zip(keys, found, offsets, events, strict=True):
                if raw is None and isinstance(event, Upsert):
                    batch.put(key, new_contact(event, offset=offset, partition=self.partition))
                    continue
                stored = apply_record(orjson.loads(raw) if raw is not None else None, event,
                                      offset=offset, partition=self.partition)
                if stored is not None:
                    batch.put(key, encode_stored(stored))
        else:
            touched: dict[bytes, StoredContact | None] = {
                key: orjson.loads(raw) if raw is not None else None
                for key, raw in zip(unique, found, strict=True)}
            for key, offset, event in zip(keys, offsets, events, strict=True):
                stored = apply_record(touched[key], event, offset=offset, partition=self.partition)
                if stored is not None:
                    touched[key] = stored
            for key, folded in touched.items():
                if folded is not None:
                    batch.put(key, encode_stored(folded))
        batch.put(NEXT_OFFSET_KEY, str(next_offset).encode())
        self.db.write(batch)
        return next_offset

    def contact(self, key: bytes) -> StoredContact | None:
        """The stored contact of one record key (`tenant:contact`), or None."""
        raw = self.db.get(key)
        return orjson.loads(raw) if raw is not None else None

    def tenant_contacts(self, tenant_id: str) -> Iterator[tuple[bytes, StoredContact]]:
        """The stored contacts of `tenant_id`, in key order, from a consistent view."""
        prefix = f"{tenant_id}:".encode()
        for key, raw in self.db.items(from_key=prefix):
            assert isinstance(key, bytes)  # raw mode: keys and values are bytes
            if not key.startswith(prefix):
                break
            yield key, orjson.loads(raw)

    def close(self) -> None:
        with self.lock:
            if self._own_readers:
                self._readers.close()
            self.db.close()


class Replicas:
    """The replicas of the partitions this instance holds, opened on first use and kept open
    (a partition that moved away may come back; a fan-out may still be reading one)."""

    def __init__(self, settings: Settings, topic: str, folder: Path) -> None:
        self.settings = settings
        self.topic = topic
        self.folder = folder
        self._open: dict[int, ContactReplica] = {}
        self._lock = threading.Lock()
        self._probe: Consumer | None = None  # asks the broker where the partitions end
        self._readers = ReaderPool(settings)
        self._cache = Cache(SHARED_BLOCK_CACHE_BYTES)  # one for every replica

    def get(self, partition: int) -> ContactReplica:
        with self._lock:
            replica = self._open.get(partition)
            if replica is None:
                replica = ContactReplica(self.settings, self.topic, partition,
                                         self.folder / f"contacts-{partition}.db",
                                         readers=self._readers, cache=self._cache)
                self._open[partition] = replica
            return replica

    def catch_up_all(self, partitions: set[int],
                     wanted: Callable[[int], bool] | None = None) -> dict[int, int]:
        """The background refresh: every replica of `partitions` caught up to where its
        partition ends now; returns the next offset of each. Where they end comes from ONE
        offsets request for all of them, and only replicas behind are read: a request per
        partition every half second (the refresh's period) kept the broker at ~16% of a core
        while the platform was idle. `wanted(partition)`, asked as each replica's turn comes,
        skips the ones no longer wanted (they keep their position)."""
        ordered = sorted(partitions)
        ends = self._end_offsets(ordered)
        positions = {p: self.get(p).next_offset() for p in ordered}
        behind = [p for p in ordered if positions[p] < ends[p]]
        if behind:
            with ThreadPoolExecutor(REFRESH_THREADS, thread_name_prefix="replica-refresh") as pool:
                caught_up = pool.map(
                    lambda p: self.get(p).catch_up() if wanted is None or wanted(p) else positions[p],
                    behind)
                positions.update(zip(behind, caught_up, strict=True))
        return positions

    def _end_offsets(self, partitions: list[int]) -> dict[int, int]:
        """Each partition's end for a read_committed reader (its last stable offset)."""
        with self._lock:
            if self._probe is None:
                # Never assigned nor committed: it only asks where partitions end.
                self._probe = partition_reader(self.settings, self.settings.group(REPLICAS_GROUP))
            probe = self._probe
        # Timestamp OFFSET_END (-1) asks for the latest offset: one ListOffsets request.
        found = probe.offsets_for_times(
            [TopicPartition(self.topic, p, OFFSET_END) for p in partitions],
            timeout=END_OFFSETS_TIMEOUT_SECONDS)
        ends: dict[int, int] = {}
        for tp in found:
            if tp.error is not None:
                raise KafkaException(tp.error)
            ends[tp.partition] = tp.offset
        return ends

    def close(self) -> None:
        with self._lock:
            closing = list(self._open.values())
            self._open.clear()
            probe, self._probe = self._probe, None
        if probe is not None:
            probe.close()
        for replica in closing:
            replica.close()
        self._readers.close()

