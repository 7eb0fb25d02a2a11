"""Sender test kit: recipients, producing them, reading deliveries, the ledger, a sender
running in a thread. Shared by the sender's integration tests (real broker, PostgreSQL, sink).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
from confluent_kafka import Consumer, Producer

from schemas.base import Record
from schemas.envelope import Message, decode, encode, wrap
from schemas.events import EmailDeferred, MessageTemplate, RecipientQueued
from services.common.settings import Settings
from services.common.topics import DELIVERIES, EVENTS, RECIPIENTS, topic_name
from services.sender.__main__ import sender_worker
from services.sender.decisions import Bounds
from services.sender.mailer import SEND_BOUNDS
from services.sender.retries import RetryPolicy
from services.sender.smtp_pool import SmtpPool
from services.sender.throttle import RateLimiter
from services.sender.transport import MailTransport
from services.sender.worker import SenderWorker

REPO_ROOT = Path(__file__).resolve().parents[2]
TENANT = "acme"
TEMPLATE = MessageTemplate(
    subject='Hello {{ first_name | "there" }}, news for {{ attr.city }}',
    from_address="news@example.com",
    body_text="Hi {{ first_name }},\nour news.\n",
    body_html="<p>Hi {{ first_name }}</p>",
)
# Retries a fraction of a second apart: the delay topics are exercised, the test stays short.
FAST_RETRIES = RetryPolicy(base_seconds=0.2, max_delay_seconds=1.0, max_attempts=8,
                           max_age_seconds=600)


# --- helpers -------------------------------------------------------------------------------


def recipients(count: int, campaign_id: str | None = None) -> list[RecipientQueued]:
    campaign_id = campaign_id or f"cmp-{uuid.uuid4()}"
    return [
        RecipientQueued(
            campaign_id=campaign_id,
            contact_id=f"ct-{i}",
            email=f"user{i}@example.org",
            first_name=f"First{i}" if i % 10 else "",  # every 10th has no name: the fallback
            attributes={"city": f"City{i % 7}"},
            template=TEMPLATE,
        )
        for i in range(count)
    ]


def expected_subject(r: RecipientQueued) -> str:
    return f"Hello {r.first_name or 'there'}, news for {r.attributes['city']}"


def produce(settings: Settings, items: list[RecipientQueued], *,
            extra: tuple[bytes, ...] = ()) -> None:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers, "linger.ms": 5})
    topic = topic_name(RECIPIENTS, settings)
    for raw in extra:
        producer.produce(topic, key=b"junk", value=raw)
    for r in items:
        envelope = wrap(r, tenant_id=TENANT, aggregate_id=r.campaign_id)
        producer.produce(topic, key=f"{TENANT}:{r.contact_id}".encode(), value=encode(envelope))
        producer.poll(0)
    assert producer.flush(30) == 0


def deliveries_until(settings: Settings, done: Callable[[list[Message]], bool],
                     timeout: float = 120.0, settle: float = 1.5) -> list[Message]:
    """Every record on the deliveries topic once `done(records)` holds (then lingers a moment
    so extra records are seen too)."""
    consumer = Consumer({
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "group.id": f"reader-{uuid.uuid4()}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    })
    consumer.subscribe([topic_name(DELIVERIES, settings)])
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    reached: float | None = None
    try:
        while time.monotonic() < deadline:
            for record in consumer.consume(1000, 0.3):
                assert record.error() is None, record.error()
                out.append(decode(record.value()))
            if reached is not None or done(out):
                reached = reached or time.monotonic()
                if time.monotonic() - reached >= settle:
                    break
    finally:
        consumer.close()
    assert reached is not None, f"condition not reached with {len(out)} delivery events"
    return out


def read_deliveries(settings: Settings, at_least: int, timeout: float = 60.0,
                    settle: float = 1.5) -> list[Message]:
    """Every record on the deliveries topic once at least `at_least` arrived."""
    return deliveries_until(settings, lambda out: len(out) >= at_least, timeout, settle)


def terminal_for_all(expected: int) -> Callable[[list[Message]], bool]:
    """Condition: `expected` distinct recipients have a terminal delivery event."""
    def done(out: list[Message]) -> bool:
        return len({e.payload.contact_id for e in out
                    if not isinstance(e.payload, EmailDeferred)}) >= expected
    return done


def ledger_rows(settings: Settings, campaign_id: str) -> list[dict]:
    with psycopg.connect(settings.database_url) as conn:
        cur = conn.execute(
            "SELECT contact_id, status, claims, attempts, ambiguous, smtp_code, smtp_reply,"
            " reason, permanent, message_id FROM send_ledger WHERE campaign_id = %s",
            (campaign_id,),
        )
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


@contextlib.contextmanager
def running_sender(settings: Settings, concurrency: int = 8, policy: RetryPolicy = FAST_RETRIES,
                   limiter: RateLimiter | None = None, bounds: Bounds = SEND_BOUNDS,
                   transport: MailTransport | None = None) -> Iterator[SenderWorker]:
    """A sender worker running in a thread, wired as services/sender/__main__.py wires it; by
    default it mails settings.smtp_host:smtp_port, unlimited, without List-Unsubscribe."""
    stop = threading.Event()
    worker = sender_worker(
        settings, stop,
        transport or SmtpPool(settings.smtp_host, settings.smtp_port, concurrency),
        policy=policy, limiter=limiter or RateLimiter(), list_unsubscribe=None,
        concurrency=concurrency, bounds=bounds)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            worker.run(stop)
        except BaseException as exc:  # surfaced in the test, not lost in the thread
            errors.append(exc)

    thread = threading.Thread(target=run, name="sender", daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive(), "sender did not stop"
    assert not errors, errors


def sender_env(settings: Settings, smtp_port: int) -> dict[str, str]:
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "DATABASE_URL": settings.database_url,
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp_port),
        "TOPIC_PREFIX": settings.topic_prefix,
        "SENDER_RETRY_BASE_SECONDS": str(FAST_RETRIES.base_seconds),
        "SENDER_RETRY_MAX_DELAY_SECONDS": str(FAST_RETRIES.max_delay_seconds),
        "PYTHONUNBUFFERED": "1",
    }


def wait_until(condition, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.1)


def publish_control(settings: Settings, campaign_id: str, event: Record) -> None:
    """A campaign event on campaign.events, as the command handler would publish it."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers})
    envelope = wrap(event, tenant_id=TENANT, aggregate_id=campaign_id)
    producer.produce(topic_name(EVENTS, settings), key=campaign_id.encode(), value=encode(envelope))
    assert producer.flush(30) == 0


def steady(count: Callable[[], int], quiet: float = 2.0, timeout: float = 60.0) -> int:
    """`count()` once it has not changed for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    last, since = count(), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "never settled"
        time.sleep(0.1)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
    return last
