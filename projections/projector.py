"""The projector: campaign.events, campaign.recipients, campaign.deliveries and contacts.events
-> read models, one lane's topics (projections.lanes) or all of them.

Guarantee: exactly-once into PostgreSQL: each batch's read-model changes and the consumer
positions after it commit in one transaction (projections.read_model_store), a position only
moves by compare-and-set from the value this instance loaded, and every (re)assignment resumes
from the stored positions, never from Kafka's committed offsets (committed afterwards only as a
lag gauge). Rebuildable from offset zero into empty tables. A record that does not decode is
logged and skipped; its offset still advances.

Pipelined: while the writer thread applies batch N (projections.writer_thread), the driving
thread consumes, decodes and plans batch N+1. Batch N+1 is handed over only after batch N
committed, so transactions stay in offset order; if N fails, N+1 is discarded and the consumer
rewinds to the stored positions. When to hand a batch over, how to recover from a failure and
when to re-create the consumer are decided by projections.batching; this loop carries them out.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, Protocol

import psycopg
import structlog
from psycopg.conninfo import make_conninfo

from projections import batch_writer, batching, read_models
from projections.batching import BATCH_MAX_RECORDS, LIVE_LINGER_SECONDS, Pace
from projections.consumed import ConsumedBatch, OwnedPartitions, collect
from projections.lanes import LANES, POSITIONS_NAME, PROJECTED_TOPICS, Lane, run_lanes
from projections.positions import PositionMove
from projections.read_model_store import ReadModelStore, failure_of
from projections.record_feed import AssignHook, RecordFeed, RevokeHook
from projections.writer_thread import Applied, WriterThread
from services.common.kafka import PartitionKey
from services.common.membership import GroupMembership
from services.common.metrics import PROJECTION_LAG_SECONDS, RECORDS_CONSUMED
from services.common.settings import Settings
from services.common.topics import TopicSpec, topic_name

# Re-exported for callers that name the lanes through this module (bench.projection_lag).
__all__ = ["LANES", "POSITIONS_NAME", "PROJECTED_TOPICS", "Projector", "lane_projectors",
           "projector_for", "run_lanes"]

# How long one poll waits on quiet topics: bounds how late a stop request is noticed. A record
# that arrives meanwhile ends the wait at once.
POLL_TIMEOUT_SECONDS = 0.1
# A PostgreSQL that does not answer a connect within this is treated as down (retried after
# the backoff) instead of stalling the consumer until the group evicts it.
DB_CONNECT_TIMEOUT_SECONDS = 10


class Feed(Protocol):
    """What the Projector needs of its Kafka side (projections.record_feed.RecordFeed)."""

    group: str
    topics: list[str]
    membership: GroupMembership

    def subscribe(self, on_assign: AssignHook, on_revoke: RevokeHook) -> None: ...
    def fetched(self, count: int) -> list[Any]: ...
    def consume(self, count: int, timeout: float) -> list[Any]: ...
    def first_record(self, timeout: float, done: Callable[[], bool] | None) -> Any: ...
    def seek(self, targets: Mapping[PartitionKey, int | None]) -> bool: ...
    def commit_lag_gauge(self, next_offsets: Mapping[PartitionKey, int]) -> None: ...
    def sample_lag(self) -> None: ...
    def assigned(self) -> list[PartitionKey]: ...
    def offsets(self) -> tuple[dict[PartitionKey, int], dict[PartitionKey, int]] | None: ...
    def renew(self) -> None: ...
    def close(self) -> None: ...


class Store(Protocol):
    """What the Projector needs of its PostgreSQL side (read_model_store.ReadModelStore)."""

    def load_waiting(self, keys: Iterable[PartitionKey], stop: threading.Event,
                     log: Any) -> dict[PartitionKey, int] | None: ...
    def reload(self, keys: Iterable[PartitionKey], log: Any) -> dict[PartitionKey, int] | None: ...
    def commit(self, moves: Mapping[PartitionKey, PositionMove],
               changes: read_models.BatchChanges) -> list[tuple[str, str]]: ...
    def drop_if_broken(self) -> None: ...
    def close(self) -> None: ...


class Projector:
    """Consumes `feed` into the read models in `store` (built by `projector_for`); one per
    lane and process (`lane_projectors`), or one over every topic (a rebuild).

    Drive it with `run(stop_event)`, or step by step with `poll_once()` / `drain()` in tests.
    Not thread-safe: one thread drives one instance (which runs its own writer thread)."""

    def __init__(self, feed: Feed, store: Store, *,
                 batch_size: int = BATCH_MAX_RECORDS, poll_timeout: float = POLL_TIMEOUT_SECONDS,
                 linger: float = LIVE_LINGER_SECONDS, logger: Any = None) -> None:
        self.feed, self.store, self.group = feed, store, feed.group
        self.batch_size, self.poll_timeout, self.linger = batch_size, poll_timeout, linger
        self.looped_at = time.monotonic()  # each pass of the loop; read by run_lanes' heartbeat
        self._pace = Pace()  # of hand-overs to the writer: when live traffic lingers
        self._log = logger or structlog.get_logger().bind(component="projector")
        self._owned = OwnedPartitions()  # only partitions in here are projected
        # The store's connection is the writer thread's while a batch is in flight, and the
        # driving thread's only when none is (assignment, reload).
        self._writer = WriterThread(f"projector-writer-{self.group}")
        self._stop, self._closed = threading.Event(), False
        self._retried_at_once = False  # the last batch failed and is retried without a pause
        self.records_applied = self.batches_committed = 0  # records; transactions
        # Wall-clock seconds per step, summed (the projection bench reports where the time
        # goes): consume, decode, plan and wait in the driving thread; write in the writer.
        self.time_split = dict.fromkeys(("consume", "decode", "wait", "plan", "write"), 0.0)
        feed.subscribe(self._on_assign, self._on_revoke)

    def run(self, stop_event: threading.Event) -> None:
        """Project until `stop_event` is set; the batch in flight finishes, then it closes."""
        self._stop = stop_event
        self._log.info("projector started", group=self.group, topics=self.feed.topics)
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
            self._writer.shutdown()
            try:
                self.feed.close()
            finally:
                self.store.close()

    def __enter__(self) -> Projector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def poll_once(self) -> int:
        """Consume one batch and hand it to the writer thread once the batch in flight has
        committed; returns the records that batch covered (0 if none, or if it failed)."""
        started = time.perf_counter()
        self.feed.sample_lag()
        records = self._consume()
        consumed = time.perf_counter()
        batch = _collected(self._log, records, self._owned)
        decoded = time.perf_counter()
        if batch is not None and batch.messages:
            batch.changes = read_models.plan(batch.messages)
            batch_writer.prepare(batch.changes)  # the writer's sorting, done here meanwhile
            self.time_split["plan"] += time.perf_counter() - decoded
        self.time_split["consume"] += consumed - started
        self.time_split["decode"] += decoded - consumed
        covered, ok = self._settle(rewind=True)
        if ok and batch is not None and batch.moves:
            self._owned.handed_over(batch.moves)
            self._writer.hand_over(batch, self._write)
            self._pace = Pace(time.monotonic(), last_full=len(records) >= self.batch_size)
        # If the batch in flight failed, the consumer was rewound to the stored positions: this
        # batch lies past them, so it is dropped here and read again.
        return covered

    def _consume(self) -> list[Any]:
        # What is fetched at once, else the first record and what came with it; then linger.
        records = self.feed.fetched(self.batch_size)
        if not records:
            done = None if self._writer.in_flight is None else self._writer.done
            first = self.feed.first_record(self.poll_timeout, done)
            if first is None:
                return []
            records = [first, *self.feed.fetched(self.batch_size - 1)]
        while (wait := batching.linger_left(len(records), self.batch_size, self._pace,
                                            self.linger, time.monotonic())) > 0:
            records.extend(self.feed.consume(self.batch_size - len(records), wait))
        return records

    def _write(self, batch: ConsumedBatch) -> Applied:
        """In the writer thread: apply the planned batch and its moves in one transaction."""
        started = time.perf_counter()
        completed = self.store.commit(batch.moves, batch.changes)
        self.time_split["write"] += time.perf_counter() - started
        return completed, batch.changes

    def _settle(self, *, rewind: bool) -> tuple[int, bool]:
        """Wait for the batch in flight and take its outcome: (records covered, committed). On
        a failure, with `rewind`, go back to the stored positions as batching.recover says."""
        flight = self._writer.take()
        if flight is None:
            return 0, True
        self._owned.ahead = {}
        waited = time.perf_counter()
        try:
            completed, changes = flight.outcome.result()
        except Exception as exc:
            failure = failure_of(exc)
            if failure is None:
                raise
            _report_failure(self._log, failure, exc)
            self.store.drop_if_broken()
            if rewind:
                self._recover(batching.recover(failure, retried_at_once=self._retried_at_once))
            return 0, False
        finally:
            self.time_split["wait"] += time.perf_counter() - waited
        self._retried_at_once = False
        batch = flight.batch
        self._owned.committed(batch.moves)
        self.feed.commit_lag_gauge({key: m.next_offset for key, m in batch.moves.items()})
        self.records_applied += batch.covered
        self.batches_committed += 1
        _report_committed(self._log, batch, completed, changes)
        return batch.covered, True

    def _recover(self, recovery: batching.Recovery) -> None:
        self._retried_at_once = recovery.retried_at_once
        targets = dict(self._owned.stored)
        if recovery.reload:
            stored = self.store.reload(list(targets), self._log)
            if stored is None:  # PostgreSQL failed again: back off as after any failure
                recovery = batching.recover(batching.Failure.DATABASE, retried_at_once=True)
            else:
                targets = self._owned.reloaded(stored)
        if not self.feed.seek(targets):
            self._resubscribe()  # rejoining makes the assignment load the stored positions
        if recovery.pause_seconds:
            self._stop.wait(recovery.pause_seconds)

    def drain(self, timeout: float = 60.0) -> int:
        """Poll until every assigned partition is projected up to its end (for tests and
        tools); TimeoutError if that takes longer than `timeout` seconds."""
        deadline = time.monotonic() + timeout
        total = 0
        while True:
            total += self.poll_once()
            if self.caught_up():
                return total
            if time.monotonic() > deadline:
                raise TimeoutError(f"projector not caught up after {timeout}s")

    def caught_up(self) -> bool:
        """Partitions assigned, no batch in flight, and each projected up to its end offset."""
        if self._writer.in_flight is not None or not batching.assignment_complete(
                self._owned.stored, self.feed.assigned()):
            return False
        offsets = self.feed.offsets()  # None: leadership settling, not known to be caught up
        return offsets is not None and batching.at_end(self._owned.stored, *offsets)

    def _on_assign(self, keys: list[PartitionKey]) -> Mapping[PartitionKey, int | None] | None:
        self._writer.wait()  # its transaction holds the connection the look-up needs
        stored = self.store.load_waiting(keys, self._stop, self._log)
        if stored is None:
            return None  # stopping while PostgreSQL is down: take nothing
        self._owned.assigned(keys, stored)
        self._log.info("partitions assigned", count=len(keys),
                       resumed={f"{t}[{p}]": o for (t, p), o in sorted(stored.items())})
        return stored

    def _on_revoke(self, keys: list[PartitionKey]) -> None:
        # The batch in flight finishes first, so the next owner loads positions including it.
        self._writer.wait()
        self._owned.revoked(keys)
        self._log.info("partitions revoked", count=len(keys))

    def _renew_if_stuck(self) -> None:
        # A member seen waiting for minutes after a broker SIGSTOP never got the group's next
        # assignment; a new consumer rejoins at once. Positions come from PostgreSQL.
        waited = self.feed.membership.waiting_for()
        if batching.should_renew(waited):
            self._log.error("no assignment from the group; re-creating the consumer",
                            waited_seconds=round(waited or 0))
            self._resubscribe()

    def _resubscribe(self) -> None:
        self._writer.wait()
        self._owned.clear()
        self.feed.renew()


def _collected(log: Any, records: list[Any], owned: OwnedPartitions) -> ConsumedBatch | None:
    """`collect`, with what it reports counted and logged; None for no records."""
    if not records:
        return None
    batch = collect(records, owned)
    for topic, count in batch.consumed.items():
        RECORDS_CONSUMED.labels(topic=topic).inc(count)
    for error in batch.consumer_errors:
        log.warning("consumer error", error=error)
    for skipped in batch.skipped:
        log.warning("undecodable record skipped", topic=skipped.key[0],
                    partition=skipped.key[1], offset=skipped.offset, reason=skipped.reason)
    return batch


def _report_failure(log: Any, failure: batching.Failure, exc: BaseException) -> None:
    # Rolled back (or, if COMMIT itself was lost, maybe not: then the compare-and-set of the
    # retry fails and the positions are reloaded, so nothing applies twice).
    if failure is batching.Failure.POSITIONS_MOVED:
        log.warning("positions moved by another instance; reloading", error=str(exc))
    else:
        log.error("batch failed; rewinding", error=str(exc), type=type(exc).__name__)


def _report_committed(log: Any, batch: ConsumedBatch, completed: list[tuple[str, str]],
                      changes: read_models.BatchChanges) -> None:
    if batch.oldest_ms is not None:
        PROJECTION_LAG_SECONDS.observe(max(0.0, time.time() - batch.oldest_ms / 1000))
    for dropped in changes.dropped:
        log.warning("event dropped", event_id=str(dropped.event_id), type=dropped.type,
                    reason=dropped.reason)
    for tenant_id, campaign_id in completed:
        log.info("campaign completed", tenant_id=tenant_id, campaign_id=campaign_id)
    log.debug("batch applied", records=batch.covered, skipped=len(batch.skipped),
              ignored=changes.ignored)


def projector_for(settings: Settings, *, group: str | None = None, schema: str | None = None,
                  topics: Sequence[TopicSpec] = PROJECTED_TOPICS,
                  positions_group: str | None = None, logger: Any = None,
                  **options: Any) -> Projector:
    """A `Projector` with its Kafka and PostgreSQL adapters built from `settings`.

    `group` (the Kafka consumer group) defaults to the live projector's, `schema` to the
    connection's own search_path (`projections.rebuild` projects into a fresh schema);
    `positions_group`: the name positions are stored under (default: `group`). `options` go
    to the Projector (batch_size, poll_timeout, linger)."""
    log = logger or structlog.get_logger().bind(component="projector")
    group = group or settings.group(POSITIONS_NAME)
    conninfo = settings.database_url if schema is None else make_conninfo(
        settings.database_url, options=f"-c search_path={schema}")
    connect = partial(psycopg.connect, conninfo, autocommit=True,
                      connect_timeout=DB_CONNECT_TIMEOUT_SECONDS,
                      application_name=f"{group}-projector"[:63])
    feed = RecordFeed(settings.kafka_bootstrap_servers, group,
                      [topic_name(spec, settings) for spec in topics], logger=log)
    try:
        return Projector(feed, ReadModelStore(connect, positions_group or group), logger=log,
                         **options)
    except BaseException:
        feed.close()
        raise


def lane_projectors(settings: Settings, *, lanes: Sequence[Lane] = LANES, logger: Any = None,
                    **options: Any) -> list[Projector]:
    """One `Projector` per lane, as the service runs them: each with its own Kafka consumer
    group and batch size, all storing positions under `POSITIONS_NAME`. `options` go to each
    (a `batch_size` there overrides every lane's)."""
    log = logger or structlog.get_logger().bind(component="projector")
    projectors: list[Projector] = []
    try:
        for lane in lanes:
            projectors.append(projector_for(
                settings, topics=lane.topics, group=settings.group(lane.group),
                positions_group=settings.group(POSITIONS_NAME), logger=log.bind(lane=lane.group),
                **{"batch_size": lane.batch_size, **options}))
    except BaseException:
        for projector in projectors:
            projector.close()
        raise
    return projectors
