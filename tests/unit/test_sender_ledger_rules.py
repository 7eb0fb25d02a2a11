"""The send ledger's claim verdicts (`judge_claim`), without a database."""

from __future__ import annotations

from services.sender.delivery import Outcome, Status
from services.sender.ledger import ClaimState, LedgerRow, judge_claim

NEW = LedgerRow("claimed", 0, 0, 0, False)  # just inserted by this claim


def state(row: LedgerRow | None, attempt: int, cancelled: bool = False) -> ClaimState:
    return judge_claim(row, attempt, cancelled=cancelled)[0].state


def test_first_claim_is_fresh_and_puts_the_row_in_flight() -> None:
    claim, after = judge_claim(NEW, 1)
    assert claim.state is ClaimState.FRESH and claim.must_send
    assert after == LedgerRow("claimed", 1, 0, 0, True)


def test_claim_in_flight_again_is_unsettled_and_counted() -> None:
    claim, after = judge_claim(LedgerRow("claimed", 1, 0, 0, True), 1)
    assert claim.state is ClaimState.UNSETTLED and claim.must_send and claim.ambiguous == 1
    assert after is not None and after.ambiguous == 1 and after.claims == 2


def test_settled_outcomes_are_replayed() -> None:
    row = LedgerRow("sent", 2, 3, 1, False, 250, "250 OK")
    claim, _ = judge_claim(row, 1)
    assert claim.state is ClaimState.SETTLED and not claim.must_send
    assert claim.outcome == Outcome(Status.SENT, 3, 250, "250 OK", ambiguous=1)
    assert state(row, 4) is ClaimState.SETTLED


def test_attempts_after_a_deferral() -> None:
    deferred = LedgerRow("claimed", 1, 1, 0, False, 451, None, "451 later")
    # The next attempt is fresh; a copy of the deferred attempt re-publishes the deferral.
    assert state(deferred, 2) is ClaimState.FRESH
    claim, after = judge_claim(deferred, 1)
    assert claim.state is ClaimState.DEFERRED and after is None
    assert claim.outcome == Outcome(Status.DEFERRED, 1, 451, "451 later")
    # Once attempt 2 is in flight, copies of attempt 1 are stale.
    in_flight = LedgerRow("claimed", 2, 1, 0, True)
    assert state(in_flight, 1) is ClaimState.STALE
    assert state(in_flight, 2) is ClaimState.UNSETTLED


def test_a_held_attempt_is_tried_again_as_fresh() -> None:
    # Held back (campaign paused) before its SMTP transaction: attempts did not move.
    held = LedgerRow("claimed", 1, 0, 0, False)
    assert state(held, 1) is ClaimState.FRESH


def test_cancelled_campaigns_are_skipped_unless_settled() -> None:
    assert state(None, 1, cancelled=True) is ClaimState.SKIPPED
    assert state(LedgerRow("claimed", 1, 1, 0, False), 2, cancelled=True) is ClaimState.SKIPPED
    assert state(LedgerRow("failed", 1, 1, 0, False), 1, cancelled=True) is ClaimState.SETTLED
    claim, after = judge_claim(LedgerRow("claimed", 1, 0, 0, True), 1, cancelled=True)
    assert claim.state is ClaimState.SKIPPED and claim.ambiguous == 1
    assert after is not None and not after.in_flight
