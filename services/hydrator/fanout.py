"""One partition's share of a campaign fan-out, written exactly once.

Guarantee: for each (campaign, contacts partition) the recipient records, the partition's
HydrationPartitionReported and a "fanned out" marker are committed in one Kafka transaction,
at most once, whatever crashes, restarts or rebalances happen in between:

- the transactional producer of partition p has a stable transactional.id (`…-fanout-<p>`),
  so whoever takes partition p over fences the previous owner: a fan-out cut short by a
  SIGKILL is aborted, never half-visible to read_committed readers (senders, gather);
- before writing, the marker log of partition p (a compacted topic, partition p, keyed
  `campaign:p`) is read up to its last stable offset; a campaign found there was fanned
  out already (for example when the request was redelivered after the commit but before
  faust committed its offset), so it is not written again.

The recipients are spread over campaign.recipients by their contact key (murmur2), the
report goes to the reports topic keyed by campaign (so one gatherer sees a campaign's reports).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer

from schemas.envelope import Envelope, encode, wrap_caused_by
from schemas.events import MAX_UNKNOWN_CONTACT_IDS, HydrationPartitionReported, HydrationRequested
from services.common import metrics
from services.common.kafka import partition_reader, producer_config, read_to_end
from services.common.settings import Settings
from services.common.topics import HYDRATION_FANOUTS, HYDRATION_REPORTS, RECIPIENTS, topic_name
from services.hydrator.audience import StoredContact
from services.hydrator.recipients import RecipientRecords

log = structlog.get_logger("hydrator.fanout")

# Bounds how long reading the marker log may see nothing before giving up on the broker.
MARKER_READ_TIMEOUT_SECONDS = 30.0
# librdkafka's local queue per partition producer: a few batches ahead of the broker is all
# the throughput needs; a bigger queue only grows the process (one per contacts partition,
# and freed memory is not always handed back to the system).
QUEUE_MAX_MESSAGES = 50_000
QUEUE_MAX_KBYTES = 16 * 1024
# How long one record may wait for room in a full local queue before the fan-out gives up
# (aborted, retried): the broker is not taking records at all.
PRODUCE_WAIT_SECONDS = 60.0
PRODUCE_POLL_SECONDS = 0.05


class FanoutAborted(RuntimeError):
    """The transaction could not be committed (fenced by a newer owner, or the broker
    failed); nothing of it is visible, and the request must be redone or left to the owner."""


@dataclass
class _Partition:
    producer: Producer
    done: set[str] = field(default_factory=set)
    marker_position: int = 0
    reader: Consumer | None = None
    # One fan-out at a time per partition (its producer and reader are not shared safely);
    # different partitions fan out concurrently.
    lock: threading.Lock = field(default_factory=threading.Lock)


class PartitionFanout:
    """Fan-out writer for the contacts partitions this hydrator instance owns."""

    def __init__(self, settings: Settings, app_id: str) -> None:
        self.settings = settings
        self.app_id = app_id
        self.recipients_topic = topic_name(RECIPIENTS, settings)
        self.reports_topic = topic_name(HYDRATION_REPORTS, settings)
        self.markers_topic = topic_name(HYDRATION_FANOUTS, settings)
        self._partitions: dict[int, _Partition] = {}
        self._lock = threading.Lock()

    # --- per-partition state -------------------------------------------------------------

    def _partition(self, partition: int) -> _Partition:
        with self._lock:
            return self._partition_locked(partition)

    def _partition_locked(self, partition: int) -> _Partition:
        state = self._partitions.get(partition)
        if state is None:
            producer = Producer(producer_config(
                self.settings,
                **{
                    "transactional.id": f"{self.app_id}-fanout-{partition}",
                    "linger.ms": 20,
                    "batch.size": 1_000_000,
                    "queue.buffering.max.messages": QUEUE_MAX_MESSAGES,
                    "queue.buffering.max.kbytes": QUEUE_MAX_KBYTES,
                },
            ))
            # Fences any earlier producer with this id and aborts its open transaction.
            producer.init_transactions(30)
            state = self._partitions[partition] = _Partition(producer)
        return state

    def _drop(self, partition: int) -> None:
        with self._lock:
            state = self._partitions.pop(partition, None)
        if state is not None:
            state.producer.flush(0)
            if state.reader is not None:
                state.reader.close()

    def _read_markers(self, partition: int, state: _Partition) -> None:
        """Add the campaigns committed to the marker log of `partition` since last read
        (up to its last stable offset: an open transaction is finished or fenced first)."""
        if state.reader is None:
            state.reader = partition_reader(self.settings, f"{self.app_id}-fanout-markers")

        def mark(msg: Message) -> None:
            key = msg.key()
            if key is not None:
                state.done.add(key.decode().rsplit(":", 1)[0])

        try:
            state.marker_position = read_to_end(state.reader, self.markers_topic, partition,
                                                state.marker_position, mark,
                                                idle_timeout=MARKER_READ_TIMEOUT_SECONDS)
        except KafkaException as exc:
            raise FanoutAborted(f"marker log {partition} unreadable: {exc}") from exc

    # --- fan-out -------------------------------------------------------------------------

    def fan_out(
        self,
        request: HydrationRequested,
        cause: Envelope,
        resolved: Iterable[tuple[bytes, StoredContact, str | None]],
        unknown: Sequence[str] = (),
    ) -> HydrationPartitionReported | None:
        """Write one partition's recipients and report in one transaction; None when this
        (campaign, partition) was fanned out before. `unknown`: the partition's hand-picked
        ids that name no contact (sorted), reported. Raises FanoutAborted when the
        transaction did not commit (nothing of it is visible)."""
        state = self._partition(request.partition)
        with state.lock:
            return self._fan_out(request, cause, resolved, unknown, state)

    def _fan_out(
        self,
        request: HydrationRequested,
        cause: Envelope,
        resolved: Iterable[tuple[bytes, StoredContact, str | None]],
        unknown: Sequence[str],
        state: _Partition,
    ) -> HydrationPartitionReported | None:
        partition = request.partition
        self._read_markers(partition, state)
        if request.campaign_id in state.done:
            log.info("fan-out already committed", campaign=request.campaign_id, partition=partition)
            return None
        records = RecipientRecords(campaign_id=request.campaign_id, template=request.template, cause=cause)
        producer = state.producer
        queued = 0
        excluded: dict[str, int] = {}
        try:
            producer.begin_transaction()
            for key, contact, reason in resolved:
                if reason is None:
                    value = records.queued(contact)
                    queued += 1
                else:
                    value = records.excluded(contact, reason)
                    excluded[reason] = excluded.get(reason, 0) + 1
                self._produce(producer, self.recipients_topic, key, value)
            report = HydrationPartitionReported(
                campaign_id=request.campaign_id, partition=partition,
                partitions=request.partitions, queued=queued, excluded=excluded,
                unknown_contact_ids=list(unknown[:MAX_UNKNOWN_CONTACT_IDS]),
                unknown_contact_count=len(unknown),
            )
            value = encode(wrap_caused_by(report, cause, aggregate_id=request.campaign_id))
            self._produce(producer, self.reports_topic, request.campaign_id.encode(), value)
            # Like every record of the transaction, the marker waits for room in a full
            # queue: a BufferError here crashed faust's agent and the campaign never hydrated.
            self._produce(producer, self.markers_topic, f"{request.campaign_id}:{partition}".encode(),
                          value, partition=partition)
            producer.commit_transaction(60)
            metrics.TRANSACTIONS.labels(result="committed").inc()
        except KafkaException as exc:
            # Fenced (another instance owns the partition now) or a broker failure: abort
            # what we can and start with a fresh producer next time.
            log.warning("fan-out aborted", campaign=request.campaign_id, partition=partition,
                        reason=str(exc))
            try:
                producer.abort_transaction(10)
                metrics.TRANSACTIONS.labels(result="aborted").inc()
            except KafkaException:
                pass
            self._drop(partition)
            raise FanoutAborted(str(exc)) from exc
        state.done.add(request.campaign_id)
        return report

    @staticmethod
    def _produce(producer: Producer, topic: str, key: bytes, value: bytes,
                 partition: int = -1) -> None:
        """Queue one record, waiting (polling) while the local queue is full, at most
        PRODUCE_WAIT_SECONDS; then KafkaException, which aborts the fan-out (retried)."""
        deadline = time.monotonic() + PRODUCE_WAIT_SECONDS
        while True:
            try:
                # -1: librdkafka's partitioner picks (by the key)
                producer.produce(topic, value=value, key=key, partition=partition)
                metrics.count_produced(topic)
                return
            except BufferError as exc:
                if time.monotonic() >= deadline:
                    raise KafkaException(KafkaError(KafkaError._QUEUE_FULL,
                                                    f"{topic}: local queue full for "
                                                    f"{PRODUCE_WAIT_SECONDS:g} s")) from exc
                producer.poll(PRODUCE_POLL_SECONDS)  # the local queue is full: let librdkafka drain it

    def close(self) -> None:
        for partition in list(self._partitions):
            self._drop(partition)
