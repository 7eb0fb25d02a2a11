"""The sender's send pipeline: ledger claims, SMTP attempts, settlements, delivery events and
offset commits of consecutive batches, overlapped so the SMTP connections never wait for the
database, the broker or the consumer.

A batch of recipients is cut into chunks. A chunk is claimed in the send ledger, then its
recipients that must be mailed go to the SMTP threads as jobs of up to `group` recipients each
(`SendSteps.mail_many`: one thread wake-up and one pooled session per group),
the chunk's mails spread evenly over `spread` jobs at least, so every thread has work (no
barrier per chunk: a thread that finishes one job takes the next, whichever chunk it belongs
to; with `group` 1, each recipient is its own job, `SendSteps.mail`); the
chunk counts its mails still out, and the driving thread is woken when its oldest chunk's
count reaches zero (no Future per mail). While
one chunk is mailed the next one is claimed and queued behind it, so the threads always have
work; chunks are reaped in order (settled in the ledger, their delivery events produced) as
their last mail returns. When every chunk of a batch is reaped, its offsets join the commit
frontier, which commits only the contiguous prefix of finished batches, after a flush.

Guarantees (each one holds per recipient, whatever overlaps):
- A recipient's ledger claim commits before its SMTP transaction starts, and its outcome is
  settled after the transaction returned and before its delivery event is produced.
- An offset is committed only once the outcome of every record up to it (in its partition)
  has been produced and the producer has been flushed: a crash redelivers, never skips.
- At most `lookahead` chunks are claimed and unsettled at any time: a crash leaves at most
  that many recipients whose outcome is unknown (each counted as a possible duplicate).
- Two copies of one recipient are never in flight together: a chunk holding a recipient whose
  other copy is still in flight is claimed only after that copy is settled (it then reads the
  settled outcome instead of counting a possible duplicate).
- Memory is bounded by the batches queued (the caller adds one only when `wants_records`),
  not by the size of the campaign.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from services.common.kafka import PartitionKey
from services.sender.delivery import Outcome
from services.sender.ledger import Claim, LedgerKey


class Recipient(Protocol):
    """What the pipeline needs of a work item: the ledger key it claims, and its attempt."""

    @property
    def key(self) -> LedgerKey: ...

    @property
    def attempt(self) -> int: ...


Item = TypeVar("Item", bound=Recipient)
ItemIn = TypeVar("ItemIn", bound=Recipient, contravariant=True)


class SendSteps(Protocol[ItemIn]):
    """The sender's side of the pipeline (steps.py). Every method but `mail` runs on the
    thread that drives the pipeline; `mail` runs on an SMTP thread."""

    def claim(self, items: Sequence[ItemIn]) -> Mapping[LedgerKey, Claim]: ...

    def mail(self, item: ItemIn, started: float) -> Outcome: ...

    def mail_many(self, items: Sequence[ItemIn], started: float) -> list[Outcome]: ...

    def settle(self, outcomes: Mapping[LedgerKey, Outcome]) -> None: ...

    def publish(self, item: ItemIn, claim: Claim, fresh: Outcome | None) -> None: ...

    def commit(self, positions: Mapping[PartitionKey, int]) -> None: ...

    def batch_done(self, report: BatchReport) -> None: ...


@dataclass(frozen=True)
class BatchReport:
    records: int
    recipients: int
    mailed: int
    seconds: float


class CommitFrontier:
    """Offsets safe to commit: batches finish in any order, offsets are released only for the
    contiguous prefix of finished batches (in the order they were added). Pure."""

    def __init__(self) -> None:
        self._order: deque[int] = deque()
        self._positions: dict[int, dict[PartitionKey, int]] = {}
        self._finished: set[int] = set()
        self._next = 0

    def add(self, positions: Mapping[PartitionKey, int]) -> int:
        """Register a batch's next offsets per partition; returns its number."""
        number = self._next
        self._next += 1
        self._order.append(number)
        self._positions[number] = dict(positions)
        return number

    def finish(self, number: int) -> None:
        if number not in self._positions:
            raise KeyError(f"unknown or already released batch {number}")
        self._finished.add(number)

    def release(self) -> dict[PartitionKey, int]:
        """Next offsets to commit now (merged over the released prefix), {} when none."""
        merged: dict[PartitionKey, int] = {}
        while self._order and self._order[0] in self._finished:
            number = self._order.popleft()
            self._finished.discard(number)
            for where, offset in self._positions.pop(number).items():
                merged[where] = max(merged.get(where, offset), offset)
        return merged

    @property
    def open(self) -> int:
        """Batches added and not yet released."""
        return len(self._order)


