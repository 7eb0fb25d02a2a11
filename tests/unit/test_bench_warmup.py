"""The bench's warm-up size knob: BENCH_WARMUP, BENCH_SCALE=small, and bad values."""

from __future__ import annotations

import pytest

from bench.run import DEFAULT_WARMUP_RECIPIENTS, SMALL_WARMUP_RECIPIENTS, warmup_wanted


def test_default_and_small_scale_sizes() -> None:
    assert warmup_wanted({}) == DEFAULT_WARMUP_RECIPIENTS
    assert warmup_wanted({"BENCH_SCALE": "small"}) == SMALL_WARMUP_RECIPIENTS


def test_explicit_size_wins_and_zero_turns_it_off() -> None:
    assert warmup_wanted({"BENCH_WARMUP": "500", "BENCH_SCALE": "small"}) == 500
    assert warmup_wanted({"BENCH_WARMUP": "0"}) == 0


@pytest.mark.parametrize("value", ["-1", "lots"])
def test_a_bad_size_is_an_error(value: str) -> None:
    with pytest.raises(ValueError, match="BENCH_WARMUP|invalid literal"):
        warmup_wanted({"BENCH_WARMUP": value})
