"""The projector: campaign.events, campaign.recipients, campaign.deliveries and contacts.events
-> read models.

Lanes: the service runs one `Projector` per lane (`LANES`), each with its own consumer and
Kafka consumer group over its own topics: campaign.deliveries alone (small, latency-critical:
live progress), and everything else (including the hydrator's RecipientQueued bursts, tens of
MB at a campaign start). A delivery is thus never queued behind such a burst: it waits at most
for the other lane's transaction in flight on the same campaign row (see batch_writer: every
transaction locks its campaign rows first, in campaign id order). The read models do not depend
on the order the lanes commit in (a recipient's status only climbs; read_models). Both lanes
store their positions under one name (`POSITIONS_NAME`, what `campaignctl projections rebuild`
compares and swaps): positions are per topic-partition and the lanes' topics are disjoint, so
they never touch each other's rows, while two instances of one lane still fence each other.

Guarantee: exactly-once into PostgreSQL: each batch's read-model changes and the consumer
positions after it commit in one transaction, a position only moves by compare-and-set from the
value this instance loaded, and every (re)assignment resumes from the stored positions, never
from Kafka's committed offsets (committed afterwards only as a lag gauge). Rebuildable from
offset zero into empty tables. A record that does not decode is logged and skipped; its offset
still advances.

Pipelined: while one writer thread applies batch N in PostgreSQL, the driving thread consumes,
decodes and plans batch N+1 (the database works on its own core meanwhile; planning is pure, so
it needs no database state, and the writer thread's only Python work is the COPY, which keeps
PostgreSQL busy back to back). At most one batch is in flight; batch N+1 is handed over only
after batch N committed, so transactions stay in offset order, and if N fails, N+1 is discarded
and the consumer rewinds to the stored positions.

Live traffic: a batch that is not full, following one that was not full either, gathers records
for up to LIVE_LINGER_SECONDS after the previous hand-over (fewer, larger transactions for a
steady trickle of deliveries; a backlog and the first record after a pause never wait).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
import structlog
from confluent_kafka import (
    Consumer,
    IsolationLevel,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec
from psycopg.conninfo import make_conninfo

from projections import batch_writer, read_models
from projections.facts import RecipientFact
from projections.positions import (
    PartitionKey,
    PositionConflict,
    PositionMove,
    advance_positions,
    load_positions,
)
from projections.recipient_records import decode_record
from schemas.base import Record
from schemas.envelope import Message, SchemaViolation
from services.common.gc_tuning import relaxed_gc
from services.common.heartbeat import Heartbeat
from services.common.kafka import CLIENT_LOG, close_within, is_fatal, make_admin, serve_logs
from services.common.membership import register, unregister
from services.common.metrics import PROJECTION_LAG_SECONDS, RECORDS_CONSUMED, LagSampler
from services.common.settings import Settings
from services.common.topics import (
    CONTACTS,
    DELIVERIES,
    EVENTS,
    RECIPIENTS,
    SEGMENTS,
    TopicSpec,
    topic_name,
)

# Records per transaction: bounds memory, the row locks one transaction holds and the work a
# failed commit has to redo; large enough that per-batch round trips stay negligible (each
# one early in a batch also waits for the GIL while the driving thread decodes the next
# batch). A cold drain of 200,000 deliveries: 5,000 -> 10,000 about -10% database CPU and
# +10-30% throughput; 20,000 gained no more and delays the first commit. Only a backlog fills
# a batch: live traffic comes in whatever one poll holds.
BATCH_MAX_RECORDS = 10_000
# The main lane's batches are smaller: each of its transactions holds the campaign row lock a
# delivery transaction of the same campaign waits for (batch_writer's lock order), and at a
# campaign's start it projects the hydrator's whole burst of RecipientQueued. On a busy
# machine two 10,000-row transactions back to back held deliveries up ~2.9 s (`make bench`,
# 20,000 recipients: lag p99 2.6 s); 2,000 rows hold it a fifth as long, for a few more
# round trips per burst.
MAIN_LANE_BATCH_MAX_RECORDS = 2_000
# How long one poll waits on quiet topics: bounds how late a stop request is noticed. A record
# that arrives meanwhile ends the wait at once.
POLL_TIMEOUT_SECONDS = 0.1
# Live traffic (a steady trickle): a batch that is not full is handed to the writer no sooner
# than this after the previous one, and gathers what arrives meanwhile. Each transaction costs
# ~1 ms of Python and ~1.3 ms of PostgreSQL CPU besides its rows (six statements, the commit),
# and a delivery stream of ~1,000/s otherwise ends up in as many transactions as the machine
# can turn around. Only while the previous batch was not full either (a backlog is never held
# up, nor its last batch) and never on a quiet stream (the first record after a pause goes at
# once): it adds at most this to a record's projection lag, well inside the 1 s p99 target.
# bench.projection_lag 20000 1000 (test platform, shared machine): the delivery lane's
# transactions ~1,300 -> ~180, its Python CPU ~2.4 -> ~0.8 s and its PostgreSQL backend's
# ~1.8 -> ~0.6 s; lag p50 ~30 -> ~60-80 ms, p99 120-400 ms either way (0.05 s: ~370
# transactions, p50 ~35 ms).
LIVE_LINGER_SECONDS = 0.1
# While a batch is in flight and no record comes, how often the driving thread looks whether
# the batch is done.
IN_FLIGHT_POLL_SECONDS = 0.005
# How long the broker may hold a fetch for partitions without new records. A cold start
# sometimes sent its first fetch before the partitions holding the backlog were fetchable,
# and the records waited out the whole client default (500 ms: ~1 in 8 cold drains of the
# projection bench took ~0.5 s longer to their first batch). Idle fetches at this rate cost
# the broker no CPU measurable against its own idle load (two idle consumers on the projected
# topics, 10 s: 0.9-1.3 s of broker CPU at either setting).
FETCH_WAIT_MAX_MS = 100
# consume() builds all the messages it returns in one C call that holds the GIL (~1-2 us a
# message): 10,000 at once kept the writer thread, back from a PostgreSQL round trip, waiting
# ~10-20 ms for it. Taken this many at a time, the writer gets the GIL between calls (each
# call also gives the GIL up and waits to get it back: 500 a call cost the driving thread
# more than it saved the writer; bench.projection 200000, drain 1.67-1.77 s at 500,
# 1.55-1.68 s at 2,000).
CONSUME_CHUNK = 2000
# How long the client waits before fetching a partition again once its local queue of
# fetched records is full (queued.min.messages, 100,000 a partition). The client default,
# 1 s, stalled a backlog's drain: the projector took the queued records in ~0.45 s and then
# waited out the rest of the second with nothing to project (bench.projection 200000: one
# gap of ~0.6 s between batches, otherwise ~40 ms apart). Checking again every 10 ms costs
# a look at the queue's size, no request.
FETCH_QUEUE_BACKOFF_MS = 10
# Pause after a database failure before consuming again: a restarting PostgreSQL is not
# hammered, and a failing batch is not retried in a hot loop.
DB_RETRY_BACKOFF_SECONDS = 1.0
# A PostgreSQL that does not answer a connect within this is treated as down (retried after
# the backoff) instead of stalling the consumer until the group evicts it.
DB_CONNECT_TIMEOUT_SECONDS = 10
# End-offset look-ups in `drain`: a broker that does not answer within this fails the drain.
WATERMARK_TIMEOUT_SECONDS = 5.0
# A projector that dies without leaving the group (SIGKILL, lost host) keeps its partitions
# until the broker misses its heartbeats this long: the projection of those partitions stalls
# that long (the client default, 45 s, is a long lag spike). Heartbeats come from the client's
# own thread, so a long batch does not count against it.
SESSION_TIMEOUT_MS = 10_000
HEARTBEAT_INTERVAL_MS = SESSION_TIMEOUT_MS // 3
# A member waiting this long for an assignment after losing its partitions is re-created
# (`_renew_if_stuck`): a healthy group answers within a session timeout or two, and a
# rebalance waits at most max.poll.interval.ms for a slow member only when one is mid-batch.
STUCK_MEMBER_SECONDS = 90.0

# How long a thread may keep the GIL while another waits for it (CPython's default: 5 ms). The
# writer thread needs the GIL for a moment after each PostgreSQL round trip and COPY flush;
# while the driving thread decoded the next batch, each of those waited up to the whole
# default interval. 0.5 ms: a cold drain of 200,000 deliveries ~+15% throughput; the extra
# switches cost the decoding thread next to nothing.
GIL_SWITCH_INTERVAL_SECONDS = 0.0005

# Failures that only mean another transaction got to the same rows first (a deadlock victim; a
# recipient row another instance inserted meanwhile): that transaction has ended by the time
# we hear of it, so the batch is retried at once, once; a second failure in a row waits out
# DB_RETRY_BACKOFF_SECONDS like any other.
_ROW_CONFLICTS = (psycopg.errors.DeadlockDetected, psycopg.errors.UniqueViolation,
                  psycopg.errors.SerializationFailure)

# A lane whose loop has not come round for this long is stuck: the process stops beating.
LANE_SILENT_SECONDS = 30.0
# Answers to an end-offset look-up while a partition's leadership settles (new topic, broker
# restart): transient, the look-up is asked again.
_LEADERSHIP_ERRORS = frozenset({
    KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
})

# Where a partition with no stored position starts. A plain offset, not OFFSET_BEGINNING: the
# logical offset makes the client look the start up first, and a fetch it sends meanwhile for
# the other (often empty) partitions waits out fetch.wait.max.ms (500 ms) before the records
# come (the first batch of a cold start took ~0.8 s). Where the log no longer starts at 0
# (retention), the fetch is out of range and auto.offset.reset=earliest moves it to the
# start: the same records as OFFSET_BEGINNING.
FIRST_OFFSET = 0

# segments.events: only for the command gateway's outcomes of segment commands.
PROJECTED_TOPICS = (EVENTS, RECIPIENTS, DELIVERIES, CONTACTS, SEGMENTS)
# Where every lane stores its positions (projector_positions.consumer_group, under the topic
# prefix): one name for the whole projection, whatever lane or version wrote a partition.
POSITIONS_NAME = "projector"


@dataclass(frozen=True)
class Lane:
    """Some of the projected topics, consumed by one `Projector` with its own consumer group."""

    group: str  # Kafka consumer group name (under the topic prefix)
    topics: tuple[TopicSpec, ...]
    batch_size: int = BATCH_MAX_RECORDS  # records per transaction at most


# Deliveries first: their lane is the latency-critical one.
DELIVERY_LANE = Lane("projector-deliveries", (DELIVERIES,))
MAIN_LANE = Lane("projector", tuple(t for t in PROJECTED_TOPICS if t is not DELIVERIES),
                 batch_size=MAIN_LANE_BATCH_MAX_RECORDS)
LANES = (DELIVERY_LANE, MAIN_LANE)


@dataclass
class ConsumedBatch:
    """Records of one consume() that belong to this instance, decoded, with their moves and
    (once planned) their row changes."""

    messages: list[Message[Record] | RecipientFact] = field(default_factory=list)
    moves: dict[PartitionKey, PositionMove] = field(default_factory=dict)
    skipped: int = 0
    changes: read_models.BatchChanges = field(default_factory=read_models.BatchChanges)
    # Milliseconds since the epoch of the oldest record (the first of each partition's run):
    # the projection lag metric at commit.
    oldest_ms: int | None = None


Applied = tuple[list[tuple[str, str]], read_models.BatchChanges]


@dataclass
class InFlight:
    """The batch the writer thread is applying, and the outcome to come."""

    batch: ConsumedBatch
    outcome: Future[Applied]


class Projector:
    """Consumes the campaign topics (all, or one lane's) and keeps the read models; one
    instance per lane and process (`lane_projectors`), or one over every topic (a rebuild).

    Drive it with `run(stop_event)` (until the event is set), or step by step with
    `poll_once()` / `drain()` in tests. Not thread-safe: one thread drives one instance (the
    instance runs its own writer thread inside).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        batch_size: int = BATCH_MAX_RECORDS,
        poll_timeout: float = POLL_TIMEOUT_SECONDS,
        linger: float = LIVE_LINGER_SECONDS,
        logger: Any = None,
        group: str | None = None,
        schema: str | None = None,
        topics: Sequence[TopicSpec] = PROJECTED_TOPICS,
        positions_group: str | None = None,
    ) -> None:
        """`group` (the Kafka consumer group) and `schema` default to the live projector's
        group and the connection's own search_path; `projections.rebuild` projects into a
        fresh schema. `topics`: all projected topics, or one lane's. `positions_group`: the
        name its positions are stored under (default: `group`)."""
        self.settings = settings
        self.looped_at = time.monotonic()  # each pass of the loop; read by run_lanes' heartbeat
        self.group = group or settings.group(POSITIONS_NAME)
        self.positions_group = positions_group or self.group
        self.schema = schema
        self.topics = [topic_name(spec, settings) for spec in topics]
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        self.linger = linger
        # When the last batch was handed to the writer, and whether it was full (LIVE_LINGER).
        self._handed_over_at = float("-inf")
        self._last_batch_full = True
        self._log = logger or structlog.get_logger().bind(component="projector")
        # Assigned partitions -> the stored next offset this instance expects (None: never
        # stored). Only partitions in here are projected.
        self._positions: dict[PartitionKey, int | None] = {}
        # Next offsets of the batch in flight (not stored yet): where the next batch starts.
        self._ahead: dict[PartitionKey, int] = {}
        self._in_flight: InFlight | None = None
        # The connection is used by the writer thread while a batch is in flight, and by the
        # driving thread only when none is (assignment, reload).
        self._writer = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"projector-writer-{self.group}")
        self._conn: psycopg.Connection[Any] | None = None
        self._stop = threading.Event()
        self._closed = False
        self._admin: AdminClient | None = None  # only for `drain`
        # The last batch failed on a row conflict and was retried without a pause.
        self._retried_at_once = False
        self.records_applied = 0
        self.batches_committed = 0  # transactions that applied a batch
        self._lag = LagSampler()  # the consumer lag gauge, sampled from this loop
        # Wall-clock seconds per step, summed (the projection bench reports where the time
        # goes): consume (Kafka), decode, plan (row changes) and wait (for the writer thread)
        # in the driving thread; write (the PostgreSQL transaction) in the writer thread,
        # overlapping the next batch's consume, decode and plan.
        self.time_split = dict.fromkeys(("consume", "decode", "wait", "plan", "write"), 0.0)
        self._membership = register(self.group)  # /readyz, and the stuck-member check in run
        self._consumer = self._subscribe()

    # --- lifecycle ---------------------------------------------------------------------

    def run(self, stop_event: threading.Event) -> None:
        """Project until `stop_event` is set; the batch in flight finishes, then it closes."""
        self._stop = stop_event
        self._log.info("projector started", group=self.group, topics=self.topics)
        try:
            while not stop_event.is_set():
                self.looped_at = time.monotonic()
                self.poll_once()
                self._renew_if_stuck()
        finally:
            self.close()
        self._log.info("projector stopped", records_applied=self.records_applied)

    def close(self) -> None:
        """Let the batch in flight commit (or roll back), then leave the group."""
        if self._closed:
            return
        self._closed = True
        try:
            self._settle(rewind=False)
        finally:
            unregister(self._membership)
            self._writer.shutdown(wait=True)
            try:
                close_within(self._consumer.close, f"{self.group} consumer")
            finally:
                if self._conn is not None:
                    self._conn.close()

    def __enter__(self) -> Projector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- one batch ---------------------------------------------------------------------

    def poll_once(self) -> int:
        """Consume one batch and hand it to the writer thread once the batch in flight has
        committed; returns the records that batch covered (0 if none, or if it failed)."""
        started = time.perf_counter()
        self._lag.sample(self._consumer)
        records = self._consume()
        consumed = time.perf_counter()
        self.time_split["consume"] += consumed - started
        batch = self._collect(records) if records else None
        decoded = time.perf_counter()
        self.time_split["decode"] += decoded - consumed
        if batch is not None and batch.messages:
            batch.changes = read_models.plan(batch.messages)
            # The writer's sorting and counting, done here while it waits on PostgreSQL.
            batch_writer.prepare(batch.changes, self._conn)
            self.time_split["plan"] += time.perf_counter() - decoded
        covered, ok = self._settle(rewind=True)
        if ok and batch is not None and batch.moves:
            self._ahead = {key: move.next_offset for key, move in batch.moves.items()}
            self._in_flight = InFlight(batch, self._writer.submit(self._commit, batch))
            self._handed_over_at = time.monotonic()
            self._last_batch_full = len(records) >= self.batch_size
        # If the batch in flight failed, the consumer was rewound to the stored positions: this
        # batch lies past them, so it is dropped here and read again.
        return covered

    def _consume(self) -> list[Any]:
        # Whatever is already fetched, at once; on an empty queue wait for the first record
        # only (consume() would wait out its whole timeout for a full batch), then take what
        # came with it.
        records = self._fetched(self.batch_size)
        if not records:
            first = self._first_record()
            if first is None:
                return []
            records = [first, *self._fetched(self.batch_size - 1)]
        if self._last_batch_full or len(records) >= self.batch_size:
            return records
        # Live traffic: gather more until LIVE_LINGER_SECONDS after the previous hand-over (a
        # rebalance meanwhile is fine: `_collect` drops records of revoked partitions).
        while (len(records) < self.batch_size and (
                wait := self._handed_over_at + self.linger - time.monotonic()) > 0):
            records.extend(self._consumer.consume(
                num_messages=self.batch_size - len(records), timeout=wait))
        return records

    def _fetched(self, count: int) -> list[Any]:
        """Up to `count` records already fetched, without waiting, CONSUME_CHUNK at a time."""
        records: list[Any] = []
        consume = self._consumer.consume
        while len(records) < count:
            want = min(CONSUME_CHUNK, count - len(records))
            chunk = consume(num_messages=want, timeout=0)
            records.extend(chunk)
            if len(chunk) < want:  # the fetched queue is empty
                break
        return records

    def _first_record(self) -> Any:
        """The next record within the poll timeout, or None. While a batch is in flight, None
        as soon as that batch is done: it is then taken at once (its positions, the
        caught-up check of a drain) instead of after a whole idle poll (0.1 s at the end of
        every cold drain)."""
        flight = self._in_flight
        if flight is None:
            return self._consumer.poll(self.poll_timeout)
        deadline = time.monotonic() + self.poll_timeout
        while True:
            left = deadline - time.monotonic()
            first = self._consumer.poll(max(0.0, min(IN_FLIGHT_POLL_SECONDS, left)))
            if first is not None or flight.outcome.done() or left <= IN_FLIGHT_POLL_SECONDS:
                return first

    def _settle(self, *, rewind: bool) -> tuple[int, bool]:
        """Wait for the batch in flight and take its outcome: (records covered, committed).

        On a failure the stored positions stay the truth: with `rewind`, the consumer seeks
        back to them (reloaded after a position conflict) so nothing is skipped.
        """
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            return 0, True
        self._ahead = {}
        waited = time.perf_counter()
        try:
            completed, changes = flight.outcome.result()
        except PositionConflict as exc:
            self._log.warning("positions moved by another instance; reloading", error=str(exc))
            if rewind:
                self._reload_and_seek()
            return 0, False
        except psycopg.Error as exc:
            # Rolled back (or, if COMMIT itself was lost, maybe not: then the compare-and-set
            # of the retry raises PositionConflict and we reload, so nothing applies twice).
            self._log.error("batch failed; rewinding", error=str(exc), type=type(exc).__name__)
            self._drop_broken_connection()
            if rewind:
                self._seek(dict(self._positions))
                at_once = isinstance(exc, _ROW_CONFLICTS) and not self._retried_at_once
                self._retried_at_once = at_once
                if not at_once:
                    self._stop.wait(DB_RETRY_BACKOFF_SECONDS)
            return 0, False
        finally:
            self.time_split["wait"] += time.perf_counter() - waited
        self._retried_at_once = False
        batch = flight.batch
        for key, move in batch.moves.items():
            if key in self._positions:  # else revoked meanwhile: the new owner goes on
                self._positions[key] = move.next_offset
        self._commit_lag_gauge(batch.moves)
        if batch.oldest_ms is not None:
            PROJECTION_LAG_SECONDS.observe(max(0.0, time.time() - batch.oldest_ms / 1000))
        covered = len(batch.messages) + batch.skipped
        self.records_applied += covered
        self.batches_committed += 1
        for dropped in changes.dropped:
            self._log.warning(
                "event dropped", event_id=str(dropped.event_id), type=dropped.type,
                reason=dropped.reason,
            )
        for tenant_id, campaign_id in completed:
            self._log.info("campaign completed", tenant_id=tenant_id, campaign_id=campaign_id)
        self._log.debug(
            "batch applied", records=covered, skipped=batch.skipped, ignored=changes.ignored,
        )
        return covered, True

    def _wait_in_flight(self) -> None:
        """Block until the writer thread is done with the batch in flight (its outcome is
        taken later by `_settle`)."""
        if self._in_flight is not None:
            wait_for([self._in_flight.outcome])

    def drain(self, timeout: float = 60.0) -> int:
        """Poll until every assigned partition is projected up to its end; for tests and tools.

        Raises TimeoutError if that does not happen within `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        total = 0
        while True:
            total += self.poll_once()
            if self.caught_up():
                return total
            if time.monotonic() > deadline:
                raise TimeoutError(f"projector not caught up after {timeout}s")

    def caught_up(self) -> bool:
        """True when partitions are assigned, no batch is in flight and each partition is
        projected up to its end offset."""
        if self._in_flight is not None:
            return False
        assignment = self._consumer.assignment()
        if not assignment or len(assignment) != len(self._positions):
            return False
        positions = {
            (tp.topic, tp.partition): tp.offset for tp in self._consumer.position(assignment)
        }
        try:
            ends = self._end_offsets(assignment)
        except KafkaException as exc:
            # A leader moving (or a topic created a moment ago) answers with a retriable
            # error: not known to be caught up yet, ask again on the next call. The admin
            # client does not always flag leadership errors as retriable, hence the codes.
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and (
                    error.retriable() or error.code() in _LEADERSHIP_ERRORS):
                return False
            raise
        for tp, end in ends.items():
            key = (tp.topic, tp.partition)
            stored = self._positions.get(key)
            # A transaction marker at the end of a partition is never delivered as a record,
            # so the consumer's own position can be past our last stored offset.
            if max(stored or 0, positions.get(key, -1)) < end:
                return False
        return True

    def _end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        # One ListOffsets round trip for all partitions (the consumer's per-partition
        # watermark query waits out a fetch cycle each).
        if self._admin is None:
            self._admin = make_admin(self.settings.kafka_bootstrap_servers)
        serve_logs(self._admin)
        futures = self._admin.list_offsets(
            {TopicPartition(tp.topic, tp.partition): OffsetSpec.latest() for tp in partitions},
            isolation_level=IsolationLevel.READ_COMMITTED,
            request_timeout=WATERMARK_TIMEOUT_SECONDS,
        )
        return {tp: future.result().offset for tp, future in futures.items()}

    # --- internals ---------------------------------------------------------------------

    def _subscribe(self) -> Consumer:
        consumer = Consumer(
            {
                "bootstrap.servers": self.settings.kafka_bootstrap_servers,
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
            }
        )
        consumer.subscribe(
            self.topics,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )
        return consumer

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._wait_in_flight()  # its transaction holds the connection the look-up needs
        keys = [(tp.topic, tp.partition) for tp in partitions]
        stored = self._load_positions_retrying(keys)
        if stored is None:  # stopping while PostgreSQL is down: take nothing
            consumer.assign([])
            return
        for tp in partitions:
            tp.offset = stored.get((tp.topic, tp.partition), FIRST_OFFSET)
        for key in keys:
            self._positions[key] = stored.get(key)
        consumer.assign(partitions)
        self._membership.assigned(partitions)
        self._log.info(
            "partitions assigned", count=len(partitions),
            resumed={f"{t}[{p}]": o for (t, p), o in sorted(stored.items())},
        )

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Called from inside consume(): the batch in flight finishes first, so the next owner
        # loads positions that include it (were it still running, the compare-and-set would
        # still fence one of the two, at the price of a wasted batch).
        self._wait_in_flight()
        for tp in partitions:
            self._positions.pop((tp.topic, tp.partition), None)
            self._ahead.pop((tp.topic, tp.partition), None)
        self._membership.revoked()
        self._log.info("partitions revoked", count=len(partitions))

    def _load_positions_retrying(
        self, keys: Sequence[PartitionKey]
    ) -> dict[PartitionKey, int] | None:
        # Assigning without the stored positions would project from the wrong offsets, so an
        # assignment waits for PostgreSQL (the group evicts us if that exceeds
        # max.poll.interval.ms, which hands the partitions to a healthier instance).
        while True:
            try:
                return load_positions(self._connection(), self.positions_group, keys)
            except psycopg.Error as exc:
                self._log.error("cannot load positions; retrying", error=str(exc))
                self._drop_broken_connection()
                if self._stop.wait(DB_RETRY_BACKOFF_SECONDS):
                    return None

    def _collect(self, records: list[Any]) -> ConsumedBatch:
        batch = ConsumedBatch()
        positions = self._positions
        ahead = self._ahead
        ends: dict[PartitionKey, int] = {}  # next offset after this batch, per partition
        append = batch.messages.append
        # Records come in runs of one partition: its key and expected offset are looked up
        # once per run (~0.3 us a record less).
        run_topic, run_partition = None, -1
        key: PartitionKey = ("", -1)
        owned, expected = False, None
        consumed: dict[str, int] = {}  # per topic, counted a run at a time
        run_start = 0
        oldest: int | None = None
        for index, record in enumerate(records):
            error = record.error()
            if error is not None:
                if is_fatal(error):
                    raise KafkaException(error)
                self._log.warning("consumer error", error=str(error))
                continue
            partition, topic = record.partition(), record.topic()
            if partition != run_partition or topic != run_topic:
                if run_topic is not None:
                    consumed[run_topic] = consumed.get(run_topic, 0) + index - run_start
                run_start = index
                stamp = record.timestamp()[1]
                if stamp > 0 and (oldest is None or stamp < oldest):
                    oldest = stamp
                run_topic, run_partition = topic, partition
                key = (topic, partition)
                # Not in positions: revoked during this consume(), the new owner projects it.
                owned = key in positions
                expected = ahead.get(key, positions[key]) if owned else None
            if not owned:
                continue
            offset = record.offset()
            if expected is not None and offset < expected:
                continue  # fetched before a seek: already applied
            ends[key] = offset + 1
            try:
                append(decode_record(record.value()))
            except SchemaViolation as exc:
                batch.skipped += 1
                self._log.warning(
                    "undecodable record skipped", topic=key[0], partition=key[1],
                    offset=offset, reason=str(exc),
                )
        if run_topic is not None:
            consumed[run_topic] = consumed.get(run_topic, 0) + len(records) - run_start
        for name, count in consumed.items():
            RECORDS_CONSUMED.labels(topic=name).inc(count)
        batch.oldest_ms = oldest
        batch.moves = {key: PositionMove(ahead.get(key, positions[key]), end)
                       for key, end in ends.items()}
        return batch

    def _commit(self, batch: ConsumedBatch) -> Applied:
        """In the writer thread: apply the planned batch in one transaction."""
        started = time.perf_counter()
        changes = batch.changes
        conn = self._connection()
        with conn.transaction():
            # Positions first: the compare-and-set fences a stale owner before any work, and
            # its row locks make a competing instance wait and then fail its comparison.
            advance_positions(conn, self.positions_group, batch.moves)
            completed = batch_writer.apply(conn, changes)
        self.time_split["write"] += time.perf_counter() - started
        return completed, changes

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            # autocommit: every transaction is an explicit `conn.transaction()` block, so a
            # position look-up never leaves one open.
            # A rebuild projects into its own schema (unqualified names resolve there).
            conninfo = self.settings.database_url if self.schema is None else make_conninfo(
                self.settings.database_url, options=f"-c search_path={self.schema}")
            self._conn = psycopg.connect(
                conninfo,
                autocommit=True,
                connect_timeout=DB_CONNECT_TIMEOUT_SECONDS,
                application_name=f"{self.group}-projector"[:63],
            )
            # For this session (set once, not per transaction: a round trip less per batch):
            # commits do not wait for their WAL flush. Exactly-once still holds: the
            # positions commit atomically with the rows, so if PostgreSQL crashes and loses
            # the last commits, it loses their positions with them, and those batches are
            # read again from Kafka and applied once. Only a reader may briefly have seen
            # rows that the crash took back (they return with the replay).
            self._conn.execute("SET synchronous_commit = off")
            batch_writer.prepare_session(self._conn)
        return self._conn

    def _drop_broken_connection(self) -> None:
        if self._conn is not None and (self._conn.broken or self._conn.closed):
            self._conn.close()
            self._conn = None

    def _reload_and_seek(self) -> None:
        """After a conflict the stored positions are the truth: take them, then seek."""
        try:
            keys = list(self._positions)
            stored = load_positions(self._connection(), self.positions_group, keys)
        except psycopg.Error as exc:
            self._log.error("cannot reload positions", error=str(exc))
            self._drop_broken_connection()
            self._seek(dict(self._positions))
            self._stop.wait(DB_RETRY_BACKOFF_SECONDS)
            return
        targets = {key: stored.get(key) for key in keys}
        self._positions.update(targets)
        self._seek(targets)

    def _seek(self, targets: dict[PartitionKey, int | None]) -> None:
        """Move the consumer back to where the stored positions say (the batch was undone)."""
        for (topic, partition), offset in targets.items():
            where = FIRST_OFFSET if offset is None else offset
            try:
                self._consumer.seek(TopicPartition(topic, partition, where))
            except KafkaException as exc:
                # Without a working seek the consumer would run ahead of the stored
                # position; rejoining makes on_assign load the stored positions again.
                self._log.warning("seek failed; resubscribing", error=str(exc))
                self._resubscribe()
                return

    def _renew_if_stuck(self) -> None:
        # A member whose partitions were revoked or lost (a broker outage longer than the
        # session) normally gets the group's next assignment within a session timeout or
        # two; one seen waiting for minutes after a broker SIGSTOP never got it, and a new
        # consumer rejoins at once. Nothing is lost: positions come from PostgreSQL.
        waited = self._membership.waiting_for()
        if waited is not None and waited > STUCK_MEMBER_SECONDS:
            self._log.error("no assignment from the group; re-creating the consumer",
                            waited_seconds=round(waited))
            self._resubscribe()

    def _resubscribe(self) -> None:
        self._wait_in_flight()
        try:
            # A consumer that lost its group may hang in its close: it is dropped either way.
            close_within(self._consumer.close, f"{self.group} consumer")
        except KafkaException as exc:
            self._log.warning("consumer close failed", error=str(exc))
        self._positions.clear()
        self._ahead.clear()
        self._membership.revoked()  # waiting afresh, for the new consumer's assignment
        self._consumer = self._subscribe()

    def _commit_lag_gauge(self, moves: dict[PartitionKey, PositionMove]) -> None:
        # Only for `kafka-consumer-groups --describe` lag; correctness never reads it.
        offsets = [TopicPartition(t, p, m.next_offset) for (t, p), m in moves.items()]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:
            self._log.debug("lag gauge commit failed", error=str(exc))


def lane_projectors(settings: Settings, *, logger: Any = None, **options: Any) -> list[Projector]:
    """One `Projector` per lane of `LANES`, as the service runs them: each with its own Kafka
    consumer group and batch size, all storing positions under `POSITIONS_NAME`. `options` go
    to each (a `batch_size` there overrides every lane's)."""
    log = logger or structlog.get_logger().bind(component="projector")
    projectors: list[Projector] = []
    try:
        for lane in LANES:
            lane_options = {"batch_size": lane.batch_size, **options}
            projectors.append(Projector(
                settings, topics=lane.topics, group=settings.group(lane.group),
                positions_group=settings.group(POSITIONS_NAME), logger=log.bind(lane=lane.group),
                **lane_options,
            ))
    except BaseException:
        for projector in projectors:
            projector.close()
        raise
    return projectors


@contextmanager
def projecting_process() -> Iterator[None]:
    """Process-wide settings for a process whose main work is projecting (`run_lanes`, the
    projection bench), restored on exit: the short GIL switch interval
    (GIL_SWITCH_INTERVAL_SECONDS) and relaxed garbage collection (services.common.gc_tuning:
    GC_THRESHOLDS, what exists on entry frozen)."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, GIL_SWITCH_INTERVAL_SECONDS))
    try:
        with relaxed_gc():
            yield
    finally:
        sys.setswitchinterval(interval)  # as it was, for whatever the process does next


def run_lanes(projectors: Sequence[Projector], stop: threading.Event,
              heartbeat: Heartbeat | None = None) -> None:
    """Run each projector in a thread of its own until `stop` is set, in a
    `projecting_process` (short GIL switch interval, relaxed garbage collection).

    A lane that fails sets `stop` for the others (a process with one dead lane would look
    alive while half the topics go unprojected) and its error is raised once all have closed.
    `heartbeat` beats while every lane's loop comes round.
    """
    errors: list[BaseException] = []

    def drive(projector: Projector) -> None:
        try:
            projector.run(stop)
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=drive, args=(p,), name=f"lane-{p.group}", daemon=True)
               for p in projectors]
    with projecting_process():
        for thread in threads:
            thread.start()
        for thread in threads:
            # Joined in slices: the calling (main) thread stays free to run signal handlers.
            while thread.is_alive():
                thread.join(0.5)
                # The process is alive while every lane's loop is: one stuck lane is a hang.
                now = time.monotonic()
                if heartbeat and all(now - p.looped_at < LANE_SILENT_SECONDS for p in projectors):
                    heartbeat.beat()
    if errors:
        raise errors[0]
