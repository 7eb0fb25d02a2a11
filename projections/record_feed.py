"""The projector's side of Kafka: one consumer group over some projected topics.

Guarantee: the feed never decides where reading starts: every assignment starts where the
projector's assign hook says (the positions stored in PostgreSQL), a partition never stored at
FIRST_OFFSET; Kafka's committed offsets are written only as a lag gauge, never read. Only
records of committed transactions are delivered (read_committed). Every call is bounded: a
consumer close by CLOSE_BOUND_SECONDS, an end-offset look-up by WATERMARK_TIMEOUT_SECONDS.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog
from confluent_kafka import Consumer, IsolationLevel, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from projections import batching
from services.common.kafka import CLIENT_LOG, PartitionKey, close_within, make_admin, serve_logs
from services.common.membership import register, unregister
from services.common.metrics import LagSampler

# How long the broker may hold a fetch for partitions without new records: a cold start's
# first fetch, sent before the backlog's partitions were fetchable, otherwise waits out the
# client default (500 ms) before the records come.
FETCH_WAIT_MAX_MS = 100
# How long the client waits before fetching a partition again once its local queue of
# fetched records is full: the default, 1 s, stalled a backlog's drain with nothing left to
# project; checking every 10 ms costs a look at the queue's size, no request.
FETCH_QUEUE_BACKOFF_MS = 10
# End-offset look-ups (`offsets`): a broker that does not answer within this fails the call.
WATERMARK_TIMEOUT_SECONDS = 5.0
# A projector that dies without leaving the group (SIGKILL, lost host) keeps its partitions
# until the broker misses its heartbeats this long (the client default, 45 s, is a long lag
# spike). Heartbeats come from the client's own thread, so a long batch does not count.
SESSION_TIMEOUT_MS = 10_000
HEARTBEAT_INTERVAL_MS = SESSION_TIMEOUT_MS // 3
# Where a partition with no stored position starts. A plain offset, not OFFSET_BEGINNING: the
# logical offset makes the client look the start up first, and fetches sent meanwhile wait out
# fetch.wait.max.ms. Where retention removed the head, auto.offset.reset=earliest moves it on.
FIRST_OFFSET = 0
# Answers to an end-offset look-up while a partition's leadership settles (new topic, broker
# restart): transient, the look-up is asked again. The admin client does not always flag
# these as retriable, hence the codes.
_LEADERSHIP_ERRORS = frozenset({
    KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
})

# The projector's answer to an assignment: where each partition starts (None: never stored),
# or None to take nothing (stopping).
AssignHook = Callable[[list[PartitionKey]], Mapping[PartitionKey, int | None] | None]
RevokeHook = Callable[[list[PartitionKey]], None]


def take_fetched(consume: Callable[..., list[Any]], count: int) -> list[Any]:
    """Up to `count` records already fetched, without waiting, CONSUME_CHUNK at a time."""
    records: list[Any] = []
    while want := batching.next_chunk(len(records), count):
        chunk = consume(num_messages=want, timeout=0)
        records.extend(chunk)
        if len(chunk) < want:  # the fetched queue is empty
            break
    return records


class RecordFeed:
    """A consumer of `topics` in `group`, re-creatable (`renew`) under one membership (the
    /readyz entry and the stuck-member check). Not thread-safe: one thread drives it."""

    def __init__(self, bootstrap_servers: str, group: str, topics: Sequence[str], *,
                 logger: Any = None) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.group = group
        self.topics = list(topics)
        self.membership = register(group)
        self._log = logger or structlog.get_logger().bind(component="projector")
        self._hooks: tuple[AssignHook, RevokeHook] | None = None
        self._consumer: Consumer | None = None
        self._admin: AdminClient | None = None  # only for `offsets`
        self._lag = LagSampler()  # the consumer lag gauge, sampled from the driving loop

    @property
    def consumer(self) -> Consumer:
        assert self._consumer is not None, "subscribe() first"
        return self._consumer

    def subscribe(self, on_assign: AssignHook, on_revoke: RevokeHook) -> None:
        self._hooks = (on_assign, on_revoke)
        consumer = Consumer({
            "bootstrap.servers": self.bootstrap_servers,
            "logger": CLIENT_LOG,
            "group.id": self.group,
            "client.id": f"{self.group}-projector",
            # Positions live in PostgreSQL; Kafka's offsets are written only as a gauge.
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            # Never project events of a transaction that may still abort.
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
            "session.timeout.ms": SESSION_TIMEOUT_MS,
            "heartbeat.interval.ms": HEARTBEAT_INTERVAL_MS,
            "fetch.wait.max.ms": FETCH_WAIT_MAX_MS,
            "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
        })
        consumer.subscribe(self.topics, on_assign=self._assigned, on_revoke=self._revoked,
                           on_lost=self._revoked)
        self._consumer = consumer

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        assert self._hooks is not None
        starts = self._hooks[0]([(tp.topic, tp.partition) for tp in partitions])
        if starts is None:
            consumer.assign([])
            return
        for tp in partitions:
            start = starts.get((tp.topic, tp.partition))
            tp.offset = FIRST_OFFSET if start is None else start
        consumer.assign(partitions)
        self.membership.assigned(partitions)

    def _revoked(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        assert self._hooks is not None
        self._hooks[1]([(tp.topic, tp.partition) for tp in partitions])
        self.membership.revoked()

    def fetched(self, count: int) -> list[Any]:
        return take_fetched(self.consumer.consume, count)

    def consume(self, count: int, timeout: float) -> list[Any]:
        return self.consumer.consume(num_messages=count, timeout=timeout)

    def first_record(self, timeout: float, done: Callable[[], bool] | None) -> Any:
        """The next record within `timeout`, or None. While a batch is in flight (`done` is
        given), None as soon as `done()`: its outcome is then taken at once, not after an
        idle poll."""
        if done is None:
            return self.consumer.poll(timeout)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            first = self.consumer.poll(batching.in_flight_poll(left))
            if batching.stop_waiting_for_first(first is not None, done(), left):
                return first

    def seek(self, targets: Mapping[PartitionKey, int | None]) -> bool:
        """Move to where `targets` say (None: FIRST_OFFSET); False if a seek failed."""
        for (topic, partition), offset in targets.items():
            where = FIRST_OFFSET if offset is None else offset
            try:
                self.consumer.seek(TopicPartition(topic, partition, where))
            except KafkaException as exc:
                self._log.warning("seek failed", error=str(exc))
                return False
        return True

    def commit_lag_gauge(self, next_offsets: Mapping[PartitionKey, int]) -> None:
        # Only for `kafka-consumer-groups --describe` lag; correctness never reads it.
        offsets = [TopicPartition(t, p, o) for (t, p), o in next_offsets.items()]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:
            self._log.debug("lag gauge commit failed", error=str(exc))

    def sample_lag(self) -> None:
        self._lag.sample(self.consumer)

    def assigned(self) -> list[PartitionKey]:
        return [(tp.topic, tp.partition) for tp in self.consumer.assignment()]

    def offsets(self) -> tuple[dict[PartitionKey, int], dict[PartitionKey, int]] | None:
        """The consumer's positions and the end offsets (committed records) of its assigned
        partitions; None while a partition's leadership settles (ask again)."""
        assignment = self.consumer.assignment()
        positions = {(tp.topic, tp.partition): tp.offset
                     for tp in self.consumer.position(assignment)}
        # One ListOffsets round trip for all partitions (the consumer's per-partition
        # watermark query waits out a fetch cycle each).
        if self._admin is None:
            self._admin = make_admin(self.bootstrap_servers)
        serve_logs(self._admin)
        futures = self._admin.list_offsets(
            {TopicPartition(tp.topic, tp.partition): OffsetSpec.latest() for tp in assignment},
            isolation_level=IsolationLevel.READ_COMMITTED,
            request_timeout=WATERMARK_TIMEOUT_SECONDS,
        )
        try:
            ends = {(tp.topic, tp.partition): f.result().offset for tp, f in futures.items()}
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and (
                    error.retriable() or error.code() in _LEADERSHIP_ERRORS):
                return None
            raise
        return positions, ends

    def renew(self) -> None:
        """Drop this consumer (a consumer that lost its group may hang in its close) and
        subscribe a new one, waiting afresh for its assignment."""
        try:
            close_within(self.consumer.close, f"{self.group} consumer")
        except KafkaException as exc:
            self._log.warning("consumer close failed", error=str(exc))
        self.membership.revoked()
        assert self._hooks is not None
        self.subscribe(*self._hooks)

    def close(self) -> None:
        """Leave the group (bounded) and the process's readiness."""
        unregister(self.membership)
        if self._consumer is not None:
            close_within(self._consumer.close, f"{self.group} consumer")
