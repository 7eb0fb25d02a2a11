"""Rate limits: token buckets per tenant and per SMTP server, shared out across the group.

Limits are written like "100/s", "5000/min", "100000/h" (several, comma-separated, all apply).
Each limit is a token bucket whose capacity is one second's worth of tokens (at least one):
bursts stay short, the long-run rate never exceeds the limit.

Guarantees:
- A message is sent only with a token from every bucket that applies to it (its tenant's and
  its SMTP server's), so no limit is exceeded by this instance.
- Split across instances: each instance runs its buckets at limit x its share of the group's
  partitions (assigned / total), so the sum over a group whose assignment covers every
  partition once never exceeds the limit.
- `book` never waits: it takes the tokens and says when the message may go (its slot); a
  caller that does not want to wait that long re-queues the message for that slot, already
  paid for (RecipientRetryScheduled.throttled). The slot is only good at its time: the sender
  has the message back a little before it (THROTTLED_EARLY_SECONDS) and waits for it, so the
  message is neither charged twice nor sent early; one that comes back after its slot books a
  new one (that slot went unused: sending then, on top of the messages booked for now, would
  go over the limit).
- Pure given the `now` readings passed in (no clock, no sleep inside).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

from services.common.metrics import THROTTLES
from services.common.settings import SenderSettings

_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
          "h": 3600.0, "hour": 3600.0}
_LIMIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([a-z]+)\s*$")


def parse_limits(text: str) -> tuple[float, ...]:
    """Messages per second of each limit in e.g. "100/s, 5000/min" ("" -> no limit)."""
    rates = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = _LIMIT.match(part.lower())
        if match is None or match[2] not in _UNITS:
            raise ValueError(f"not a rate limit: {part!r} (expected e.g. 100/s, 5000/min, 9000/h)")
        count = float(match[1])
        if count <= 0:
            raise ValueError(f"a rate limit must be positive: {part!r}")
        rates.append(count / _UNITS[match[2]])
    return tuple(rates)


@dataclass
class TokenBucket:
    """`rate` tokens per second, at most `capacity` saved up; may go into debt by reservations."""

    rate: float
    capacity: float
    tokens: float
    updated: float

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def wait(self, now: float) -> float:
        """Seconds until one token is there (0: now)."""
        self.refill(now)
        if self.tokens >= 1.0:
            return 0.0
        if self.rate <= 0:
            return float("inf")
        return (1.0 - self.tokens) / self.rate


class RateLimiter:
    """Buckets per tenant and per SMTP server of one sender instance. Thread-safe."""

    def __init__(self, tenant_limits: tuple[float, ...] = (), server_limits: tuple[float, ...] = (),
                 share: float = 1.0) -> None:
        self.tenant_limits = tenant_limits
        self.server_limits = server_limits
        self._share = share
        self._buckets: dict[tuple[str, str, int], TokenBucket] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: SenderSettings) -> RateLimiter:
        """SENDER_TENANT_RATE (each tenant) and SENDER_SMTP_RATE (each SMTP server); a bad
        limit raises ValueError naming its variable."""
        def limits(variable: str, text: str) -> tuple[float, ...]:
            try:
                return parse_limits(text)
            except ValueError as exc:
                raise ValueError(f"{variable}: {exc}") from None

        return cls(limits("SENDER_TENANT_RATE", settings.sender_tenant_rate),
                   limits("SENDER_SMTP_RATE", settings.sender_smtp_rate))

    @property
    def active(self) -> bool:
        return bool(self.tenant_limits or self.server_limits)

    def set_share(self, share: float, now: float) -> None:
        """This instance's share of the group's partitions, in [0, 1]: rescales every bucket."""
        with self._lock:
            self._share = max(0.0, min(1.0, share))
            for (kind, _, index), bucket in self._buckets.items():
                limit = (self.tenant_limits if kind == "tenant" else self.server_limits)[index]
                bucket.refill(now)
                bucket.rate = limit * self._share
                bucket.capacity = max(1.0, bucket.rate)
                bucket.tokens = min(bucket.tokens, bucket.capacity)

    def book(self, tenant: str, server: str, now: float) -> float:
        """Book the next slot of every bucket that applies: the seconds until the message may
        go (0: now). The tokens are taken at once (buckets may go into debt), so consecutive
        bookings get consecutive slots and a message sent at its slot needs no other token."""
        with self._lock:
            buckets = self._for(tenant, server, now)
            waits = [b.wait(now) for b in buckets]
            wait = max(waits, default=0.0)
            for bucket in buckets:
                bucket.tokens -= 1.0
        if wait > 0:
            # The binding limit: tenant buckets come first in `buckets` (see _for).
            binding = waits.index(wait)
            THROTTLES.labels(scope="tenant" if binding < len(self.tenant_limits) else "relay").inc()
        return wait

    def _for(self, tenant: str, server: str, now: float) -> list[TokenBucket]:
        wanted = [("tenant", tenant, i) for i in range(len(self.tenant_limits))]
        wanted += [("server", server, i) for i in range(len(self.server_limits))]
        buckets = []
        for key in wanted:
            bucket = self._buckets.get(key)
            if bucket is None:
                limits = self.tenant_limits if key[0] == "tenant" else self.server_limits
                rate = limits[key[2]] * self._share
                capacity = max(1.0, rate)
                bucket = self._buckets[key] = TokenBucket(rate, capacity, capacity, now)
            buckets.append(bucket)
        return buckets