def latest_attempts(items: Sequence[Item]) -> list[Item]:
    """One item per recipient: the copy with the latest attempt (earlier copies are stale),
    in the order of first appearance."""
    chosen: dict[LedgerKey, Item] = {}
    for item in items:
        if item.key not in chosen or item.attempt > chosen[item.key].attempt:
            chosen[item.key] = item
    return list(chosen.values())


@dataclass
class _Batch(Generic[Item]):
    number: int
    started: float
    records: int
    recipients: int
    unclaimed: deque[list[Item]]
    open_chunks: int = 0
    mailed: int = 0


class MailThreads(Protocol):
    """Where mails run: `MailLanes` (services/sender/mail_lanes.py) or any Executor (its
    `submit` fits)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> object: ...


@dataclass
class _Chunk(Generic[Item]):
    batch: _Batch[Item]
    items: list[Item]
    claims: Mapping[LedgerKey, Claim]
    # Mails handed to the SMTP threads and not returned yet (changed under the pipeline's
    # condition); their outcomes, or what a mail raised, keyed by recipient.
    out: int = 0
    outcomes: dict[LedgerKey, Outcome] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)


class SendPipeline(Generic[Item]):
    """Drives batches through claim -> mail -> settle -> publish -> commit; see the module
    docstring. Not thread-safe: one thread calls `add`, `step` and `drain`."""

    def __init__(self, steps: SendSteps[Item], threads: MailThreads, *,
                 chunk_size: int, lookahead: int, group: int = 1, spread: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if chunk_size < 1 or lookahead < 1 or group < 1 or spread < 1:
            raise ValueError("chunk_size, lookahead, group and spread must be at least 1")
        self._group = group
        self._spread = spread
        self._steps = steps
        self._threads = threads
        # Guards every chunk's `out` count; notified when a chunk's last mail returns.
        self._returned = threading.Condition()
        self._chunk_size = chunk_size
        self._lookahead = lookahead
        self._clock = clock
        self._frontier = CommitFrontier()
        self._batches: deque[_Batch[Item]] = deque()  # with unclaimed chunks, oldest first
        self._in_flight: deque[_Chunk[Item]] = deque()  # claimed, not reaped, oldest first
        self._flying: dict[LedgerKey, int] = {}  # recipient -> copies in claimed chunks
        self._unclaimed_items = 0

    def add(self, items: Sequence[Item], positions: Mapping[PartitionKey, int], records: int,
            started: float | None = None) -> None:
        """Queue a batch: `items` in the order they should be mailed (one per recipient is
        kept), `positions` the next offsets to commit once all of it is published."""
        chosen = latest_attempts(items)
        chunks = deque(chosen[i:i + self._chunk_size]
                       for i in range(0, len(chosen), self._chunk_size))
        number = self._frontier.add(positions)
        batch = _Batch(number, self._clock() if started is None else started, records,
                       len(chosen), chunks)
        if not chunks:
            self._finish(batch)
        else:
            self._batches.append(batch)
            self._unclaimed_items += len(chosen)
        self._feed()

    @property
    def busy(self) -> bool:
        """Work is queued or in flight."""
        return bool(self._batches or self._in_flight)

    def wants_records(self, batch_size: int) -> bool:
        """True when fewer than `batch_size` recipients wait to be claimed: the caller should
        fetch another batch now, so it is ready before the threads run dry."""
        return self._unclaimed_items < batch_size

    def step(self, *, block: bool) -> None:
        """Claim what the lookahead allows, reap finished chunks in order (with `block`, wait
        for the oldest one first), commit what became safe."""
        self._feed()
        if block and self._in_flight:
            oldest = self._in_flight[0]
            with self._returned:
                self._returned.wait_for(lambda: oldest.out == 0)
        while self._in_flight and self._in_flight[0].out == 0:
            self._reap(self._in_flight.popleft())
            self._feed()
        self._commit()

    def drain(self) -> None:
        """Finish everything queued: mailed, settled, published, committed."""
        while self.busy:
            self.step(block=True)
        self._commit()

    # --- internals ---------------------------------------------------------------------

    def _feed(self) -> None:
        while self._batches and len(self._in_flight) < self._lookahead:
            batch = self._batches[0]
            chunk = batch.unclaimed[0]
            if any(item.key in self._flying for item in chunk):
                return  # another copy is in flight: claim after it is settled
            batch.unclaimed.popleft()
            if not batch.unclaimed:
                self._batches.popleft()
            self._unclaimed_items -= len(chunk)
            claims = self._steps.claim(chunk)
            flight = _Chunk(batch, chunk, claims)
            mails = [item for item in chunk if claims[item.key].must_send]
            flight.out = len(mails)  # before the first mail can return
            for item in chunk:
                self._flying[item.key] = self._flying.get(item.key, 0) + 1
            batch.open_chunks += 1
            self._in_flight.append(flight)
            if self._group == 1:
                for item in mails:
                    self._threads.submit(self._mail, flight, item)
                continue
            size = max(1, min(self._group, -(-len(mails) // self._spread)))
            for first in range(0, len(mails), size):
                self._threads.submit(self._mail_many, flight, mails[first:first + size])

    def _mail(self, chunk: _Chunk[Item], item: Item) -> None:
        """Runs on an SMTP thread: one mail, its outcome (or what it raised) kept for the
        driving thread."""
        try:
            chunk.outcomes[item.key] = self._steps.mail(item, chunk.batch.started)
        except BaseException as exc:  # raised again on the driving thread, in _reap
            chunk.errors.append(exc)
        finally:
            with self._returned:
                chunk.out -= 1
                if chunk.out == 0:
                    self._returned.notify_all()

    def _mail_many(self, chunk: _Chunk[Item], items: list[Item]) -> None:
        """Runs on an SMTP thread: a group of mails, as `_mail` does one."""
        try:
            outcomes = self._steps.mail_many(items, chunk.batch.started)
            for item, outcome in zip(items, outcomes, strict=True):
                chunk.outcomes[item.key] = outcome
        except BaseException as exc:  # raised again on the driving thread, in _reap
            chunk.errors.append(exc)
        finally:
            with self._returned:
                chunk.out -= len(items)
                if chunk.out == 0:
                    self._returned.notify_all()

    def _reap(self, chunk: _Chunk[Item]) -> None:
        if chunk.errors:
            raise chunk.errors[0]
        # In the chunk's order, as the mails were handed out.
        outcomes = {item.key: chunk.outcomes[item.key] for item in chunk.items
                    if item.key in chunk.outcomes}
        self._steps.settle(outcomes)
        for item in chunk.items:
            self._steps.publish(item, chunk.claims[item.key], outcomes.get(item.key))
            left = self._flying[item.key] - 1
            if left:
                self._flying[item.key] = left
            else:
                del self._flying[item.key]
        batch = chunk.batch
        batch.mailed += len(outcomes)
        batch.open_chunks -= 1
        if batch.open_chunks == 0 and not batch.unclaimed:
            self._finish(batch)

    def _finish(self, batch: _Batch[Item]) -> None:
        self._frontier.finish(batch.number)
        self._steps.batch_done(BatchReport(batch.records, batch.recipients, batch.mailed,
                                           self._clock() - batch.started))

    def _commit(self) -> None:
        positions = self._frontier.release()
        if positions:
            self._steps.commit(positions)
