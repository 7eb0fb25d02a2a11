"""run_lanes runs every lane with the short GIL switch interval, and restores the process's own
afterwards (the projector's writer threads wait less for the GIL after each round trip)."""

from __future__ import annotations

import sys
import threading

from projections.lanes import GIL_SWITCH_INTERVAL_SECONDS, run_lanes


class IntervalRecordingLane:
    """Stands in for a Projector: records the switch interval it runs under, then returns."""

    def __init__(self, group: str) -> None:
        self.group = group
        self.seen: list[float] = []

    def run(self, stop: threading.Event) -> None:
        self.seen.append(sys.getswitchinterval())


def test_lanes_run_with_the_short_switch_interval_and_the_old_one_returns() -> None:
    before = sys.getswitchinterval()
    assert before > GIL_SWITCH_INTERVAL_SECONDS  # CPython's default, 5 ms
    lanes = [IntervalRecordingLane("a"), IntervalRecordingLane("b")]
    run_lanes(lanes, threading.Event())  # type: ignore[arg-type]
    assert [lane.seen for lane in lanes] == [[GIL_SWITCH_INTERVAL_SECONDS]] * 2
    assert sys.getswitchinterval() == before
