"""The projector's side of PostgreSQL: its stored positions and the read models, through one
connection (re-opened after it broke).

Guarantee: a batch's row changes and its position moves commit in one transaction or not at
all; a position moves only by compare-and-set from the value the projector expects
(projections.positions), so a stale owner's batch rolls back whole. Failures reach the caller
as driver errors; `failure_of` names them in the projector's words.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import psycopg

from projections.batch_writer import BatchWriter
from projections.batching import DB_RETRY_BACKOFF_SECONDS, Failure
from projections.positions import (
    PartitionKey,
    PositionConflict,
    PositionMove,
    advance_positions,
    load_positions,
)
from projections.read_models import BatchChanges

# Failures that only mean another transaction got to the same rows first (a deadlock victim; a
# recipient row another instance inserted meanwhile): that transaction has ended by the time
# we hear of it.
_ROW_CONFLICTS = (psycopg.errors.DeadlockDetected, psycopg.errors.UniqueViolation,
                  psycopg.errors.SerializationFailure)


def failure_of(exc: BaseException) -> Failure | None:
    """Why a batch failed, or None if `exc` is not a database failure (it propagates)."""
    if isinstance(exc, PositionConflict):
        return Failure.POSITIONS_MOVED
    if isinstance(exc, _ROW_CONFLICTS):
        return Failure.ROW_CONFLICT
    if isinstance(exc, psycopg.Error):
        return Failure.DATABASE
    return None


class ReadModelStore:
    """Positions stored under `positions_name` and the read models, on connections that
    `connect` opens (autocommit: every transaction here is an explicit block)."""

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]],
                 positions_name: str) -> None:
        self._connect = connect
        self.positions_name = positions_name
        self._conn: psycopg.Connection[Any] | None = None
        self._writer: BatchWriter | None = None

    def load(self, keys: Iterable[PartitionKey]) -> dict[PartitionKey, int]:
        """Stored next offsets of `keys`; partitions never stored are absent."""
        return load_positions(self._open_writer().conn, self.positions_name, keys)

    def reload(self, keys: Iterable[PartitionKey], log: Any) -> dict[PartitionKey, int] | None:
        """`load`, or None (logged) if PostgreSQL fails."""
        try:
            return self.load(keys)
        except psycopg.Error as exc:
            log.error("cannot reload positions", error=str(exc))
            self.drop_if_broken()
            return None

    def load_waiting(self, keys: Iterable[PartitionKey], stop: threading.Event,
                     log: Any) -> dict[PartitionKey, int] | None:
        """`load`, retried every DB_RETRY_BACKOFF_SECONDS while PostgreSQL fails; None once
        `stop` is set. An assignment waits for this: without the stored positions it would
        project from the wrong offsets (the group evicts a member past max.poll.interval.ms,
        which hands its partitions to a healthier one)."""
        keys = list(keys)
        while True:
            try:
                return self.load(keys)
            except psycopg.Error as exc:
                log.error("cannot load positions; retrying", error=str(exc))
                self.drop_if_broken()
                if stop.wait(DB_RETRY_BACKOFF_SECONDS):
                    return None

    def commit(self, moves: Mapping[PartitionKey, PositionMove],
               changes: BatchChanges) -> list[tuple[str, str]]:
        """Apply `changes` and the position `moves` in one transaction; the campaigns it
        completed. Raises PositionConflict if another instance moved a position."""
        writer = self._open_writer()
        with writer.conn.transaction():
            # Positions first: the compare-and-set fences a stale owner before any work, and
            # its row locks make a competing instance wait and then fail its comparison.
            advance_positions(writer.conn, self.positions_name, moves)
            return writer.apply(changes)

    def drop_if_broken(self) -> None:
        """Forget a broken or closed connection: the next call opens a new one."""
        if self._conn is not None and (self._conn.broken or self._conn.closed):
            self._conn.close()
            self._conn = self._writer = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def _open_writer(self) -> BatchWriter:
        if self._writer is None or self._conn is None or self._conn.closed:
            conn = self._conn = self._connect()
            # For this session (set once, not per transaction: a round trip less per batch):
            # commits do not wait for their WAL flush. Exactly-once still holds: positions
            # commit atomically with the rows, so a crash that loses the last commits loses
            # their positions with them, and those batches are read again and applied once.
            conn.execute("SET synchronous_commit = off")
            self._writer = BatchWriter(conn)
            self._writer.prepare_session()
        return self._writer
