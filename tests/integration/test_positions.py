"""The projector's stored positions against the real database: every move is a compare-and-set,
a missing row included (what a crash leaves when it takes back commits made with
synchronous_commit off)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from projections.positions import PositionConflict, PositionMove, advance_positions, load_positions

pytestmark = pytest.mark.integration

TOPIC = "campaign.deliveries"


@pytest.fixture
def db(platform_settings: Any) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(platform_settings.database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def group() -> str:
    return f"positions-{uuid.uuid4().hex[:8]}"


def advance(db: psycopg.Connection[Any], group: str, **moves: tuple[int | None, int]) -> None:
    """Advance partitions named p<N> in one transaction."""
    with db.transaction():
        advance_positions(db, group, {(TOPIC, int(name[1:])): PositionMove(*move)
                                      for name, move in moves.items()})


def stored(db: psycopg.Connection[Any], group: str) -> dict[int, int]:
    return {p: o for (_, p), o in load_positions(db, group, [(TOPIC, p) for p in range(4)]).items()}


def test_first_moves_insert_and_later_moves_update(db, group) -> None:
    advance(db, group, p0=(None, 10), p1=(None, 4))
    advance(db, group, p0=(10, 25))
    assert stored(db, group) == {0: 25, 1: 4}


def test_a_stale_expected_offset_conflicts_and_moves_nothing(db, group) -> None:
    advance(db, group, p0=(None, 10), p1=(None, 4))
    with pytest.raises(PositionConflict) as caught:
        advance(db, group, p0=(10, 20), p1=(3, 8))
    assert caught.value.partitions == [(TOPIC, 1)]
    assert stored(db, group) == {0: 10, 1: 4}  # the whole transaction rolled back


def test_a_lost_row_conflicts_instead_of_skipping_what_was_lost(db, group) -> None:
    # The holder believes partition 2 was stored at 100; the database lost that commit.
    with pytest.raises(PositionConflict) as caught:
        advance(db, group, p2=(100, 300))
    assert caught.value.partitions == [(TOPIC, 2)]
    assert stored(db, group) == {}


def test_a_first_move_over_a_stored_row_conflicts(db, group) -> None:
    advance(db, group, p3=(None, 7))
    with pytest.raises(PositionConflict):
        advance(db, group, p3=(None, 9))
    assert stored(db, group) == {3: 7}
