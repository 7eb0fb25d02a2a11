"""Projection lag without the main stack: the real Projector against a campaign's start.

What it reproduces: a campaign starts with the hydrator's burst of RecipientQueued (committed
in transactions of QUEUED_PER_TRANSACTION, as the fan-out does) while deliveries already arrive
at a steady rate (EmailSent, one per recipient, keyed by campaign as the sender writes them;
a recipient's delivery only once its RecipientQueued is committed, as the sender sees it): on
the main stack the sender starts mailing about 2 s before hydration completes, so the first
deliveries meet the burst in the projector. The projector runs as the service runs it (one
`Projector` per lane, each in its own thread: `lanes`, the default) or as one `Projector` over
every topic (`single`, the design before the lanes), on fresh topics (prefix `lag<hex>.`).

Lag per recipient: campaign_recipients.updated_at (the projector transaction's now()) minus
last_event_at (the EmailSent's occurred_at, stamped when the harness produced it): the same
lower bound as `make bench`'s projection_lag (bench.figures). Printed: p50 / p90 / p99 / max
in ms, the worst lag in each second of the delivery stream (where the spikes are), and per
lane the CPU seconds its Python threads and its PostgreSQL backend used over the run and the
transactions it committed.

`KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:39092 DATABASE_URL=postgresql://campaigns@127.0.0.1:35432/campaigns_test
.venv/bin/python -m bench.projection_lag [RECIPIENTS] [DELIVERIES_PER_SECOND] [lanes|single]`
(defaults 10,000, 1,000 and lanes). Its rows, positions, consumer groups and topics are deleted
afterwards.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import uuid
from typing import Any

import psycopg
import structlog
from confluent_kafka.admin import AdminClient

from bench.proc_cpu import cpu_seconds
from bench.projection import backend_cpu_seconds
from bench.stats import percentile
from projections.projector import (
    LANES,
    POSITIONS_NAME,
    PROJECTED_TOPICS,
    Projector,
    lane_projectors,
    projector_for,
    run_lanes,
)
from schemas.base import Record
from schemas.envelope import encode, wrap
from schemas.events import (
    Audience,
    CampaignCreated,
    CampaignHydrated,
    CampaignSendRequested,
    EmailSent,
    MessageTemplate,
    RecipientQueued,
)
from services.common.kafka import make_producer
from services.common.settings import Settings
from services.common.topics import DELIVERIES, EVENTS, RECIPIENTS, ensure_topics, topic_name

DEFAULT_RECIPIENTS = 10_000
DEFAULT_RATE = 1_000.0
QUEUED_PER_TRANSACTION = 2_000
# The group join of a fresh consumer group: deliveries produced before it would measure the
# join, not the projection.
JOIN_WAIT_SECONDS = 3.0
# Bounds on a stuck run: producing, and the projector catching up after the last delivery.
PRODUCE_TIMEOUT_SECONDS = 30.0
CATCH_UP_TIMEOUT_SECONDS = 60.0
ADMIN_TIMEOUT_SECONDS = 30.0
# A template of a realistic size: RecipientQueued carries it for every recipient.
TEMPLATE = MessageTemplate(subject="Spring sale", from_address="news@bench-example.org",
                           body_text="Hello, " * 150, body_html="<p>Hello</p>" * 60)


def _quiet_logger() -> Any:
    return structlog.wrap_logger(
        structlog.PrintLogger(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    ).bind(component="lag-bench-projector")


def measure(base: Settings, recipients: int, rate: float, mode: str = "lanes") -> dict[str, Any]:
    """Run one campaign start through a live projector (`mode`: lanes or single); the lag
    figures in ms."""
    tag = uuid.uuid4().hex[:8]
    settings = base.replace(topic_prefix=f"lag{tag}.")
    tenant, campaign = f"lag-{tag}", f"cmp-lag-{tag}"
    events, queued_topic, deliveries = (
        topic_name(spec, settings) for spec in (EVENTS, RECIPIENTS, DELIVERIES))
    ensure_topics(settings, specs=PROJECTED_TOPICS)
    if mode == "lanes":
        projectors = lane_projectors(settings, logger=_quiet_logger())
    elif mode == "single":
        projectors = [projector_for(settings, logger=_quiet_logger())]
    else:
        raise ValueError(f"mode must be 'lanes' or 'single', not {mode!r}")
    stop = threading.Event()
    runner = threading.Thread(target=run_lanes, args=(projectors, stop), daemon=True)
    runner.start()
    producer = make_producer(settings)
    contacts = [f"k-{i}" for i in range(recipients)]
    queued_committed = 0  # recipients whose RecipientQueued is committed (the sender sees them)
    queued_changed = threading.Condition()
    failures: list[BaseException] = []

    def send(topic: str, key: str, payload: Record, aggregate: str) -> None:
        value = encode(wrap(payload, tenant_id=tenant, aggregate_id=aggregate))
        while True:
            try:
                producer.produce(topic, value, key.encode())
                return
            except BufferError:
                producer.poll(0.01)

    def deliver() -> None:
        # The sender's side: one EmailSent per recipient at `rate`, each once its
        # RecipientQueued is committed.
        try:
            started = time.monotonic()
            for i, contact in enumerate(contacts):
                with queued_changed:
                    while queued_committed <= i:
                        if not queued_changed.wait(PRODUCE_TIMEOUT_SECONDS):
                            raise TimeoutError("RecipientQueued burst stalled")
                due = max(started + i / rate, time.monotonic())
                while (ahead := due - time.monotonic()) > 0:
                    producer.poll(min(ahead, 0.01))
                send(deliveries, campaign, EmailSent(
                    campaign_id=campaign, contact_id=contact, email=f"{contact}@example.com",
                    message_id=f"<{contact}@lag>", attempt=1, smtp_reply="250 OK"), campaign)
                producer.poll(0)
            producer.flush(PRODUCE_TIMEOUT_SECONDS)
        except BaseException as exc:
            failures.append(exc)

    try:
        send(events, campaign, CampaignCreated(name="lag", template=TEMPLATE), campaign)
        send(events, campaign, CampaignSendRequested(
            template=TEMPLATE, audience=Audience(list_ids=["all"]), contacts_snapshot={},
        ), campaign)
        producer.flush(PRODUCE_TIMEOUT_SECONDS)
        time.sleep(JOIN_WAIT_SECONDS)
        fanout = make_producer(settings, **{"transactional.id": f"lag-{tag}-fanout"})
        fanout.init_transactions(PRODUCE_TIMEOUT_SECONDS)
        sender = threading.Thread(target=deliver, daemon=True)
        sender.start()
        for start in range(0, recipients, QUEUED_PER_TRANSACTION):
            fanout.begin_transaction()
            batch = contacts[start:start + QUEUED_PER_TRANSACTION]
            for contact in batch:
                fanout.produce(queued_topic, encode(wrap(RecipientQueued(
                    campaign_id=campaign, contact_id=contact, email=f"{contact}@example.com",
                    template=TEMPLATE), tenant_id=tenant, aggregate_id=contact)),
                    f"{tenant}:{contact}".encode())
            fanout.commit_transaction(PRODUCE_TIMEOUT_SECONDS)
            with queued_changed:
                queued_committed += len(batch)
                queued_changed.notify_all()
        send(events, campaign, CampaignHydrated(total=recipients), campaign)
        sender.join()
        if failures:
            raise failures[0]
        producer.flush(PRODUCE_TIMEOUT_SECONDS)
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            deadline = time.monotonic() + CATCH_UP_TIMEOUT_SECONDS
            while (row := conn.execute("SELECT sent FROM campaigns WHERE campaign_id = %s",
                                       (campaign,)).fetchone()) is None or row[0] < recipients:
                if time.monotonic() > deadline:
                    raise TimeoutError("the projector did not catch up")
                time.sleep(0.1)
            rows = conn.execute(
                "SELECT extract(epoch FROM updated_at - last_event_at) * 1000, last_event_at"
                " FROM campaign_recipients WHERE campaign_id = %s AND status = 'sent'",
                (campaign,)).fetchall()
        cpu = _projector_cpu_seconds(settings, projectors)
    finally:
        stop.set()
        runner.join(ADMIN_TIMEOUT_SECONDS)
        _cleanup(settings, tenant, campaign)
    lags = [float(lag) for lag, _ in rows]
    first = min(at for _, at in rows)
    worst: dict[int, float] = {}
    for lag, at in rows:
        second = int((at - first).total_seconds())
        worst[second] = max(worst.get(second, 0.0), float(lag))
    return {
        "recipients": recipients, "deliveries_per_second": rate, "measured": len(lags),
        "lag_p50_ms": percentile(lags, 50), "lag_p90_ms": percentile(lags, 90),
        "lag_p99_ms": percentile(lags, 99), "lag_max_ms": max(lags),
        "worst_lag_ms_per_second": [round(worst[s]) for s in sorted(worst)],
        "mode": mode,
        "cpu_seconds": cpu,
        "time_split_seconds": {
            projector.group.removeprefix(settings.topic_prefix): {
                k: round(v, 3) for k, v in projector.time_split.items()}
            for projector in projectors},
    }


def _projector_cpu_seconds(settings: Settings,
                           projectors: list[Projector]) -> dict[str, dict[str, float | None]]:
    """Per projector (lane): CPU seconds so far of its Python threads (the driving thread and
    its writer; librdkafka's own threads not included) and of its PostgreSQL backend (None
    where the server is not on this machine), and the transactions it committed: everything
    since it started, which is this campaign."""
    threads = {t.name: t.native_id for t in threading.enumerate()}
    figures: dict[str, dict[str, float | None]] = {}
    for projector in projectors:
        own = [native for name, native in threads.items()
               if name == f"lane-{projector.group}"
               or name.startswith(f"projector-writer-{projector.group}_")]
        backend = backend_cpu_seconds(settings, f"{projector.group}-projector"[:63])
        figures[projector.group.removeprefix(settings.topic_prefix)] = {
            "python_threads": round(sum(cpu_seconds(os.getpid(), n) or 0.0 for n in own), 3),
            "postgres_backend": None if backend is None else round(backend, 3),
            "transactions": projector.batches_committed,
        }
    return figures


def _cleanup(settings: Settings, tenant: str, campaign: str) -> None:
    with psycopg.connect(settings.database_url, autocommit=True) as conn, conn.transaction():
        for table in ("campaign_recipients", "campaigns", "campaign_throughput"):
            conn.execute(f"DELETE FROM {table} WHERE campaign_id = %s",  # noqa: S608
                         (campaign,))
        conn.execute("DELETE FROM tenant_daily_sends WHERE tenant_id = %s", (tenant,))
        conn.execute("DELETE FROM projector_positions WHERE consumer_group = %s",
                     (settings.group(POSITIONS_NAME),))
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    admin.delete_consumer_groups(
        sorted({settings.group(POSITIONS_NAME), *(settings.group(lane.group) for lane in LANES)}),
        request_timeout=ADMIN_TIMEOUT_SECONDS)
    admin.delete_topics([topic_name(spec, settings) for spec in PROJECTED_TOPICS],
                        operation_timeout=ADMIN_TIMEOUT_SECONDS)


def main(argv: list[str]) -> int:
    import json

    from projections.migrate import apply_migrations

    recipients = int(argv[1]) if len(argv) > 1 else DEFAULT_RECIPIENTS
    rate = float(argv[2]) if len(argv) > 2 else DEFAULT_RATE
    mode = argv[3] if len(argv) > 3 else "lanes"
    settings = Settings()
    apply_migrations(settings.database_url)
    print(json.dumps(measure(settings, recipients, rate, mode), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
