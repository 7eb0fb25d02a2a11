"""Fault selection: which outcome a message gets. Pure logic, no I/O.

Guarantees: one uniform draw per message decides its outcome, so over many messages each
outcome's share converges to its configured rate, and with a seeded `random.Random` the
sequence of outcomes is reproducible. With all rates 0 no draw is made and every message is
accepted.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from services.smtp_sink.config import SinkConfig


class Outcome(enum.Enum):
    """What the sink does with one message (one MAIL..DATA transaction)."""

    ACCEPT = "accept"  # record it, then reply 250
    TEMPFAIL = "tempfail"  # reply 451 after DATA; nothing recorded
    PERMFAIL = "permfail"  # reply 550 after DATA; nothing recorded
    DROP_AFTER_DATA = "drop_after_data"  # close the connection after the final "." silently
    DROP_BEFORE_DATA = "drop_before_data"  # close the connection at RCPT, before DATA


@dataclass(frozen=True)
class FaultPlan:
    """Rates of each fault; the remainder of the probability mass is ACCEPT."""

    tempfail_rate: float = 0.0
    permfail_rate: float = 0.0
    drop_after_data_rate: float = 0.0
    drop_before_data_rate: float = 0.0

    def __post_init__(self) -> None:
        # Same rules as SinkConfig; re-checked because a plan can be built directly.
        rates = self._thresholds_source()
        for name, rate in rates:
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"FaultPlan.{name} must be in [0, 1], got {rate!r}")
        if sum(rate for _, rate in rates) > 1.0 + 1e-9:  # slack for float rounding of sums
            raise ValueError(f"FaultPlan rates must sum to at most 1, got {rates!r}")

    @classmethod
    def from_config(cls, config: SinkConfig) -> FaultPlan:
        return cls(
            tempfail_rate=config.tempfail_rate,
            permfail_rate=config.permfail_rate,
            drop_after_data_rate=config.drop_rate,
            drop_before_data_rate=config.drop_before_data_rate,
        )

    def _thresholds_source(self) -> tuple[tuple[str, float], ...]:
        return (
            ("drop_before_data_rate", self.drop_before_data_rate),
            ("permfail_rate", self.permfail_rate),
            ("tempfail_rate", self.tempfail_rate),
            ("drop_after_data_rate", self.drop_after_data_rate),
        )

    @property
    def injects_faults(self) -> bool:
        return any(rate > 0 for _, rate in self._thresholds_source())

    def decide(self, rng: random.Random) -> Outcome:
        """Outcome of the next message, from a single draw of `rng`."""
        if not self.injects_faults:
            return Outcome.ACCEPT
        draw = rng.random()
        edge = self.drop_before_data_rate
        if draw < edge:
            return Outcome.DROP_BEFORE_DATA
        edge += self.permfail_rate
        if draw < edge:
            return Outcome.PERMFAIL
        edge += self.tempfail_rate
        if draw < edge:
            return Outcome.TEMPFAIL
        edge += self.drop_after_data_rate
        if draw < edge:
            return Outcome.DROP_AFTER_DATA
        return Outcome.ACCEPT
