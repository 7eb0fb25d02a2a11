"""The engagement projector: campaign.engagement (opens, clicks), the bounces and complaints
on campaign.deliveries and the unsubscribes from a campaign's mail on contacts.events, into
engagement_events (migrations 0009, 0011).

Its own Kafka consumer group and its own stored positions (projector_positions under
`ENGAGEMENT_POSITIONS_NAME`), with the main projector's exactly-once scheme and helpers:
where a partition starts comes from PostgreSQL (projections.positions), each batch's rows and
its position moves commit in one transaction (compare-and-set: an instance that lost a
partition to a rebalance has its whole batch rolled back by PositionConflict, then reloads the
positions and seeks there). A crash, a restart or a rebalance therefore never counts a record
twice; on top of that every row is keyed by its event (projections.engagement_sql), so even a
replay of the same hit under another offset adds nothing. In the same transaction the
clicks of a recipient who followed every link of a mail at once are marked machine
(projections.engagement_sql.mark_click_bursts), and the personal data of contacts deleted
meanwhile is erased from its rows (projections.erase). The main projector ignores these
event types; EmailSent, the other deliveries records and every other contact event are read
here and skipped.

A PostgreSQL outage is waited out: the batch in flight is dropped (nothing was committed),
the connection is re-opened with a back-off, and reading resumes from the stored positions.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

import psycopg
import structlog
from psycopg.conninfo import make_conninfo

from projections.consumed import OwnedPartitions, collect
from projections.engagement_sql import (
    deleted_contacts,
    engagement_rows,
    insert_rows,
    mark_click_bursts,
)
from projections.erase import erase_engagement, forget_engagement
from projections.positions import PositionConflict, advance_positions, load_positions
from projections.record_feed import RecordFeed
from services.common.kafka import PartitionKey
from services.common.settings import Settings
from services.common.topics import CONTACTS, DELIVERIES, ENGAGEMENT, TopicSpec, topic_name

ENGAGEMENT_TOPICS: tuple[TopicSpec, ...] = (ENGAGEMENT, DELIVERIES, CONTACTS)
# The Kafka consumer group and the name positions are stored under (under the topic prefix).
ENGAGEMENT_GROUP = "projector-engagement"
ENGAGEMENT_POSITIONS_NAME = "engagement"
BATCH_MAX_RECORDS = 2000
POLL_TIMEOUT_SECONDS = 0.2
# Bounded waits for PostgreSQL: a connection attempt, and the pause between attempts.
CONNECT_TIMEOUT_SECONDS = 5
RECONNECT_PAUSE_SECONDS = 1.0


class EngagementProjector:
    """Drives one RecordFeed over ENGAGEMENT_TOPICS. Not thread-safe: one thread runs it."""

    def __init__(self, feed: RecordFeed, database_url: str, positions_group: str, *,
                 batch_size: int = BATCH_MAX_RECORDS, logger: Any = None) -> None:
        self.feed = feed
        self.group = feed.group
        self.positions_group = positions_group
        self.database_url = database_url
        self.batch_size = batch_size
        self.looped_at = time.monotonic()
        self.rows_written = 0
        self._owned = OwnedPartitions()
        self._started = False
        self._conn: psycopg.Connection[Any] | None = None
        self._log = logger or structlog.get_logger().bind(component="engagement-projector")

    # --- PostgreSQL ---------------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.database_url, autocommit=True,
                                         connect_timeout=CONNECT_TIMEOUT_SECONDS)
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    # --- rebalance hooks (called from inside consume, on the driving thread) -----------------

    def _on_assign(self, keys: list[PartitionKey]) -> Mapping[PartitionKey, int | None] | None:
        while True:
            try:
                stored = load_positions(self._connection(), self.positions_group, keys)
                break
            except psycopg.OperationalError as exc:
                self._log.warning("positions unavailable, waiting", error=str(exc))
                self._drop_connection()
                time.sleep(RECONNECT_PAUSE_SECONDS)
        self._owned.assigned(keys, stored)
        return {key: stored.get(key) for key in keys}

    def _on_revoke(self, keys: list[PartitionKey]) -> None:
        self._owned.revoked(keys)

    # --- the loop -------------------------------------------------------------------------------

    @property
    def owned_partitions(self) -> int:
        """How many partitions this instance is assigned now (0 until the group assigns)."""
        return len(self._owned.stored)

    def start(self) -> None:
        self._started = True
        self.feed.subscribe(self._on_assign, self._on_revoke)

    def step(self, timeout: float = POLL_TIMEOUT_SECONDS) -> int:
        """Consume and apply one batch; returns the records its positions moved past."""
        records = self._consume(timeout)
        if not records:
            return 0
        batch = collect(records, self._owned)
        for skipped in batch.skipped:
            self._log.warning("undecodable record skipped", topic=skipped.key[0],
                              partition=skipped.key[1], offset=skipped.offset,
                              reason=skipped.reason)
        if not batch.moves:
            return 0
        rows = engagement_rows(batch.messages)
        try:
            conn = self._connection()
            with conn.transaction():
                advance_positions(conn, self.positions_group, batch.moves)
                self.rows_written += insert_rows(conn, rows)
                mark_click_bursts(conn, rows)
                with conn.cursor() as cur:
                    erase_engagement(cur, deleted_contacts(batch.messages))
                    forget_engagement(cur, [(row.tenant_id, row.event_id) for row in rows])
        except PositionConflict as exc:
            self._log.info("positions moved elsewhere, reloading", partitions=exc.partitions)
            self._reload()
            return 0
        except psycopg.OperationalError as exc:
            # Nothing of this batch committed: wait for PostgreSQL, then read it again.
            self._log.warning("database unavailable, batch dropped", error=str(exc))
            self._drop_connection()
            time.sleep(RECONNECT_PAUSE_SECONDS)
            self._reload()
            return 0
        self._owned.committed(batch.moves)
        self.feed.commit_lag_gauge({key: move.next_offset for key, move in batch.moves.items()})
        return batch.covered

    def _consume(self, timeout: float) -> list[Any]:
        # What is fetched at once, else the first record and what came with it: a batch
        # never waits for more records than are there (consume(n, t) would wait the whole
        # `t` for n of them, a floor under every hit's lag on a quiet topic).
        records = self.feed.fetched(self.batch_size)
        if records:
            return records
        first = self.feed.first_record(timeout, None)
        if first is None:
            return []
        return [first, *self.feed.fetched(self.batch_size - 1)]

    def _reload(self) -> None:
        try:
            stored = load_positions(self._connection(), self.positions_group,
                                    list(self._owned.stored))
        except psycopg.OperationalError as exc:
            self._log.warning("positions unavailable", error=str(exc))
            self._drop_connection()
            # Nothing known: seek to where this instance last committed, which is stored
            # or older; a stale one fails the compare-and-set and is reloaded again.
            self.feed.seek(dict(self._owned.stored))
            return
        self.feed.seek(self._owned.reloaded(stored))

    def drain(self, timeout: float) -> int:
        """Project until every assigned partition's stored position is its end offset (the
        backlog at the time of each look); returns the records moved past. Raises
        TimeoutError if that takes longer than `timeout` seconds."""
        if not self._started:
            self.start()
        deadline = time.monotonic() + timeout
        moved = 0
        while time.monotonic() < deadline:
            moved += self.step()
            if not self._owned.stored or self._owned.ahead:
                continue
            looked = self.feed.offsets()
            if looked is None:
                continue
            _, ends = looked
            if all((self._owned.stored.get(key) or 0) >= end for key, end in ends.items()):
                return moved
        raise TimeoutError(f"engagement projector not caught up within {timeout}s")

    def run(self, stop_event: threading.Event) -> None:
        """Project until `stop_event` is set, then leave the group (started unless it was)."""
        if not self._started:
            self.start()
        try:
            while not stop_event.is_set():
                self.looped_at = time.monotonic()
                self.step()
        finally:
            self.close()

    def close(self) -> None:
        self.feed.close()
        self._drop_connection()


def engagement_projector_for(settings: Settings, *, group: str | None = None,
                             positions_group: str | None = None, schema: str | None = None,
                             logger: Any = None, **options: Any) -> EngagementProjector:
    """The engagement projector with its feed built from `settings`: the live one, or with
    another Kafka `group`, `positions_group` and `schema` (its search_path), the one
    `projections.rebuild` replays into a fresh schema."""
    log = logger or structlog.get_logger().bind(component="engagement-projector")
    feed = RecordFeed(settings.kafka_bootstrap_servers, group or settings.group(ENGAGEMENT_GROUP),
                      [topic_name(t, settings) for t in ENGAGEMENT_TOPICS], logger=log)
    conninfo = settings.database_url if schema is None else make_conninfo(
        settings.database_url, options=f"-c search_path={schema}")
    return EngagementProjector(
        feed, conninfo, positions_group or settings.group(ENGAGEMENT_POSITIONS_NAME),
        logger=log, **options)
