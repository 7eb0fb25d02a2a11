"""`read_until`, the one replay loop, against a scripted reader (no broker): where a partition
ends, what is fed, and when it gives up."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import cast

import pytest
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, KafkaException, TopicPartition

from services.common.kafka import Stopping, read_to_end, read_until

T = "events"


class Record:
    """What a reader hands out: a record, or an event (error) such as the partition's end."""

    def __init__(self, partition: int, offset: int, *, code: int | None = None,
                 topic: str = T) -> None:
        self._partition, self._offset, self._topic = partition, offset, topic
        self._error = KafkaError(code) if code is not None else None

    def error(self) -> KafkaError | None:
        return self._error

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset


def eof(partition: int, offset: int) -> Record:
    return Record(partition, offset, code=KafkaError._PARTITION_EOF)


class ScriptedReader:
    """Each poll() takes the next fetch (None: nothing came); consume(n, 0) the rest of it."""

    def __init__(self, *fetches: list[Record] | None) -> None:
        self.fetches = list(fetches)
        self.buffered: list[Record] = []
        self.assigned: list[TopicPartition] | None = None
        self.unassigned = False
        self.polls = 0

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned = partitions

    def unassign(self) -> None:
        self.unassigned = True

    def poll(self, timeout: float) -> Record | None:
        self.polls += 1
        fetch = self.fetches.pop(0) if self.fetches else None
        if not fetch:
            return None
        self.buffered = fetch[1:]
        return fetch[0]

    def consume(self, num_messages: int, timeout: float) -> list[Record]:
        taken, self.buffered = self.buffered[:num_messages], self.buffered[num_messages:]
        return taken


def read(reader: ScriptedReader, ends: dict[tuple[str, int], int], *,
         starts: dict[tuple[str, int], int] | None = None, idle_timeout: float = 5.0,
         stop: threading.Event | None = None, on_progress: Callable[[], None] | None = None,
         ) -> tuple[dict[tuple[str, int], int], list[tuple[int, int]]]:
    """`read_until`'s positions, and the (partition, offset) of each record fed."""
    fed: list[tuple[int, int]] = []
    positions = read_until(cast(Consumer, reader), ends,
                           lambda msg: fed.append((msg.partition() or 0, msg.offset() or 0)),
                           starts=starts, idle_timeout=idle_timeout, stop=stop,
                           on_progress=on_progress)
    return positions, fed


def test_an_end_past_a_commit_marker_is_found_by_the_end_of_partition_event():
    # Records 0 and 1, the commit marker at 2 (never delivered), committed offset 3.
    reader = ScriptedReader([Record(0, 0), Record(0, 1), eof(0, 3)])
    positions, fed = read(reader, {(T, 0): 3})
    assert fed == [(0, 0), (0, 1)]
    assert positions == {(T, 0): 3}
    assert reader.assigned == [TopicPartition(T, 0, OFFSET_BEGINNING)]
    assert reader.unassigned


def test_records_at_or_past_the_end_are_not_fed():
    reader = ScriptedReader([Record(0, 0), Record(0, 2), Record(0, 3)], [Record(1, 0), Record(1, 1)])
    positions, fed = read(reader, {(T, 0): 2, (T, 1): 1})
    assert fed == [(0, 0), (1, 0)]  # partition 0's marker at 1; partition 1 done at its last
    assert positions == {(T, 0): 2, (T, 1): 1}


def test_to_the_partitions_end_the_broker_says_where_it_ends():
    reader = ScriptedReader([Record(0, 0), eof(0, 2), Record(1, 5)], [Record(0, 2), eof(1, 7)])
    positions, fed = read(reader, {(T, 0): OFFSET_END, (T, 1): OFFSET_END})
    assert fed == [(0, 0), (1, 5)]  # partition 0's later record came after its end
    assert positions == {(T, 0): 2, (T, 1): 7}


def test_nothing_to_read_assigns_nothing():
    reader = ScriptedReader()
    positions, fed = read(reader, {(T, 0): 0, (T, 1): 4}, starts={(T, 1): 4})
    assert (positions, fed, reader.assigned) == ({(T, 0): 0, (T, 1): 4}, [], None)


def test_read_to_end_starts_where_it_is_told_and_returns_the_next_offset():
    reader = ScriptedReader([Record(0, 4), eof(0, 6)])
    seen: list[int] = []
    assert read_to_end(cast(Consumer, reader), T, 0, 4, lambda msg: seen.append(msg.offset() or 0)) == 6
    assert seen == [4]
    assert reader.assigned == [TopicPartition(T, 0, 4)]


def test_a_silent_broker_times_out_and_unassigns():
    reader = ScriptedReader([Record(0, 0)])
    with pytest.raises(KafkaException) as raised:
        read(reader, {(T, 0): OFFSET_END}, idle_timeout=0.0)
    assert raised.value.args[0].code() == KafkaError._TIMED_OUT
    assert reader.unassigned


def test_an_error_the_reader_reports_is_raised():
    reader = ScriptedReader([Record(0, 0, code=KafkaError._TRANSPORT)])
    with pytest.raises(KafkaException) as raised:
        read(reader, {(T, 0): OFFSET_END})
    assert raised.value.args[0].code() == KafkaError._TRANSPORT


def test_a_stop_request_ends_the_read_at_once():
    stop = threading.Event()
    stop.set()
    reader = ScriptedReader([Record(0, 0)])
    with pytest.raises(Stopping):
        read(reader, {(T, 0): OFFSET_END}, stop=stop)
    assert reader.polls == 0 and reader.unassigned


def test_progress_is_reported_for_every_poll_that_brought_something():
    beats: list[int] = []
    reader = ScriptedReader([Record(0, 0), Record(0, 1)], None, [eof(0, 2)])
    read(reader, {(T, 0): OFFSET_END}, on_progress=lambda: beats.append(reader.polls))
    assert beats == [1, 3]
