"""Configuration of the SMTP sink: where it listens, what it records, which faults it injects.

Guarantees: a `SinkConfig` that exists is valid — every rate is in [0, 1], the rates sum to at
most 1 (each message gets at most one fault), latency is not negative and the port is a TCP
port. Anything else is refused at construction with a ValueError naming the field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from services.common.settings import DEFAULT_SMTP_PORT

# Float sums like 0.1 + 0.2 + 0.7 land a hair above 1.0; without slack such configs would be
# refused although every rate the user wrote is fine.
_RATE_SUM_TOLERANCE = 1e-9

_RATE_FIELDS = ("tempfail_rate", "permfail_rate", "drop_rate", "drop_before_data_rate")


def _default_port() -> int:
    return int(os.environ.get("SMTP_PORT", str(DEFAULT_SMTP_PORT)))


@dataclass(frozen=True)
class SinkConfig:
    """Everything the sink needs. port=0 means "pick a free port" (see `SmtpSink.port`)."""

    host: str = "127.0.0.1"
    port: int = field(default_factory=_default_port)
    record_path: Path | None = None
    # Shares of messages answered 451 / 550 at the end of DATA.
    tempfail_rate: float = 0.0
    permfail_rate: float = 0.0
    # Share of messages whose connection is dropped after the final "." without any reply:
    # the client cannot know whether the message was delivered.
    drop_rate: float = 0.0
    # Share of messages whose connection is dropped at RCPT, before DATA: surely not delivered.
    drop_before_data_rate: float = 0.0
    # Delay before answering DATA, per message, to imitate a slow receiving server.
    latency_ms: float = 0.0
    # Seed of the fault draws; None draws from the OS entropy (different every run).
    seed: int | None = None
    # Keep accepted messages in memory for in-process readers (tests). A long-running sink
    # process records to its file only, so its memory does not grow with every message.
    keep_in_memory: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.record_path, str):
            # Accept a plain string too (env values, CLI args); frozen, hence object.__setattr__.
            object.__setattr__(self, "record_path", Path(self.record_path))
        for name in _RATE_FIELDS:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"SinkConfig.{name} must be in [0, 1], got {value!r}")
        total = sum(getattr(self, name) for name in _RATE_FIELDS)
        if total > 1.0 + _RATE_SUM_TOLERANCE:
            raise ValueError(
                f"SinkConfig fault rates must sum to at most 1, got {total!r} "
                f"({', '.join(f'{n}={getattr(self, n)}' for n in _RATE_FIELDS)})"
            )
        if self.latency_ms < 0:
            raise ValueError(f"SinkConfig.latency_ms must be >= 0, got {self.latency_ms!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"SinkConfig.port must be in [0, 65535], got {self.port!r}")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> SinkConfig:
        """Build from SMTP_HOST, SMTP_PORT, SINK_RECORD_PATH, SINK_*_RATE, SINK_LATENCY_MS,
        SINK_SEED. Unset or empty variables keep the defaults; unparsable ones raise ValueError
        naming the variable."""
        source = os.environ if env is None else env

        def get(name: str) -> str | None:
            value = source.get(name, "").strip()
            return value or None

        def number(name: str, default: float) -> float:
            raw = get(name)
            if raw is None:
                return default
            try:
                return float(raw)
            except ValueError:
                raise ValueError(f"{name} must be a number, got {raw!r}") from None

        def integer(name: str) -> int | None:
            raw = get(name)
            if raw is None:
                return None
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"{name} must be an integer, got {raw!r}") from None

        port = integer("SMTP_PORT")
        record_path = get("SINK_RECORD_PATH")
        return cls(
            host=get("SMTP_HOST") or "127.0.0.1",
            port=DEFAULT_SMTP_PORT if port is None else port,
            record_path=Path(record_path) if record_path else None,
            tempfail_rate=number("SINK_TEMPFAIL_RATE", 0.0),
            permfail_rate=number("SINK_PERMFAIL_RATE", 0.0),
            drop_rate=number("SINK_DROP_RATE", 0.0),
            drop_before_data_rate=number("SINK_DROP_BEFORE_DATA_RATE", 0.0),
            latency_ms=number("SINK_LATENCY_MS", 0.0),
            seed=integer("SINK_SEED"),
            keep_in_memory=not record_path,
        )
