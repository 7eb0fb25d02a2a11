"""When a transiently failed recipient is tried again, and when the sender gives up. Pure.

Guarantees:
- Exponential backoff with equal jitter: after failed attempt n the wait is drawn uniformly
  from [d/2, d], d = min(base * 2**(n-1), max_delay), so retries of many recipients that
  failed together (a relay restart) spread out instead of hitting the relay in one burst.
- At most `max_attempts` SMTP attempts per recipient, and no attempt later than `max_age`
  after the first: then the delivery fails for good (EmailFailed, permanent=False).
- The delay topic of attempt n is a pure function of n (`tier_index`), so copies of one
  attempt always land on the same topic and partition and are handled one after the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from services.common.settings import SenderSettings


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff schedule and limits of transient failures."""

    # First wait: long enough for a relay's greylisting or a momentary overload to pass.
    base_seconds: float = 30.0
    # Longest single wait: a relay down for hours is still tried about hourly.
    max_delay_seconds: float = 3600.0
    # Attempts in all (the first included): guards against mailing into a relay that answers
    # 4xx forever.
    max_attempts: int = 8
    # A campaign mail older than this is stale news: give up (guards against endless retries).
    max_age_seconds: float = 2 * 24 * 3600.0

    def __post_init__(self) -> None:
        if self.base_seconds < 0 or self.max_delay_seconds < self.base_seconds:
            raise ValueError("need 0 <= base_seconds <= max_delay_seconds")
        if self.max_attempts < 1 or self.max_age_seconds < 0:
            raise ValueError("need max_attempts >= 1 and max_age_seconds >= 0")

    @classmethod
    def from_settings(cls, settings: SenderSettings) -> RetryPolicy:
        return cls(base_seconds=settings.sender_retry_base_seconds,
                   max_delay_seconds=settings.sender_retry_max_delay_seconds,
                   max_attempts=settings.sender_max_attempts,
                   max_age_seconds=settings.sender_max_age_seconds)

    def delay(self, failed_attempt: int, draw: float) -> float:
        """Seconds to wait after failed attempt `failed_attempt` (1-based); `draw` in [0, 1)."""
        ceiling = min(self.max_delay_seconds, self.base_seconds * 2 ** min(failed_attempt - 1, 60))
        return ceiling / 2 + ceiling / 2 * draw

    def next_attempt_at(
        self, failed_attempt: int, first_attempt_at: datetime, now: datetime, draw: float
    ) -> datetime | None:
        """When to try again after a transient failure, or None: give up."""
        if failed_attempt >= self.max_attempts:
            return None
        retry_at = now + timedelta(seconds=self.delay(failed_attempt, draw))
        if retry_at - first_attempt_at > timedelta(seconds=self.max_age_seconds):
            return None
        return retry_at


def tier_index(attempt: int, tiers: int) -> int:
    """Index of the delay topic that carries attempt `attempt`: one tier per attempt from the
    second on, the last tier for every attempt beyond; a first attempt delayed by a rate limit
    waits on the first tier."""
    if attempt < 1 or tiers < 1:
        raise ValueError("attempts and tiers count from 1")
    return min(max(attempt - 2, 0), tiers - 1)
