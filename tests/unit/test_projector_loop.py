"""The Projector's loop with a fake feed and a fake store (no broker, no database): what it
does with each decision of projections.batching."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from projections.batching import DB_RETRY_BACKOFF_SECONDS
from projections.positions import PositionConflict, PositionMove
from projections.projector import Projector
from projections.read_models import BatchChanges
from projections.record_feed import AssignHook, RevokeHook
from schemas.envelope import encode, wrap
from schemas.events import EmailSent
from services.common.kafka import PartitionKey
from services.common.membership import GroupMembership
from tests.recording_stop import RecordingStop

TOPIC = "campaign.deliveries"
KEY: PartitionKey = (TOPIC, 0)
T0 = datetime(2030, 5, 1, tzinfo=UTC)


class FakeRecord:
    def __init__(self, offset: int, value: bytes) -> None:
        self._offset, self._value = offset, value

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def timestamp(self) -> tuple[int, int]:
        return 1, 1_000

    def value(self) -> bytes:
        return self._value


def sent(contact: str) -> bytes:
    return encode(wrap(EmailSent(campaign_id="c-1", contact_id=contact,
                                 email=f"{contact}@example.com", message_id=f"<{contact}@mx>",
                                 attempt=1), tenant_id="t-1", aggregate_id="c-1",
                       occurred_at=T0))


class FakeFeed:
    """One partition of `records`; the group assigns it on the first fetch."""

    def __init__(self, records: list[bytes]) -> None:
        self.group, self.topics = "fake", [TOPIC]
        self.membership = GroupMembership("fake")
        self.log = [FakeRecord(i, value) for i, value in enumerate(records)]
        self.at = 0
        self.seeks: list[int | None] = []
        self.renewed = 0
        self._hooks: tuple[AssignHook, RevokeHook] | None = None
        self._assigned = False

    def subscribe(self, on_assign: AssignHook, on_revoke: RevokeHook) -> None:
        self._hooks, self._assigned = (on_assign, on_revoke), False

    def _take(self, count: int) -> list[Any]:
        if not self._assigned and self._hooks is not None:
            starts = self._hooks[0]([KEY])
            self._assigned = starts is not None
            self.at = (starts or {}).get(KEY) or 0
            self.membership.assigned([])
        taken = self.log[self.at:self.at + count]
        self.at += len(taken)
        return taken

    def fetched(self, count: int) -> list[Any]:
        return self._take(count)

    def consume(self, count: int, timeout: float) -> list[Any]:
        return self._take(count)

    def first_record(self, timeout: float, done: Callable[[], bool] | None) -> Any:
        taken = self._take(1)
        return taken[0] if taken else None

    def seek(self, targets: Mapping[PartitionKey, int | None]) -> bool:
        self.seeks.append(targets[KEY])
        self.at = targets[KEY] or 0
        return True

    def commit_lag_gauge(self, next_offsets: Mapping[PartitionKey, int]) -> None:
        pass

    def sample_lag(self) -> None:
        pass

    def assigned(self) -> list[PartitionKey]:
        return [KEY] if self._assigned else []

    def offsets(self) -> tuple[dict[PartitionKey, int], dict[PartitionKey, int]] | None:
        return {KEY: self.at}, {KEY: len(self.log)}

    def renew(self) -> None:
        self.renewed += 1
        self._assigned = False

    def close(self) -> None:
        pass


class FakeStore:
    """Positions compared and set as PostgreSQL would; `failures` raised by the next commits."""

    def __init__(self, failures: Iterable[Exception] = (),
                 moved_elsewhere: Mapping[PartitionKey, int] | None = None) -> None:
        self.positions: dict[PartitionKey, int] = {}
        self.failures = list(failures)
        self.recipients: list[str] = []
        # Committed by another instance just before this one's first commit.
        self.moved_elsewhere = dict(moved_elsewhere or {})

    def load_waiting(self, keys: Iterable[PartitionKey], stop: threading.Event,
                     log: Any) -> dict[PartitionKey, int] | None:
        return {key: self.positions[key] for key in keys if key in self.positions}

    def reload(self, keys: Iterable[PartitionKey], log: Any) -> dict[PartitionKey, int] | None:
        return self.load_waiting(keys, threading.Event(), log)

    def commit(self, moves: Mapping[PartitionKey, PositionMove],
               changes: BatchChanges) -> list[tuple[str, str]]:
        if self.failures:
            raise self.failures.pop(0)
        self.positions.update(self.moved_elsewhere)
        self.moved_elsewhere = {}
        for key, move in moves.items():
            if self.positions.get(key) != move.expected:
                raise PositionConflict([key])
        self.positions.update({key: move.next_offset for key, move in moves.items()})
        self.recipients += [contact for _, contact in changes.recipients]
        return []

    def drop_if_broken(self) -> None:
        pass

    def close(self) -> None:
        pass


def project(records: int, store: FakeStore, *, batch_size: int = 4
            ) -> tuple[Projector, FakeFeed, RecordingStop]:
    feed = FakeFeed([sent(f"k-{i:02d}") for i in range(records)])
    projector = Projector(feed, store, batch_size=batch_size, poll_timeout=0.0, linger=0.0)
    stop = RecordingStop()
    projector._stop = stop
    projector.drain(timeout=10)
    projector.close()
    return projector, feed, stop


def test_every_record_is_applied_once_and_its_position_stored() -> None:
    store = FakeStore()
    projector, feed, stop = project(10, store)
    assert store.recipients == [f"k-{i:02d}" for i in range(10)]
    assert store.positions == {KEY: 10}
    assert projector.records_applied == 10 and projector.batches_committed == 3
    assert feed.seeks == [] and stop.pauses == []


@pytest.mark.parametrize(("error", "pauses"), [
    (psycopg.errors.UniqueViolation("another transaction inserted it"), []),
    (psycopg.OperationalError("connection lost"), [DB_RETRY_BACKOFF_SECONDS]),
], ids=["row-conflict-at-once", "database-backs-off"])
def test_a_failed_batch_rewinds_to_the_stored_position(error: Exception, pauses: list[float]
                                                       ) -> None:
    store = FakeStore([error])
    projector, feed, stop = project(10, store)
    assert feed.seeks == [None]  # back to where nothing was stored: the batch is read again
    assert stop.pauses == pauses
    assert sorted(store.recipients) == [f"k-{i:02d}" for i in range(10)]  # each once
    assert store.positions == {KEY: 10}


def test_two_row_conflicts_in_a_row_back_off_the_second_time() -> None:
    conflict = psycopg.errors.DeadlockDetected("deadlock victim")
    store = FakeStore([conflict, conflict])
    _, _, stop = project(6, store)
    assert stop.pauses == [DB_RETRY_BACKOFF_SECONDS]
    assert store.positions == {KEY: 6}


def test_positions_moved_elsewhere_are_reloaded_and_projecting_resumes_there() -> None:
    store = FakeStore(moved_elsewhere={KEY: 4})  # another instance projected the first four
    _, feed, stop = project(8, store)
    assert feed.seeks == [4] and stop.pauses == []
    assert store.recipients == [f"k-{i:02d}" for i in range(4, 8)]
    assert store.positions == {KEY: 8}


def test_a_member_stuck_without_an_assignment_gets_a_new_consumer() -> None:
    now = [0.0]
    feed = FakeFeed([])
    feed.membership = GroupMembership("fake", clock=lambda: now[0])
    projector = Projector(feed, FakeStore(), poll_timeout=0.0)
    projector._renew_if_stuck()
    assert feed.renewed == 0  # waiting, but not long
    now[0] = 1_000.0
    projector._renew_if_stuck()
    assert feed.renewed == 1
    projector.close()
