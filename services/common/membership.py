"""Consumer group membership as each consumer's rebalance callbacks report it: what /readyz
shows as the assignment, and what tells a member that lost its partitions and never got an
answer from the group again (a consumer to re-create).

A member is *joined* once the group handed it an assignment (possibly empty: more members
than partitions) and until its partitions are revoked or lost; between the two a rebalance is
in progress. A healthy group ends a rebalance within about a session timeout, so a member
that stays between the two much longer is stuck.

Guarantee: thread-safe (callbacks run on the consumer's thread, probes on the server's);
`readiness_check` passes only while every membership registered in this process is joined,
and fails before the first assignment.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any


class GroupMembership:
    """One consumer's place in its group: updated from on_assign / on_revoke / on_lost."""

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._partitions: tuple[str, ...] = ()
        self._joined = False
        self._since = clock()  # when the current state (joined or waiting) began

    def assigned(self, partitions: Iterable[Any]) -> None:
        """The group's answer: these partitions (topic-partition objects), maybe none."""
        names = tuple(sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions))
        with self._lock:
            self._partitions = names
            self._joined = True
            self._since = self._clock()

    def revoked(self) -> None:
        """Partitions revoked or lost: waiting for the group's next assignment."""
        with self._lock:
            self._partitions = ()
            self._joined = False
            self._since = self._clock()

    @property
    def joined(self) -> bool:
        with self._lock:
            return self._joined

    def partitions(self) -> list[str]:
        with self._lock:
            return list(self._partitions)

    def waiting_for(self) -> float | None:
        """Seconds since this member last left its assignment without getting a new one;
        None while joined."""
        with self._lock:
            return None if self._joined else self._clock() - self._since

    def reason(self) -> str | None:
        """None when joined, else why this member is not (for a readiness check)."""
        waited = self.waiting_for()
        if waited is None:
            return None
        return f"{self.name}: no partition assignment from the group for {waited:.0f} s"


_REGISTERED: list[GroupMembership] = []
_REGISTRY_LOCK = threading.Lock()


def register(name: str) -> GroupMembership:
    """A new membership called `name` (its group, or group and lane), counted by this
    process's readiness until `unregister`. A service registers one per consumer role and
    keeps it when it re-creates that consumer."""
    found = GroupMembership(name)
    with _REGISTRY_LOCK:
        _REGISTERED.append(found)
    return found


def unregister(member: GroupMembership) -> None:
    """The consumer is closed for good (its service stopped)."""
    with _REGISTRY_LOCK:
        if member in _REGISTERED:
            _REGISTERED.remove(member)


def registered() -> list[GroupMembership]:
    with _REGISTRY_LOCK:
        return list(_REGISTERED)


def readiness_check() -> str | None:
    """Passes while every consumer of this process is joined to its group; fails while none
    has registered yet (not started) or any waits for an assignment."""
    members = registered()
    if not members:
        return "no consumer has joined its group yet"
    reasons = [r for m in members if (r := m.reason()) is not None]
    return "; ".join(reasons) or None


def assignment() -> list[str]:
    """Every partition this process's consumers hold now, for /readyz and `ops status`."""
    return sorted(p for m in registered() for p in m.partitions())
