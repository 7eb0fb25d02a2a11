"""The probe rules of services/common/observability.py, with plain values."""

from __future__ import annotations

from services.common.observability import evaluate, liveness


def test_a_loop_that_beat_recently_is_alive() -> None:
    assert liveness(2.0, stale_after=30.0) == (True, "last beat 2.0 s ago")


def test_a_loop_that_stopped_beating_is_not_alive() -> None:
    alive, detail = liveness(31.5, stale_after=30.0)
    assert not alive
    assert detail == "last beat 31.5 s ago, stale after 30 s"


def test_a_loop_that_has_not_started_counts_as_alive() -> None:
    assert liveness(None, stale_after=30.0) == (True, "no beat yet")


def test_ready_only_when_every_check_passes() -> None:
    state = evaluate({"broker": lambda: None, "assignment": lambda: "no partitions assigned"})
    assert not state.ready
    assert state.checks == {"broker": "ok", "assignment": "no partitions assigned"}
    assert evaluate({"broker": lambda: None}).ready


def test_a_check_that_raises_fails_with_its_reason() -> None:
    def broken() -> str | None:
        raise ConnectionError("refused")

    state = evaluate({"database": broken})
    assert not state.ready
    assert state.checks == {"database": "ConnectionError: refused"}
