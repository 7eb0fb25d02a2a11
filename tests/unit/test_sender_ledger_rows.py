"""The send ledger's row-level claim (`claim_row`, with its shortcut for rows just inserted)
gives exactly `judge_claim`'s verdict and write-back for every row the lock query can read;
and the statements' jsonb rows are arrays in the order the SQL reads them."""

from __future__ import annotations

import itertools
import json
from typing import Any

from services.sender.ledger import ClaimState, _row, _rows, claim_row, judge_claim

STATUSES = ("claimed", "sent", "failed")


def lock_rows() -> list[tuple[Any, ...]]:
    """Rows as _LOCK returns them: (campaign, contact, status, claims, attempts, ambiguous,
    settled_at IS NULL, smtp_code, smtp_reply, reason, permanent), over every combination
    of the fields judge_claim looks at."""
    rows = []
    for status, claims, attempts, ambiguous, unsettled in itertools.product(
            STATUSES, (0, 1, 2), (0, 1, 2, 3), (0, 2), (True, False)):
        sent = status == "sent"
        rows.append(("cmp", "c1", status, claims, attempts, ambiguous, unsettled,
                     250 if sent else 451, "2.0.0 ok" if sent else None,
                     None if sent else "4.2.0 later", status == "failed"))
    return rows


def test_claim_row_agrees_with_judge_claim_on_every_row() -> None:
    checked = 0
    for r, attempt, cancelled in itertools.product([None, *lock_rows()], (1, 2, 3),
                                                   (False, True)):
        claim, after = judge_claim(None if r is None else _row(r), attempt, cancelled=cancelled)
        expected = None if after is None else (after.claims, after.ambiguous, after.in_flight)
        assert claim_row(r, attempt, cancelled) == (claim, expected), (r, attempt, cancelled)
        checked += 1
    assert checked == (1 + len(lock_rows())) * 6


def test_a_row_just_inserted_is_fresh_and_goes_in_flight() -> None:
    just_inserted = ("cmp", "c1", "claimed", 0, 0, 0, True, None, None, None, None)
    claim, write = claim_row(just_inserted, 1, False)
    assert claim.state is ClaimState.FRESH and claim.must_send and claim.ambiguous == 0
    assert write == (1, 0, True)
    # Cancelled meanwhile: nothing to send, nothing written (judge_claim's path).
    claim, write = claim_row(just_inserted, 1, True)
    assert claim.state is ClaimState.SKIPPED and write is None


def test_rows_are_written_as_arrays_in_column_order() -> None:
    (text,) = _rows([("cmp", "c1", "sent", 2, 0, 250, 'a "quoted" reply', None, None),
                     ("cmp", "c2", "held", 1, 1, None, None, "naïve\nreason", True)])
    assert json.loads(text) == [["cmp", "c1", "sent", 2, 0, 250, 'a "quoted" reply', None, None],
                                ["cmp", "c2", "held", 1, 1, None, None, "naïve\nreason", True]]
