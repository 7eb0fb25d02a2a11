"""The backoff schedule and the limits of transient failures."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.common.settings import SenderSettings
from services.sender.retries import RetryPolicy, tier_index

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
POLICY = RetryPolicy(base_seconds=30, max_delay_seconds=3600, max_attempts=8,
                     max_age_seconds=86400)


def test_delays_double_and_are_capped() -> None:
    ceilings = [POLICY.delay(n, 1.0) for n in range(1, 10)]
    assert ceilings == [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]


def test_equal_jitter_stays_within_half_and_full_delay() -> None:
    for n in range(1, 10):
        ceiling = POLICY.delay(n, 1.0)
        assert POLICY.delay(n, 0.0) == ceiling / 2
        assert ceiling / 2 <= POLICY.delay(n, 0.37) <= ceiling


def test_retry_time_and_limits() -> None:
    assert POLICY.next_attempt_at(1, NOW, NOW, 0.0) == NOW + timedelta(seconds=15)
    assert POLICY.next_attempt_at(7, NOW, NOW, 0.0) is not None
    assert POLICY.next_attempt_at(8, NOW, NOW, 0.0) is None  # the 8th attempt was the last
    old = NOW - timedelta(seconds=86400 - 10)
    assert POLICY.next_attempt_at(1, old, NOW, 0.0) is None  # the retry would be too late


def test_tiers() -> None:
    assert [tier_index(a, 3) for a in range(1, 8)] == [0, 0, 1, 2, 2, 2, 2]
    with pytest.raises(ValueError):
        tier_index(0, 3)


def test_from_settings_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENDER_RETRY_BASE_SECONDS", "0.2")
    monkeypatch.setenv("SENDER_MAX_ATTEMPTS", "5")
    policy = RetryPolicy.from_settings(SenderSettings())
    assert policy.base_seconds == 0.2 and policy.max_attempts == 5
    assert policy.max_delay_seconds == RetryPolicy().max_delay_seconds


def test_the_settings_defaults_are_the_policys() -> None:
    defaults = {name: field.default for name, field in SenderSettings.model_fields.items()}
    expected = RetryPolicy()
    assert RetryPolicy.from_settings(SenderSettings.model_construct(**defaults)) == expected
    with pytest.raises(ValueError):
        RetryPolicy(base_seconds=10, max_delay_seconds=5)
