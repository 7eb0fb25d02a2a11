"""Consumer positions of the projector, stored in PostgreSQL next to the read models.

Guarantee: a position moves only from the value its owner last loaded or wrote (compare-and-set
inside the batch's transaction). Of two instances that both believe they own a partition (one
not yet told of a rebalance), only one can commit a batch for it; the other's whole transaction
is rolled back by `PositionConflict`, so no batch is ever applied twice.

A position row is keyed by (name, topic, partition). The projector's lanes (one Kafka consumer
group each, disjoint topics) store theirs under one name, so they never touch each other's rows,
and an instance of any lane, or of a version without lanes, fences any other that claims the
same topic-partition.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg

from services.common.kafka import PartitionKey


@dataclass(frozen=True, slots=True)
class PositionMove:
    """Advance one partition from `expected` (None: never stored) to `next_offset`."""

    expected: int | None
    next_offset: int


class PositionConflict(RuntimeError):
    """Another instance moved these partitions since we loaded them: roll back and reload."""

    def __init__(self, partitions: Iterable[PartitionKey]) -> None:
        self.partitions = sorted(partitions)
        super().__init__(f"positions moved by another instance: {self.partitions}")


_LOAD = """
SELECT topic, partition, next_offset FROM projector_positions
WHERE consumer_group = %s AND (topic, partition) IN (SELECT * FROM unnest(%b::text[], %b::int[]))
"""

# Insert a first position (expected None), or update one whose stored value is still the
# expected one; the rows returned are the partitions that moved. A move that expects a stored
# value finds no row only when PostgreSQL lost it (a crash took back commits made with
# synchronous_commit off, rows and positions together): that is a conflict too, so the batches
# lost are read again from the stored (older) positions instead of being skipped. Taking these
# row locks first in the batch also makes a competing instance wait here, then see the new
# value and fail its comparison.
_ADVANCE = """
WITH move(topic, partition, expected, next_offset) AS (
    SELECT * FROM unnest(%b::text[], %b::int[], %b::bigint[], %b::bigint[])
)
INSERT INTO projector_positions AS p (consumer_group, topic, partition, next_offset)
SELECT %s, m.topic, m.partition, m.next_offset FROM move m
WHERE m.expected IS NULL OR EXISTS (
    SELECT 1 FROM projector_positions q
    WHERE q.consumer_group = %s AND q.topic = m.topic AND q.partition = m.partition)
ORDER BY m.topic, m.partition
ON CONFLICT (consumer_group, topic, partition) DO UPDATE
SET next_offset = EXCLUDED.next_offset, updated_at = now()
WHERE p.next_offset = (SELECT m.expected FROM move m
                       WHERE m.topic = p.topic AND m.partition = p.partition)
RETURNING p.topic, p.partition
"""


def load_positions(
    conn: psycopg.Connection[Any], group: str, partitions: Iterable[PartitionKey]
) -> dict[PartitionKey, int]:
    """Stored next offsets of the given partitions; partitions never stored are absent."""
    keys = list(partitions)
    if not keys:
        return {}
    rows = conn.execute(_LOAD, (group, [t for t, _ in keys], [p for _, p in keys])).fetchall()
    return {(topic, partition): offset for topic, partition, offset in rows}


def advance_positions(
    conn: psycopg.Connection[Any], group: str, moves: Mapping[PartitionKey, PositionMove]
) -> None:
    """Compare-and-set every move inside the caller's transaction, or raise PositionConflict."""
    if not moves:
        return
    keys = sorted(moves)
    rows = conn.execute(
        _ADVANCE,
        (
            [t for t, _ in keys],
            [p for _, p in keys],
            [moves[k].expected for k in keys],
            [moves[k].next_offset for k in keys],
            group,
            group,
        ),
    ).fetchall()
    moved = {(topic, partition) for topic, partition in rows}
    if len(moved) != len(keys):
        raise PositionConflict(set(keys) - moved)
