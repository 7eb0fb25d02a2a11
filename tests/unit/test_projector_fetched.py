"""record_feed.take_fetched: what is already fetched, taken CONSUME_CHUNK records per
consume()."""

from __future__ import annotations

from typing import Any

from projections.batching import CONSUME_CHUNK
from projections.record_feed import take_fetched


class QueuedConsumer:
    """Hands out a fixed queue of records, as consume(timeout=0) does with fetched ones."""

    def __init__(self, count: int) -> None:
        self.queue = list(range(count))
        self.calls: list[int] = []

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        assert timeout == 0
        self.calls.append(num_messages)
        taken, self.queue = self.queue[:num_messages], self.queue[num_messages:]
        return taken


def fetched(queued: int, count: int) -> tuple[list[Any], list[int]]:
    consumer = QueuedConsumer(queued)
    records = take_fetched(consumer.consume, count)
    return records, consumer.calls


def test_a_full_batch_comes_in_chunks_and_in_order() -> None:
    records, calls = fetched(3 * CONSUME_CHUNK + 7, 2 * CONSUME_CHUNK + 1)
    assert records == list(range(2 * CONSUME_CHUNK + 1))
    assert calls == [CONSUME_CHUNK, CONSUME_CHUNK, 1]


def test_it_stops_when_the_fetched_records_run_out() -> None:
    records, calls = fetched(CONSUME_CHUNK + 3, 10 * CONSUME_CHUNK)
    assert records == list(range(CONSUME_CHUNK + 3))
    assert calls == [CONSUME_CHUNK, CONSUME_CHUNK]


def test_nothing_fetched_is_one_empty_call() -> None:
    assert fetched(0, 10_000) == ([], [CONSUME_CHUNK])
