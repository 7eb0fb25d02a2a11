"""The send pipeline's ordering rules, with fake steps (no ledger, no SMTP, no broker): the
commit frontier, claim-before-mail, settle-before-publish, commit-after-publish, the
lookahead bound and copies of one recipient never in flight together."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from services.sender.delivery import Outcome, Status
from services.sender.ledger import Claim, ClaimState, LedgerKey
from services.sender.pipeline import (
    BatchReport,
    CommitFrontier,
    PartitionKey,
    SendPipeline,
    latest_attempts,
)

P0: PartitionKey = ("campaign.recipients", 0)
P1: PartitionKey = ("campaign.recipients", 1)


# --- commit frontier ---------------------------------------------------------------------


def test_frontier_releases_nothing_until_the_first_batch_finishes() -> None:
    frontier = CommitFrontier()
    first = frontier.add({P0: 10})
    second = frontier.add({P0: 20})
    frontier.finish(second)
    assert frontier.release() == {}
    frontier.finish(first)
    assert frontier.release() == {P0: 20}
    assert frontier.open == 0


def test_frontier_releases_only_the_contiguous_prefix() -> None:
    frontier = CommitFrontier()
    a = frontier.add({P0: 5})
    b = frontier.add({P1: 7})
    c = frontier.add({P0: 9, P1: 8})
    frontier.finish(a)
    frontier.finish(c)
    assert frontier.release() == {P0: 5}
    assert frontier.release() == {}
    frontier.finish(b)
    assert frontier.release() == {P0: 9, P1: 8}


def test_frontier_takes_the_highest_offset_per_partition() -> None:
    frontier = CommitFrontier()
    a = frontier.add({P0: 30, P1: 3})
    b = frontier.add({P0: 12})  # a partition rewound by a seek: never commit backwards
    frontier.finish(a)
    frontier.finish(b)
    assert frontier.release() == {P0: 30, P1: 3}


def test_frontier_refuses_an_unknown_batch() -> None:
    frontier = CommitFrontier()
    number = frontier.add({P0: 1})
    frontier.finish(number)
    frontier.release()
    with pytest.raises(KeyError):
        frontier.finish(number)


# --- the pipeline, with fake steps ---------------------------------------------------------


@dataclass(frozen=True)
class Item:
    contact: str
    attempt: int = 1

    @property
    def key(self) -> LedgerKey:
        return ("cmp", self.contact)


class FakeSteps:
    """Records every step in order; mail blocks until released when `gate` is set."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.events: list[tuple[str, object]] = []
        self.lock = threading.Lock()
        self.gate = gate
        self.claimed: set[LedgerKey] = set()
        self.unsettled: set[LedgerKey] = set()
        self.max_unsettled = 0
        self.settled: dict[LedgerKey, Outcome] = {}
        self.committed: list[Mapping[PartitionKey, int]] = []
        self.published: list[LedgerKey] = []
        self.reports: list[BatchReport] = []
        self.in_flight_twice = False

    def _note(self, event: str, value: object) -> None:
        with self.lock:
            self.events.append((event, value))

    def claim(self, items: Sequence[Item]) -> Mapping[LedgerKey, Claim]:
        claims = {}
        for item in items:
            if item.key in self.unsettled:
                self.in_flight_twice = True
            state = ClaimState.SETTLED if item.key in self.settled else ClaimState.FRESH
            claims[item.key] = Claim(state, self.settled.get(item.key))
            if state is ClaimState.FRESH:
                self.unsettled.add(item.key)
            self._note("claim", item.key)
        self.max_unsettled = max(self.max_unsettled, len(self.unsettled))
        return claims

    def mail(self, item: Item, started: float) -> Outcome:
        if self.gate is not None:
            assert self.gate.wait(10)
        with self.lock:
            assert item.key in self.unsettled, "mailed before its claim"
        self._note("mail", item.key)
        return Outcome(Status.SENT, item.attempt, 250, "ok")

    def mail_many(self, items: Sequence[Item], started: float) -> list[Outcome]:
        self._note("group", len(items))
        return [self.mail(item, started) for item in items]

    def settle(self, outcomes: Mapping[LedgerKey, Outcome]) -> None:
        for key, outcome in outcomes.items():
            assert ("mail", key) in self.events, "settled before its mail returned"
            self.settled[key] = outcome
            self.unsettled.discard(key)
            self._note("settle", key)

    def publish(self, item: Item, claim: Claim, fresh: Outcome | None) -> None:
        if fresh is not None:
            assert item.key in self.settled, "published before settled"
        self.published.append(item.key)
        self._note("publish", item.key)

    def commit(self, positions: Mapping[PartitionKey, int]) -> None:
        self.committed.append(dict(positions))
        self._note("commit", dict(positions))

    def batch_done(self, report: BatchReport) -> None:
        self.reports.append(report)


def items(start: int, count: int) -> list[Item]:
    return [Item(f"c{i}") for i in range(start, start + count)]


def run(steps: FakeSteps, batches: list[tuple[list[Item], dict[PartitionKey, int]]], *,
        chunk: int = 3, lookahead: int = 2, group: int = 1, spread: int = 1) -> None:
    with ThreadPoolExecutor(4) as executor:
        pipeline = SendPipeline(steps, executor, chunk_size=chunk, lookahead=lookahead,
                                group=group, spread=spread)
        for work, positions in batches:
            pipeline.add(work, positions, records=len(work))
            pipeline.step(block=False)
        pipeline.drain()
        assert not pipeline.busy


