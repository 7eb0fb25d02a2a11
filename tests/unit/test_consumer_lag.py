"""The lag arithmetic of `campaignctl ops lag` (services/cli/consumer_lag.py), plain values."""

from __future__ import annotations

from services.cli.consumer_lag import NO_COMMIT, Snapshot, format_drain, lag_rows


def snap(at: float, committed: dict[tuple[str, str, int], int], ends: dict[tuple[str, int], int]) -> Snapshot:
    return Snapshot(at, committed, ends)


def test_lag_rate_and_time_to_drain() -> None:
    before = snap(0.0, {("sender", "recipients", 0): 100}, {("recipients", 0): 1000})
    after = snap(2.0, {("sender", "recipients", 0): 300}, {("recipients", 0): 1100})
    [row] = lag_rows(before, after)
    assert (row.committed, row.log_end, row.lag) == (300, 1100, 800)
    assert row.rate_per_second == 100.0
    assert row.seconds_to_drain == 8.0


def test_a_caught_up_partition_drains_in_zero() -> None:
    same = {("projector", "deliveries", 3): 50}
    [row] = lag_rows(snap(0, same, {("deliveries", 3): 50}), snap(1, same, {("deliveries", 3): 50}))
    assert (row.lag, row.rate_per_second, row.seconds_to_drain) == (0, 0.0, 0.0)


def test_a_backlog_that_does_not_move_has_no_drain_time() -> None:
    same = {("sender", "recipients", 1): 10}
    [row] = lag_rows(snap(0, same, {("recipients", 1): 90}), snap(1, same, {("recipients", 1): 90}))
    assert (row.lag, row.seconds_to_drain) == (80, None)
    assert format_drain(row.seconds_to_drain) == "not moving"


def test_a_partition_never_committed_counts_its_whole_log() -> None:
    first = {("sender", "recipients", 2): NO_COMMIT}
    [row] = lag_rows(snap(0, first, {}), snap(1, first, {("recipients", 2): 40}))
    assert (row.committed, row.lag, row.rate_per_second) == (None, 40, 0.0)


def test_a_partition_first_committed_between_snapshots_has_no_rate_yet() -> None:
    before = snap(0, {("g", "t", 0): NO_COMMIT}, {("t", 0): 40})
    after = snap(1, {("g", "t", 0): 30}, {("t", 0): 40})
    [row] = lag_rows(before, after)
    assert (row.lag, row.rate_per_second, row.seconds_to_drain) == (10, 0.0, None)


def test_rows_are_sorted_by_group_topic_partition() -> None:
    committed = {("b", "t", 1): 0, ("a", "t", 2): 0, ("a", "t", 0): 0}
    rows = lag_rows(snap(0, committed, {}), snap(1, committed, {}))
    assert [(r.group, r.partition) for r in rows] == [("a", 0), ("a", 2), ("b", 1)]


def test_drain_is_shown_in_seconds_then_minutes() -> None:
    assert format_drain(42.4) == "42 s"
    assert format_drain(150.0) == "2.5 min"
