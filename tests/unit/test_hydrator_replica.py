"""Where a contacts replica stands after a batch (services.hydrator.replica.next_position):
past its records and at least at the end the broker reported, never back."""

from __future__ import annotations

from services.hydrator.replica import next_position


def test_records_move_the_replica_past_the_last_one():
    assert next_position(10, [10, 11, 12], None) == 13


def test_the_reported_end_moves_it_past_a_commit_marker_that_is_never_delivered():
    # Records 10..12 and the transaction's commit marker at 13: the end is 14.
    assert next_position(10, [10, 11, 12], 14) == 14


def test_the_reported_end_alone_moves_it_over_markers_and_aborted_records():
    assert next_position(10, [], 17) == 17


def test_nothing_delivered_and_no_end_reported_leaves_it_where_it_is():
    assert next_position(10, [], None) == 10


def test_it_never_moves_back():
    assert next_position(10, [], 8) == 10
    assert next_position(10, [3], None) == 10
