"""Token buckets per tenant and per SMTP server, and their share of the group's limit."""

from __future__ import annotations

import pytest

from services.sender.throttle import RateLimiter, TokenBucket, parse_limits


def test_parse_limits() -> None:
    assert parse_limits("") == ()
    assert parse_limits("100/s, 600/min,3600/h") == (100.0, 10.0, 1.0)
    for bad in ("100", "10/day", "-1/s", "0/s"):
        with pytest.raises(ValueError):
            parse_limits(bad)


def test_bucket_refills_up_to_capacity() -> None:
    bucket = TokenBucket(rate=2.0, capacity=2.0, tokens=0.0, updated=0.0)
    assert bucket.wait(0.0) == 0.5
    assert bucket.wait(0.5) == 0.0
    bucket.refill(100.0)
    assert bucket.tokens == 2.0


def test_bookings_get_consecutive_slots_and_never_exceed_the_rate() -> None:
    limiter = RateLimiter(tenant_limits=(10.0,))
    waits = [limiter.book("acme", "relay", 0.0) for _ in range(30)]
    # A one-second burst (capacity 10), then one slot every 0.1 s.
    assert waits[:10] == [0.0] * 10
    assert waits[10:13] == pytest.approx([0.1, 0.2, 0.3])
    assert waits[-1] == pytest.approx(2.0)
    # Messages sent at their slots: any window of t seconds holds at most 10 + 10 t.
    for i in range(30):
        for j in range(i, 30):
            assert j - i + 1 <= 10 + 10 * (waits[j] - waits[i]) + 1e-9


def test_tenants_have_their_own_buckets_and_the_server_bucket_is_shared() -> None:
    limiter = RateLimiter(tenant_limits=(100.0,), server_limits=(2.0,))
    assert limiter.book("a", "relay", 0.0) == 0.0
    assert limiter.book("b", "relay", 0.0) == 0.0
    assert limiter.book("c", "relay", 0.0) == pytest.approx(0.5)  # the relay's 2/s
    assert limiter.book("d", "other-relay", 0.0) == 0.0


def test_the_share_scales_every_limit() -> None:
    limiter = RateLimiter(tenant_limits=(10.0,), share=1.0)
    limiter.book("acme", "relay", 0.0)
    limiter.set_share(0.25, 0.0)  # a quarter of the partitions: 2.5 per second
    # Saved-up tokens shrink to the new capacity (2.5): two go now, the third waits for
    # the missing half token at 2.5 per second.
    drained = [limiter.book("acme", "relay", 0.0) for _ in range(3)]
    assert drained == pytest.approx([0.0, 0.0, 0.2])
    assert not RateLimiter().active and RateLimiter(server_limits=(1.0,)).active



def test_a_throttled_recipient_is_taken_back_early_enough_to_wait_for_its_slot():
    from datetime import UTC, datetime, timedelta

    from schemas.events import MessageTemplate, RecipientQueued, RecipientRetryScheduled
    from services.sender.decisions import due_at
    from services.sender.mailer import THROTTLED_EARLY_SECONDS

    slot = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
    recipient = RecipientQueued(campaign_id="c1", contact_id="k1", email="k1@example.com",
                                template=MessageTemplate(subject="s", from_address="n@example.com",
                                                         body_text="hi"))
    retry = RecipientRetryScheduled(recipient=recipient, attempt=2, retry_at=slot,
                                    first_attempt_at=slot - timedelta(minutes=1))
    throttled = retry.model_copy(update={"attempt": 1, "throttled": True})
    early = THROTTLED_EARLY_SECONDS
    assert due_at(retry, early=early) == slot  # a transient failure's retry: at its time
    assert due_at(throttled, early=early) == slot - timedelta(seconds=THROTTLED_EARLY_SECONDS)
    assert THROTTLED_EARLY_SECONDS > 0


def test_each_wait_is_counted_under_the_limit_that_binds() -> None:
    from services.common.metrics import THROTTLES

    def count(scope: str) -> float:
        return float(THROTTLES.labels(scope=scope)._value.get())

    tenant, relay = count("tenant"), count("relay")
    limiter = RateLimiter(tenant_limits=(100.0,), server_limits=(2.0,))
    for name in "abc":
        limiter.book(name, "relay", 0.0)  # the third waits on the relay's 2/s
    assert (count("tenant") - tenant, count("relay") - relay) == (0, 1)
    limiter = RateLimiter(tenant_limits=(1.0,))
    limiter.book("acme", "relay", 0.0)
    limiter.book("acme", "relay", 0.0)  # waits on the tenant's 1/s
    assert (count("tenant") - tenant, count("relay") - relay) == (1, 1)
