"""projections.batching: the projector's batching and retry rules on plain values."""

from __future__ import annotations

import pytest

from projections.batching import (
    CONSUME_CHUNK,
    DB_RETRY_BACKOFF_SECONDS,
    IN_FLIGHT_POLL_SECONDS,
    LANE_SILENT_SECONDS,
    STUCK_MEMBER_SECONDS,
    Failure,
    Pace,
    Recovery,
    assignment_complete,
    at_end,
    in_flight_poll,
    lanes_alive,
    linger_left,
    next_chunk,
    recover,
    should_renew,
    stop_waiting_for_first,
)

LIVE = Pace(handed_over_at=10.0, last_full=False)


def test_a_backlog_is_never_held_up() -> None:
    assert linger_left(3, 100, Pace(handed_over_at=10.0, last_full=True), 0.1, now=10.0) == 0
    assert linger_left(100, 100, LIVE, 0.1, now=10.0) == 0  # full: goes at once


def test_live_traffic_lingers_until_linger_after_the_last_hand_over() -> None:
    assert linger_left(3, 100, LIVE, 0.1, now=10.04) == pytest.approx(0.06)
    assert linger_left(3, 100, LIVE, 0.1, now=10.1) == 0
    assert linger_left(3, 100, LIVE, 0.1, now=11.0) == 0  # a pause: the first record goes


def test_the_first_batch_goes_at_once() -> None:
    assert linger_left(1, 100, Pace(), 0.1, now=0.0) == 0


def test_fetched_records_are_asked_for_a_chunk_at_a_time() -> None:
    assert next_chunk(0, 3 * CONSUME_CHUNK) == CONSUME_CHUNK
    assert next_chunk(CONSUME_CHUNK, CONSUME_CHUNK + 7) == 7
    assert next_chunk(10, 10) == 0


def test_waiting_for_a_first_record_while_a_batch_is_in_flight() -> None:
    assert in_flight_poll(1.0) == IN_FLIGHT_POLL_SECONDS
    assert in_flight_poll(0.001) == 0.001
    assert in_flight_poll(-1.0) == 0.0
    assert stop_waiting_for_first(True, False, 1.0)
    assert stop_waiting_for_first(False, True, 1.0)  # the batch is done: take its outcome
    assert stop_waiting_for_first(False, False, IN_FLIGHT_POLL_SECONDS)
    assert not stop_waiting_for_first(False, False, 1.0)


def test_moved_positions_are_reloaded_without_a_pause() -> None:
    assert recover(Failure.POSITIONS_MOVED, retried_at_once=False) == Recovery(
        reload=True, pause_seconds=0.0, retried_at_once=False)
    assert recover(Failure.POSITIONS_MOVED, retried_at_once=True).retried_at_once


def test_a_row_conflict_is_retried_at_once_once() -> None:
    first = recover(Failure.ROW_CONFLICT, retried_at_once=False)
    assert first == Recovery(reload=False, pause_seconds=0.0, retried_at_once=True)
    second = recover(Failure.ROW_CONFLICT, retried_at_once=first.retried_at_once)
    assert second == Recovery(reload=False, pause_seconds=DB_RETRY_BACKOFF_SECONDS,
                              retried_at_once=False)


def test_other_database_failures_back_off() -> None:
    for retried in (False, True):
        assert recover(Failure.DATABASE, retried_at_once=retried) == Recovery(
            reload=False, pause_seconds=DB_RETRY_BACKOFF_SECONDS, retried_at_once=False)


def test_only_a_member_waiting_too_long_is_renewed() -> None:
    assert not should_renew(None)  # joined
    assert not should_renew(STUCK_MEMBER_SECONDS)
    assert should_renew(STUCK_MEMBER_SECONDS + 0.1)


A, B = ("t", 0), ("t", 1)


def test_caught_up_needs_every_partition_assigned_and_loaded() -> None:
    assert not assignment_complete({}, [])
    assert not assignment_complete({A: 3}, [A, B])  # B's position not loaded yet
    assert assignment_complete({A: 3, B: None}, [A, B])


def test_at_end_by_stored_position_or_past_a_transaction_marker() -> None:
    assert at_end({A: 5, B: None}, {A: 5, B: -1}, {A: 5, B: 0})
    assert not at_end({A: 4}, {A: 4}, {A: 5})
    # The marker after the last record is never delivered: the consumer's position shows it.
    assert at_end({A: 4}, {A: 5}, {A: 5})


def test_the_process_beats_only_while_every_lane_comes_round() -> None:
    assert lanes_alive(100.0, [99.0, 95.0])
    assert not lanes_alive(100.0, [99.0, 100.0 - LANE_SILENT_SECONDS])
