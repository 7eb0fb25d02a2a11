"""The projector's writer thread: applies one batch in PostgreSQL while the driving thread
consumes, decodes and plans the next.

Guarantee: at most one batch in flight; the next one is handed over only after the previous
one's outcome was taken, so transactions commit in offset order.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass

from projections.consumed import ConsumedBatch
from projections.read_models import BatchChanges

# What a committed batch returns: the campaigns it completed, and its row changes.
Applied = tuple[list[tuple[str, str]], BatchChanges]


@dataclass
class InFlight:
    """The batch the writer thread is applying, and the outcome to come."""

    batch: ConsumedBatch
    outcome: Future[Applied]


class WriterThread:
    """One thread (named `<name>_0`) that applies the batch handed to it."""

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.in_flight: InFlight | None = None

    def hand_over(self, batch: ConsumedBatch, write: Callable[[ConsumedBatch], Applied]) -> None:
        assert self.in_flight is None, "the previous batch's outcome was not taken"
        self.in_flight = InFlight(batch, self._executor.submit(write, batch))

    def done(self) -> bool:
        """True when no batch is in flight or the one in flight has finished."""
        return self.in_flight is None or self.in_flight.outcome.done()

    def wait(self) -> None:
        """Block until the batch in flight (if any) has finished; its outcome stays to take."""
        if self.in_flight is not None:
            wait_for([self.in_flight.outcome])

    def take(self) -> InFlight | None:
        """The batch in flight with its (finished or coming) outcome; none is in flight after."""
        flight, self.in_flight = self.in_flight, None
        return flight

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
