"""The sender's SMTP threads (MailLanes) and the send pipeline running on them: jobs in order,
at most one per thread, queued jobs dropped on a cancelling shutdown, a mail's exception
raised on the driving thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pytest

from services.sender.delivery import Outcome, Status
from services.sender.ledger import Claim, ClaimState, LedgerKey
from services.sender.mail_lanes import MailLanes
from services.sender.pipeline import BatchReport, PartitionKey, SendPipeline

P0: PartitionKey = ("campaign.recipients", 0)


def test_jobs_start_in_order_on_one_thread() -> None:
    lanes = MailLanes(1, name="test-lane")
    seen: list[tuple[int, str]] = []
    for n in range(50):
        lanes.submit(lambda n: seen.append((n, threading.current_thread().name)), n)
    lanes.shutdown(cancel=False)
    assert seen == [(n, "test-lane_0") for n in range(50)]


def test_no_more_jobs_run_at_once_than_threads() -> None:
    lanes = MailLanes(3)
    lock = threading.Lock()
    running, peak = [0], [0]

    def job() -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.002)
        with lock:
            running[0] -= 1

    for _ in range(30):
        lanes.submit(job)
    lanes.shutdown(cancel=False)
    assert 1 <= peak[0] <= 3


def test_cancelling_shutdown_drops_queued_jobs_and_waits_for_running_ones() -> None:
    lanes = MailLanes(1)
    started, release = threading.Event(), threading.Event()
    finished: list[int] = []

    def blocking() -> None:
        started.set()
        release.wait(5)
        finished.append(0)

    lanes.submit(blocking)
    for n in range(1, 10):
        lanes.submit(finished.append, n)
    assert started.wait(5)
    stopper = threading.Thread(target=lanes.shutdown, kwargs={"cancel": True})
    stopper.start()
    time.sleep(0.05)  # shutdown has dropped the queue and waits for the running job
    release.set()
    stopper.join(5)
    assert not stopper.is_alive()
    assert finished == [0]  # the running mail completed; none of the queued ones started
    with pytest.raises(RuntimeError):
        lanes.submit(finished.append, 99)


def test_a_job_that_raises_does_not_stop_its_thread() -> None:
    lanes = MailLanes(1)
    done: list[int] = []

    def broken() -> None:
        raise ValueError("bug")

    lanes.submit(broken)
    lanes.submit(done.append, 1)
    lanes.shutdown(cancel=False)
    assert done == [1]


def test_one_thread_refused() -> None:
    with pytest.raises(ValueError):
        MailLanes(0)


@dataclass(frozen=True)
class Item:
    contact: str
    attempt: int = 1

    @property
    def key(self) -> LedgerKey:
        return ("cmp", self.contact)


class Steps:
    def __init__(self, broken: str | None = None) -> None:
        self.broken = broken
        self.settled: list[list[LedgerKey]] = []
        self.published: list[LedgerKey] = []
        self.committed: list[dict[PartitionKey, int]] = []

    def claim(self, items: Sequence[Item]) -> Mapping[LedgerKey, Claim]:
        return {i.key: Claim(ClaimState.FRESH) for i in items}

    def mail(self, item: Item, started: float) -> Outcome:
        if item.contact == self.broken:
            raise ConnectionError("relay exploded")
        time.sleep(0.001 * (hash(item.contact) % 3))  # finish out of order
        return Outcome(Status.SENT, item.attempt, 250, "ok")

    def mail_many(self, items: Sequence[Item], started: float) -> list[Outcome]:
        return [self.mail(item, started) for item in items]

    def settle(self, outcomes: Mapping[LedgerKey, Outcome]) -> None:
        self.settled.append(list(outcomes))

    def publish(self, item: Item, claim: Claim, fresh: Outcome | None) -> None:
        assert fresh is not None and fresh.status is Status.SENT
        self.published.append(item.key)

    def commit(self, positions: Mapping[PartitionKey, int]) -> None:
        self.committed.append(dict(positions))

    def batch_done(self, report: BatchReport) -> None:
        pass


def test_the_pipeline_on_mail_lanes_settles_each_chunk_in_its_own_order() -> None:
    steps = Steps()
    lanes = MailLanes(4)
    try:
        pipeline = SendPipeline(steps, lanes, chunk_size=5, lookahead=2)
        work = [Item(f"c{n}") for n in range(23)]
        pipeline.add(work, {P0: 23}, records=23)
        pipeline.drain()
    finally:
        lanes.shutdown()
    assert [key for chunk in steps.settled for key in chunk] == [i.key for i in work]
    assert steps.published == [i.key for i in work]
    assert steps.committed == [{P0: 23}]


def test_a_mail_that_raises_fails_the_pipeline_before_any_commit() -> None:
    steps = Steps(broken="c7")
    lanes = MailLanes(2)
    try:
        pipeline = SendPipeline(steps, lanes, chunk_size=5, lookahead=2)
        pipeline.add([Item(f"c{n}") for n in range(10)], {P0: 10}, records=10)
        with pytest.raises(ConnectionError, match="relay exploded"):
            pipeline.drain()
    finally:
        lanes.shutdown()
    assert steps.committed == []
    assert ("cmp", "c7") not in steps.published
