"""A projecting process (`projecting_process`, entered by run_lanes) runs with the short GIL
switch interval and relaxed garbage collection (start-up objects frozen, rare young
collections), and hands the process back with its own settings afterwards."""

from __future__ import annotations

import gc
import sys
import threading

from projections.lanes import GIL_SWITCH_INTERVAL_SECONDS, projecting_process, run_lanes
from services.common.gc_tuning import GC_THRESHOLDS


def _settings() -> tuple[float, tuple[int, int, int], int]:
    return sys.getswitchinterval(), gc.get_threshold(), gc.get_freeze_count()


class SettingsRecordingLane:
    """Stands in for a Projector: records the process settings it runs under, then returns."""

    def __init__(self, group: str) -> None:
        self.group = group
        self.seen: list[tuple[float, tuple[int, int, int], int]] = []

    def run(self, stop: threading.Event) -> None:
        self.seen.append(_settings())


def test_inside_the_projection_settings_hold_and_the_old_ones_return() -> None:
    before = _settings()
    assert before[1] != GC_THRESHOLDS and before[2] == 0  # CPython's defaults, nothing frozen
    with projecting_process():
        interval, thresholds, frozen = _settings()
        assert interval == GIL_SWITCH_INTERVAL_SECONDS
        assert thresholds == GC_THRESHOLDS
        assert frozen > 0  # what existed on entry: never scanned by a collection inside
    assert _settings() == before


def test_the_settings_return_even_when_the_body_fails() -> None:
    before = _settings()
    try:
        with projecting_process():
            raise RuntimeError("lane failed")
    except RuntimeError:
        pass
    assert _settings() == before


def test_lanes_run_inside_the_projection_settings() -> None:
    before = _settings()
    lanes = [SettingsRecordingLane("a"), SettingsRecordingLane("b")]
    run_lanes(lanes, threading.Event())  # type: ignore[arg-type]
    for lane in lanes:
        [(interval, thresholds, frozen)] = lane.seen
        assert (interval, thresholds) == (GIL_SWITCH_INTERVAL_SECONDS, GC_THRESHOLDS)
        assert frozen > 0
    assert _settings() == before
