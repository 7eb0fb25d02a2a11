"""The bench's step knobs: BENCH_SKIP names, the 5M audience under BENCH_SCALE=small, and the
latency step's size and target."""

from __future__ import annotations

import pytest

from bench import latency_sink
from bench.run import SEPARATE_STEPS, skipped_steps


def test_every_step_can_be_skipped_and_an_unknown_one_is_an_error() -> None:
    assert skipped_steps({"BENCH_SKIP": ",".join(SEPARATE_STEPS)}) == SEPARATE_STEPS
    with pytest.raises(ValueError, match="unknown step"):
        skipped_steps({"BENCH_SKIP": "latency,lateny"})


def test_the_5m_audience_runs_in_a_full_bench_only() -> None:
    assert "audience_5m" not in skipped_steps({})
    assert skipped_steps({"BENCH_SCALE": "small"}) == ("audience_5m",)
    assert skipped_steps({"BENCH_SCALE": "small", "BENCH_SKIP": "audience_5m"}) == ("audience_5m",)


def test_latency_step_size_and_target() -> None:
    assert latency_sink.recipients_wanted({}) == latency_sink.DEFAULT_RECIPIENTS
    assert latency_sink.recipients_wanted({"BENCH_SCALE": "small"}) == latency_sink.SMALL_RECIPIENTS
    assert latency_sink.recipients_wanted({"BENCH_LATENCY_RECIPIENTS": "300"}) == 300
    with pytest.raises(ValueError, match=">= 1"):
        latency_sink.recipients_wanted({"BENCH_LATENCY_RECIPIENTS": "0"})
    # The bar: 0.85 x 8 connections / 20 ms.
    assert latency_sink.target_rate(8) == pytest.approx(340.0)
