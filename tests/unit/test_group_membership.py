"""Group membership as the rebalance callbacks report it: readiness and the stuck-member clock."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from services.common import membership
from services.common.membership import GroupMembership


@dataclass
class TP:
    topic: str
    partition: int


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def members(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[GroupMembership]]:
    monkeypatch.setattr(membership, "_REGISTERED", [])  # this process's, as if it were new
    made: list[GroupMembership] = []
    yield made


def test_a_member_waits_until_assigned_and_again_after_a_revoke() -> None:
    clock = Clock()
    member = GroupMembership("g", clock)
    clock.now += 5
    assert member.waiting_for() == 5
    assert member.reason() == "g: no partition assignment from the group for 5 s"
    member.assigned([TP("t", 3), TP("t", 1)])
    assert member.joined and member.waiting_for() is None and member.reason() is None
    assert member.partitions() == ["t[1]", "t[3]"]
    clock.now += 50
    member.revoked()
    clock.now += 7
    assert member.partitions() == [] and member.waiting_for() == 7


def test_an_empty_assignment_is_joined() -> None:
    member = GroupMembership("g")
    member.assigned([])  # more members than partitions: healthy, nothing to do
    assert member.joined and member.reason() is None


def test_readiness_needs_every_registered_member_joined(members: list[GroupMembership]) -> None:
    assert membership.readiness_check() == "no consumer has joined its group yet"
    main, deliveries = membership.register("main"), membership.register("deliveries")
    members += [main, deliveries]
    main.assigned([TP("events", 0)])
    reason = membership.readiness_check()
    assert reason is not None and reason.startswith("deliveries: no partition assignment")
    deliveries.assigned([TP("deliveries", 2)])
    assert membership.readiness_check() is None
    assert membership.assignment() == ["deliveries[2]", "events[0]"]
    membership.unregister(deliveries)
    assert membership.readiness_check() is None and membership.assignment() == ["events[0]"]