def test_every_recipient_is_claimed_mailed_settled_and_published_once() -> None:
    steps = FakeSteps()
    run(steps, [(items(0, 10), {P0: 10}), (items(10, 7), {P0: 17})])
    keys = [("cmp", f"c{i}") for i in range(17)]
    assert sorted(steps.published) == sorted(keys)
    assert [k for e, k in steps.events if e == "mail"] and set(steps.settled) == set(keys)
    assert steps.committed[-1] == {P0: 17}
    assert [r.recipients for r in steps.reports] == [10, 7]


def test_commit_comes_after_every_publish_of_its_batches() -> None:
    steps = FakeSteps()
    run(steps, [(items(0, 8), {P0: 8}), (items(8, 8), {P1: 8})])
    for index, (event, value) in enumerate(steps.events):
        if event != "commit":
            continue
        published = {k for e, k in steps.events[:index] if e == "publish"}
        assert isinstance(value, dict)
        if P0 in value:
            assert {("cmp", f"c{i}") for i in range(8)} <= published
        if P1 in value:
            assert {("cmp", f"c{i}") for i in range(16)} <= published


def test_lookahead_bounds_the_claims_left_unsettled() -> None:
    gate = threading.Event()
    steps = FakeSteps(gate)
    with ThreadPoolExecutor(4) as executor:
        pipeline = SendPipeline(steps, executor, chunk_size=3, lookahead=2)
        pipeline.add(items(0, 12), {P0: 12}, records=12)
        pipeline.step(block=False)
        # Nothing can be mailed yet: only two chunks may be claimed ahead.
        assert len(steps.unsettled) == 6
        assert not pipeline.wants_records(6) and pipeline.wants_records(7)  # 6 wait
        gate.set()
        pipeline.drain()
    assert steps.max_unsettled <= 6
    assert steps.committed == [{P0: 12}]


def test_a_batch_without_recipients_still_waits_for_the_batches_before_it() -> None:
    gate = threading.Event()
    steps = FakeSteps(gate)
    with ThreadPoolExecutor(2) as executor:
        pipeline = SendPipeline(steps, executor, chunk_size=3, lookahead=2)
        pipeline.add(items(0, 3), {P0: 3}, records=3)
        pipeline.add([], {P0: 5}, records=0)  # e.g. two invalid records, dead-lettered
        pipeline.step(block=False)
        assert steps.committed == []  # the empty batch must not commit past the first one
        gate.set()
        pipeline.drain()
    assert steps.committed == [{P0: 5}]


def test_a_second_copy_waits_until_the_first_is_settled() -> None:
    steps = FakeSteps()
    run(steps, [(items(0, 3), {P0: 3}), ([Item("c1"), Item("c9")], {P0: 5})], chunk=3,
        lookahead=2)
    assert not steps.in_flight_twice
    # The copy read the settled outcome instead of being mailed again.
    assert [k for e, k in steps.events if e == "mail"].count(("cmp", "c1")) == 1
    assert steps.published.count(("cmp", "c1")) == 2


def test_latest_attempt_wins_within_a_batch() -> None:
    chosen = latest_attempts([Item("a", 1), Item("b", 1), Item("a", 3), Item("a", 2)])
    assert chosen == [Item("a", 3), Item("b", 1)]


def test_a_failed_step_raises_and_commits_nothing() -> None:
    class Broken(FakeSteps):
        def settle(self, outcomes: Mapping[LedgerKey, Outcome]) -> None:
            raise RuntimeError("database gone")

    steps = Broken()
    with pytest.raises(RuntimeError, match="database gone"), ThreadPoolExecutor(2) as executor:
        pipeline = SendPipeline(steps, executor, chunk_size=3, lookahead=2)
        pipeline.add(items(0, 6), {P0: 6}, records=6)
        pipeline.drain()
    assert steps.committed == [] and steps.published == []


# --- groups of mails per job ---------------------------------------------------------------


@pytest.mark.parametrize(("chunk", "group", "spread", "sizes"), [
    (10, 4, 2, [4, 4, 2]),  # capped by the group
    (10, 16, 4, [3, 3, 3, 1]),  # spread over four jobs at least
    (3, 16, 8, [1, 1, 1]),  # fewer mails than threads: one each
])
def test_a_chunk_goes_out_in_groups_and_every_recipient_once(
        chunk: int, group: int, spread: int, sizes: list[int]) -> None:
    steps = FakeSteps()
    run(steps, [(items(0, chunk), {P0: chunk})], chunk=chunk, group=group, spread=spread)
    assert sorted(v for e, v in steps.events if e == "group") == sorted(sizes)  # type: ignore[type-var]
    keys = [("cmp", f"c{i}") for i in range(chunk)]
    assert sorted(k for e, k in steps.events if e == "mail") == sorted(keys)  # type: ignore[type-var]
    assert sorted(steps.published) == sorted(keys)
    assert steps.committed == [{P0: chunk}]


def test_without_groups_each_recipient_is_its_own_job() -> None:
    steps = FakeSteps()
    run(steps, [(items(0, 6), {P0: 6})], chunk=6)
    assert [e for e, _ in steps.events if e == "group"] == []
    assert len([e for e, _ in steps.events if e == "mail"]) == 6


def test_a_group_that_raises_fails_the_batch_and_commits_nothing() -> None:
    class Broken(FakeSteps):
        def mail_many(self, items: Sequence[Item], started: float) -> list[Outcome]:
            raise RuntimeError("bug in a group")

    steps = Broken()
    with pytest.raises(RuntimeError, match="bug in a group"), ThreadPoolExecutor(2) as executor:
        pipeline = SendPipeline(steps, executor, chunk_size=6, lookahead=2, group=3, spread=2)
        pipeline.add(items(0, 6), {P0: 6}, records=6)
        pipeline.drain()
    assert steps.committed == [] and steps.published == []
