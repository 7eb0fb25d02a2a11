"""Small, pure statistics for the bench figures."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile (the smallest value with at least `pct`% of values at or below
    it), so p99 is always a value that was really observed; None for no values."""
    if not values:
        return None
    if not 0 < pct <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {pct}")
    ordered = sorted(values)
    rank = math.ceil(pct / 100 * len(ordered))
    return ordered[max(rank, 1) - 1]


def rate(count: int, seconds: float | None) -> float | None:
    """count / seconds, or None when there is no positive duration to divide by."""
    if seconds is None or seconds <= 0:
        return None
    return count / seconds
