"""One consume() worth of records, sorted into what this instance projects (pure: records in,
a batch out; the caller logs and counts what it reports).

Guarantee: a record is kept only if its partition is assigned to this instance and it lies at
or after where the next batch starts (records fetched before a seek are already applied); each
partition's position move runs from that start to just past its last record, undecodable ones
included (they are skipped, but their offsets advance).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaException

from projections import read_models
from projections.facts import RecipientFact
from projections.positions import PositionMove
from projections.recipient_records import decode_record
from schemas.base import Record
from schemas.envelope import Message, SchemaViolation
from services.common.kafka import PartitionKey, is_fatal


class OwnedPartitions:
    """The partitions assigned to this instance, with the stored next offset it expects of
    each (None: never stored), and where the next batch starts while one is in flight."""

    def __init__(self) -> None:
        self.stored: dict[PartitionKey, int | None] = {}
        self.ahead: dict[PartitionKey, int] = {}  # next offsets of the batch in flight

    def assigned(self, keys: Iterable[PartitionKey], stored: Mapping[PartitionKey, int]) -> None:
        self.stored.update({key: stored.get(key) for key in keys})

    def revoked(self, keys: Iterable[PartitionKey]) -> None:
        for key in keys:
            self.stored.pop(key, None)
            self.ahead.pop(key, None)

    def clear(self) -> None:
        self.stored.clear()
        self.ahead.clear()

    def handed_over(self, moves: Mapping[PartitionKey, PositionMove]) -> None:
        self.ahead = {key: move.next_offset for key, move in moves.items()}

    def committed(self, moves: Mapping[PartitionKey, PositionMove]) -> None:
        for key, move in moves.items():
            if key in self.stored:  # else revoked meanwhile: the new owner goes on
                self.stored[key] = move.next_offset

    def reloaded(self, stored: Mapping[PartitionKey, int]) -> dict[PartitionKey, int | None]:
        """Take the stored positions as the truth; returns them, per owned partition."""
        self.stored.update({key: stored.get(key) for key in self.stored})
        return dict(self.stored)


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A record skipped because it does not decode."""

    key: PartitionKey
    offset: int
    reason: str


@dataclass
class ConsumedBatch:
    """Records of one consume() that belong to this instance, decoded, with their moves and
    (once planned) their row changes."""

    messages: list[Message[Record] | RecipientFact] = field(default_factory=list)
    moves: dict[PartitionKey, PositionMove] = field(default_factory=dict)
    skipped: list[Undecodable] = field(default_factory=list)
    changes: read_models.BatchChanges = field(default_factory=read_models.BatchChanges)
    # Milliseconds since the epoch of the oldest record (the first of each partition's run):
    # the projection lag metric at commit.
    oldest_ms: int | None = None
    consumed: dict[str, int] = field(default_factory=dict)  # records per topic, all counted
    consumer_errors: list[str] = field(default_factory=list)  # non-fatal client errors

    @property
    def covered(self) -> int:
        """Records this batch moves the positions past."""
        return len(self.messages) + len(self.skipped)


def collect(records: list[Any], owned: OwnedPartitions) -> ConsumedBatch:
    """The batch of `records` for the `owned` partitions, each starting where the batch in
    flight ends or else at its stored position. Raises KafkaException on a fatal client
    error."""
    positions, ahead = owned.stored, owned.ahead
    batch = ConsumedBatch()
    ends: dict[PartitionKey, int] = {}  # next offset after this batch, per partition
    append = batch.messages.append
    consumed = batch.consumed
    # Records come in runs of one partition: its key and expected offset are looked up once
    # per run.
    run_topic, run_partition = None, -1
    key: PartitionKey = ("", -1)
    mine, expected = False, None
    run_start = 0
    oldest: int | None = None
    for index, record in enumerate(records):
        error = record.error()
        if error is not None:
            if is_fatal(error):
                raise KafkaException(error)
            batch.consumer_errors.append(str(error))
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
            mine = key in positions
            expected = ahead.get(key, positions[key]) if mine else None
        if not mine:
            continue
        offset = record.offset()
        if expected is not None and offset < expected:
            continue  # fetched before a seek: already applied
        ends[key] = offset + 1
        try:
            append(decode_record(record.value()))
        except SchemaViolation as exc:
            batch.skipped.append(Undecodable(key, offset, str(exc)))
    if run_topic is not None:
        consumed[run_topic] = consumed.get(run_topic, 0) + len(records) - run_start
    batch.oldest_ms = oldest
    batch.moves = {key: PositionMove(ahead.get(key, positions[key]), end)
                   for key, end in ends.items()}
    return batch
