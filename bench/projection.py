"""Projection throughput (issue 5): the real Projector replaying a backlog of delivery events,
against a plain COPY of the same rows.

- projection_rate: N EmailSent events for N distinct recipients of a few campaigns (plus each
  campaign's CampaignCreated, CampaignSendRequested and CampaignHydrated, so the campaign rows
  exist and complete) are produced onto fresh topics (prefix `bench<hex>.`), then a fresh
  `Projector` (its consumer group is namespaced by the prefix, so it starts cold from offset
  zero) drains them until `caught_up()`. Clock: monotonic, from constructing the Projector
  (subscribe, group join, position load included) to caught up. Rate: N / that time. The read
  model must then show exactly N sent (campaigns.sent summed, and N 'sent' recipient rows).
- raw_copy_rate: the same N rows (tenant_id, campaign_id, contact_id, email, status, attempts,
  updated_at) written by psycopg's `cursor.copy()` into a fresh scratch table created
  `LIKE campaign_recipients INCLUDING ALL` (same columns, defaults, checks and primary key)
  with the read model's storage parameters (its fillfactor), LOGGED like the read model: the
  baseline is a plain COPY into a table like the real target, written to the WAL as the real
  target is. One transaction, commit included; rows per second.
- raw_copy_rate_unlogged: the same COPY into an UNLOGGED twin (no WAL, default storage): the
  baseline used before (until 0006), kept so the two baselines can be told apart. Both COPYs
  run in the same run, one after the other, each into its own fresh table.
- projection_to_copy_ratio: projection_rate / raw_copy_rate (issue 5 target: >= 0.5);
  projection_to_unlogged_copy_ratio against the unlogged COPY.
- projection.time_split_seconds: where the drain's time went inside the Projector. Driving
  thread: consume (Kafka fetch; the first one includes the group join), decode (JSON +
  checks; the fast path for EmailSent/EmailFailed v2), plan (row changes), wait (for the
  writer thread). Writer thread, overlapping the next batch's consume, decode and plan: write
  (the PostgreSQL transaction: positions, COPY into the staging table, the recipients
  statement with its counters, commit). end_checks: the drain loop's caught_up() calls (an
  end-offset look-up at the broker after each batch). consume + decode + plan + wait +
  end_checks is about drain_seconds.
- The drain runs with the projector service's process settings (GIL switch interval, garbage
  collection: projections.projector.projecting_process, as run_lanes sets them).
- projection.cpu_seconds: CPU time during the drain of the bench process (the projector's
  threads, librdkafka's included; nothing else runs in it meanwhile) and of the PostgreSQL
  backend serving the projector (from /proc, so only where the server runs on this machine;
  else null). On a shared machine these say more than wall-clock rates.

Run alone against a running platform (migrations applied on the way):
`KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:39092 DATABASE_URL=postgresql://campaigns@127.0.0.1:35432/campaigns_test
.venv/bin/python -m bench.projection 200000`.

Afterwards the bench's campaigns, recipient rows and throughput rows (by campaign id), its
daily sends (by its tenant), the group's stored positions and Kafka consumer group, the scratch
tables and the bench topics are deleted.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
import structlog
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from psycopg import sql

from bench.proc_cpu import cpu_seconds
from bench.stats import rate
from projections.lanes import PROJECTED_TOPICS, projecting_process
from projections.projector import projector_for
from schemas.base import Record
from schemas.envelope import encode, wrap
from schemas.events import (
    Audience,
    CampaignCreated,
    CampaignHydrated,
    CampaignSendRequested,
    EmailSent,
    MessageTemplate,
)
from services.common.kafka import make_producer
from services.common.settings import Settings
from services.common.topics import DELIVERIES, EVENTS, ensure_topics, topic_name

DEFAULT_EVENTS = 200_000
SMALL_EVENTS = 20_000
# "A few campaigns": the deliveries spread over several of the topic's partitions.
CAMPAIGNS = 4
# Producer queue: large enough that producing the backlog rarely waits on the broker.
PRODUCER_QUEUE_MESSAGES = 500_000
PRODUCE_TIMEOUT_SECONDS = 120.0
# Bound on the cold drain: far above what a healthy projector needs.
DRAIN_BASE_TIMEOUT_SECONDS = 120.0
DRAIN_SECONDS_PER_EVENT = 0.005
ADMIN_TIMEOUT_SECONDS = 30.0
COPY_COLUMNS = ("tenant_id", "campaign_id", "contact_id", "email", "status", "attempts",
                "updated_at")


class ProjectionBenchFailed(RuntimeError):
    """The backlog could not be produced, or the projector did not catch up."""


@dataclass
class ProjectionRun:
    events: int  # delivery events in the backlog (= distinct recipients)
    campaigns: int
    produce_seconds: float
    drain_seconds: float  # Projector() -> caught_up()
    first_batch_seconds: float | None  # Projector() -> first batch committed (join + load)
    records_applied: int  # every record the projector covered (deliveries + campaign facts)
    copy_seconds: float  # the logged COPY (the baseline)
    copy_rows: int
    unlogged_copy_seconds: float
    projected_sent: int
    projected_failed: int
    projected_rows_sent: int
    completed_campaigns: int
    topic_prefix: str
    # Where the drain's time went (Projector.time_split): consume, decode, plan, write.
    time_split: dict[str, float] = field(default_factory=dict)
    projector_cpu_seconds: float | None = None
    postgres_backend_cpu_seconds: float | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def projection_rate(self) -> float | None:
        return rate(self.events, self.drain_seconds)

    @property
    def raw_copy_rate(self) -> float | None:
        return rate(self.copy_rows, self.copy_seconds)

    @property
    def raw_copy_rate_unlogged(self) -> float | None:
        return rate(self.copy_rows, self.unlogged_copy_seconds)

    def figures(self) -> dict[str, Any]:
        """The run's figures for the results JSON."""
        proj, copy = self.projection_rate, self.raw_copy_rate
        unlogged = self.raw_copy_rate_unlogged
        return {
            "projection_rate": None if proj is None else round(proj, 1),
            "raw_copy_rate": None if copy is None else round(copy, 1),
            "projection_to_copy_ratio": round(proj / copy, 3) if proj and copy else None,
            "raw_copy_rate_unlogged": None if unlogged is None else round(unlogged, 1),
            "projection_to_unlogged_copy_ratio": round(proj / unlogged, 3)
            if proj and unlogged else None,
            "projection": {
                "delivery_events": self.events,
                "campaigns": self.campaigns,
                "records_applied": self.records_applied,
                "drain_seconds": round(self.drain_seconds, 3),
                "first_batch_seconds": None if self.first_batch_seconds is None
                else round(self.first_batch_seconds, 3),
                "produce_seconds": round(self.produce_seconds, 3),
                "copy_rows": self.copy_rows,
                "copy_seconds": round(self.copy_seconds, 3),
                "unlogged_copy_seconds": round(self.unlogged_copy_seconds, 3),
                "copy_baseline": "logged table LIKE campaign_recipients INCLUDING ALL, with its"
                                 " storage parameters (raw_copy_rate); UNLOGGED twin with"
                                 " default storage (raw_copy_rate_unlogged)",
                "read_model_sent": self.projected_sent,
                "read_model_failed": self.projected_failed,
                "recipient_rows_sent": self.projected_rows_sent,
                "completed_campaigns": self.completed_campaigns,
                "topic_prefix": self.topic_prefix,
                "time_split_seconds": {k: round(v, 3) for k, v in self.time_split.items()},
                "cpu_seconds": {
                    "projector_process": _rounded(self.projector_cpu_seconds),
                    "postgres_backend": _rounded(self.postgres_backend_cpu_seconds),
                },
                "method": "cold drain of a fresh group by projections.projector.Projector, "
                          "Projector() -> caught_up(), vs psycopg COPY of the same rows into a "
                          "logged table LIKE campaign_recipients INCLUDING ALL (same storage "
                          "parameters); also into an UNLOGGED one",
            },
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def events_wanted(env: dict[str, str]) -> int:
    if "BENCH_PROJECTION_EVENTS" in env:
        return int(env["BENCH_PROJECTION_EVENTS"])
    if env.get("BENCH_SCALE", "").lower() == "small":
        return SMALL_EVENTS
    return DEFAULT_EVENTS


@dataclass(frozen=True)
class Backlog:
    tenant_id: str
    campaign_ids: list[str]
    # (campaign_id, contact_id, email) per delivery, in production order.
    recipients: list[tuple[str, str, str]]


def make_backlog(tag: str, count: int) -> Backlog:
    tenant = f"bench-{tag}"
    campaigns = [f"cmp-projbench-{tag}-{i}" for i in range(CAMPAIGNS)]
    recipients = [
        (campaigns[i % CAMPAIGNS], f"contact-{tag}-{i}", f"person.{i}@{tenant}.example.com")
        for i in range(count)
    ]
    return Backlog(tenant, campaigns, recipients)


def _quiet_logger() -> Any:
    """The projector's own logger, warnings and errors only (no per-batch debug lines)."""
    return structlog.wrap_logger(
        structlog.PrintLogger(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    ).bind(component="bench-projector")


def produce_backlog(settings: Settings, backlog: Backlog) -> float:
    """Campaign facts onto campaign.events, then one EmailSent per recipient onto
    campaign.deliveries (keyed by campaign id, as the sender does); returns the seconds."""
    template = MessageTemplate(subject="projection bench", from_address="news@bench-example.org",
                               body_text="hi")
    per_campaign: dict[str, int] = {c: 0 for c in backlog.campaign_ids}
    for campaign_id, _, _ in backlog.recipients:
        per_campaign[campaign_id] += 1
    errors: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    producer = make_producer(settings, **{"linger.ms": 20,
                                          "queue.buffering.max.messages": PRODUCER_QUEUE_MESSAGES})
    events_topic, deliveries_topic = topic_name(EVENTS, settings), topic_name(DELIVERIES, settings)
    started = time.monotonic()

    def send(topic: str, key: str, payload: Record, campaign_id: str) -> None:
        value = encode(wrap(payload, tenant_id=backlog.tenant_id, aggregate_id=campaign_id))
        while True:
            try:
                producer.produce(topic, value, key.encode(), on_delivery=on_delivery)
                return
            except BufferError:
                producer.poll(0.1)

    for campaign_id, total in per_campaign.items():
        send(events_topic, campaign_id, CampaignCreated(name="projection bench",
                                                        template=template), campaign_id)
        send(events_topic, campaign_id, CampaignSendRequested(
            template=template, audience=Audience(list_ids=["everyone"]), contacts_snapshot={},
        ), campaign_id)
        send(events_topic, campaign_id, CampaignHydrated(total=total), campaign_id)
    for i, (campaign_id, contact_id, email) in enumerate(backlog.recipients):
        send(deliveries_topic, campaign_id, EmailSent(
            campaign_id=campaign_id, contact_id=contact_id, email=email,
            message_id=f"<{contact_id}@bench>", attempt=1, smtp_reply="250 OK",
        ), campaign_id)
        if i % 1000 == 0:
            producer.poll(0)
    remaining = producer.flush(PRODUCE_TIMEOUT_SECONDS)
    seconds = time.monotonic() - started
    if remaining or errors:
        raise ProjectionBenchFailed(f"backlog not produced: {remaining} undelivered,"
                                    f" errors {errors[:3]}")
    return seconds


@dataclass(frozen=True)
class Drained:
    seconds: float  # Projector() -> caught_up()
    first_batch_seconds: float | None
    records_applied: int
    time_split: dict[str, float]
    process_cpu_seconds: float
    backend_cpu_seconds: float | None


def backend_cpu_seconds(settings: Settings, application_name: str) -> float | None:
    """CPU seconds used so far by the PostgreSQL backend of the session named
    `application_name`, from /proc; None where the server is not on this machine (or /proc
    does not tell)."""
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        row = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                           (application_name,)).fetchone()
    if row is None:
        return None
    return cpu_seconds(row[0])


def drain(settings: Settings, count: int) -> Drained:
    """Cold drain by a fresh Projector (the clock and CPU counters as the module says)."""
    timeout = DRAIN_BASE_TIMEOUT_SECONDS + DRAIN_SECONDS_PER_EVENT * count
    # As the projector service's run_lanes does; restored after, for the other bench steps.
    with projecting_process():
        cpu_started = time.process_time()
        started = time.monotonic()
        first: float | None = None
        checks = 0.0  # in caught_up(): the end-offset look-ups
        with projector_for(settings, logger=_quiet_logger()) as projector:
            deadline = started + timeout
            while True:
                if projector.poll_once() and first is None:
                    first = time.monotonic() - started
                if projector.records_applied:
                    checked = time.monotonic()
                    done = projector.caught_up()
                    checks += time.monotonic() - checked
                    if done:
                        break
                if time.monotonic() > deadline:
                    raise ProjectionBenchFailed(
                        f"projector not caught up after {timeout:g} s"
                        f" ({projector.records_applied:,} records applied)")
            seconds = time.monotonic() - started
            process_cpu = time.process_time() - cpu_started
            # The backend was started for this projector (on its first assignment): all its
            # CPU time is the drain's.
            backend_cpu = backend_cpu_seconds(settings, f"{projector.group}-projector"[:63])
            return Drained(seconds, first, projector.records_applied,
                           {**projector.time_split, "end_checks": checks}, process_cpu,
                           backend_cpu)


def raw_copy(conn: psycopg.Connection[Any], backlog: Backlog, table: str, *,
             logged: bool) -> float:
    """COPY the backlog's rows into a fresh twin of campaign_recipients; seconds.

    Logged: the read model's storage parameters too (a table like the real target); unlogged:
    no WAL and default storage (the earlier baseline).
    """
    ident = sql.Identifier(table)
    if logged:
        row = conn.execute("SELECT reloptions FROM pg_class"
                           " WHERE oid = 'campaign_recipients'::regclass").fetchone()
        options = sql.SQL(" WITH ({})").format(sql.SQL(", ").join(
            sql.SQL(option) for option in row[0])) if row and row[0] else sql.SQL("")
        conn.execute(sql.SQL("CREATE TABLE {} (LIKE campaign_recipients INCLUDING ALL){}")
                     .format(ident, options))
    else:
        conn.execute(sql.SQL("CREATE UNLOGGED TABLE {} (LIKE campaign_recipients INCLUDING ALL)")
                     .format(ident))
    now = datetime.now(UTC)
    rows = [(backlog.tenant_id, c, contact, email, "sent", 1, now)
            for c, contact, email in backlog.recipients]
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        ident, sql.SQL(", ").join(sql.Identifier(c) for c in COPY_COLUMNS))
    started = time.monotonic()
    with conn.transaction(), conn.cursor() as cur, cur.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)
    return time.monotonic() - started


def read_model_counts(conn: psycopg.Connection[Any], backlog: Backlog) -> tuple[int, int, int, int]:
    """(sum of sent, sum of failed, recipient rows 'sent', campaigns completed)."""
    ids = backlog.campaign_ids
    row = conn.execute(
        "SELECT coalesce(sum(sent), 0), coalesce(sum(failed), 0),"
        " count(*) FILTER (WHERE status = 'completed')"
        " FROM campaigns WHERE campaign_id = ANY(%s) AND tenant_id = %s",
        (ids, backlog.tenant_id)).fetchone()
    rows = conn.execute(
        "SELECT count(*) FROM campaign_recipients"
        " WHERE campaign_id = ANY(%s) AND tenant_id = %s AND status = 'sent'",
        (ids, backlog.tenant_id)).fetchone()
    assert row is not None and rows is not None
    return int(row[0]), int(row[1]), int(rows[0]), int(row[2])


def cleanup(settings: Settings, backlog: Backlog, tables: list[str]) -> list[str]:
    """Delete everything the step created; returns what could not be deleted (in words)."""
    problems: list[str] = []
    group = settings.group("projector")
    try:
        with psycopg.connect(settings.database_url, autocommit=True) as conn, \
                conn.transaction():
            conn.execute("DELETE FROM campaign_recipients WHERE campaign_id = ANY(%s)",
                         (backlog.campaign_ids,))
            conn.execute("DELETE FROM campaigns WHERE campaign_id = ANY(%s)",
                         (backlog.campaign_ids,))
            conn.execute("DELETE FROM campaign_throughput WHERE campaign_id = ANY(%s)",
                         (backlog.campaign_ids,))
            conn.execute("DELETE FROM tenant_daily_sends WHERE tenant_id = %s",
                         (backlog.tenant_id,))
            conn.execute("DELETE FROM projector_positions WHERE consumer_group = %s", (group,))
            for table in tables:
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
    except psycopg.Error as exc:
        problems.append(f"database cleanup: {exc}")
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    try:
        for future in admin.delete_consumer_groups(
                [group], request_timeout=ADMIN_TIMEOUT_SECONDS).values():
            future.result()
    except KafkaException as exc:
        if "GROUP_ID_NOT_FOUND" not in str(exc):
            problems.append(f"consumer group {group}: {exc}")
    topics = [topic_name(spec, settings) for spec in PROJECTED_TOPICS]
    for name, future in admin.delete_topics(
            topics, operation_timeout=ADMIN_TIMEOUT_SECONDS).items():
        try:
            future.result()
        except KafkaException as exc:
            if "UNKNOWN_TOPIC" not in str(exc):
                problems.append(f"topic {name}: {exc}")
    return problems


def measure(base: Settings, count: int, *, say: Any = print) -> ProjectionRun:
    """The whole step: backlog, cold drain, verification, COPY, cleanup.

    Raises ProjectionBenchFailed when the backlog cannot be produced or drained; a read model
    that does not show exactly `count` sent is reported in `failures`.
    """
    tag = uuid.uuid4().hex[:8]
    settings = base.replace(topic_prefix=f"bench{tag}.")
    backlog = make_backlog(tag, count)
    tables = [f"bench_copy_{tag}", f"bench_copy_unlogged_{tag}"]
    try:
        ensure_topics(settings, specs=PROJECTED_TOPICS)
        say(f"projection: producing {count:,} EmailSent for {CAMPAIGNS} campaigns onto"
            f" {settings.topic_prefix}* …")
        produced = produce_backlog(settings, backlog)
        say(f"projection: produced in {produced:.2f} s; cold drain by a fresh Projector …")
        drained = drain(settings, count)
        drain_seconds, applied = drained.seconds, drained.records_applied
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            sent, failed, rows_sent, completed = read_model_counts(conn, backlog)
            say(f"projection: drained in {drain_seconds:.2f} s; COPY of {count:,} rows"
                " (logged, then unlogged) …")
            copy_seconds = raw_copy(conn, backlog, tables[0], logged=True)
            unlogged_seconds = raw_copy(conn, backlog, tables[1], logged=False)
        run = ProjectionRun(
            events=count, campaigns=CAMPAIGNS, produce_seconds=produced,
            drain_seconds=drain_seconds, first_batch_seconds=drained.first_batch_seconds,
            records_applied=applied, copy_seconds=copy_seconds, copy_rows=count,
            unlogged_copy_seconds=unlogged_seconds,
            projected_sent=sent, projected_failed=failed, projected_rows_sent=rows_sent,
            completed_campaigns=completed, topic_prefix=settings.topic_prefix,
            time_split=drained.time_split, projector_cpu_seconds=drained.process_cpu_seconds,
            postgres_backend_cpu_seconds=drained.backend_cpu_seconds,
        )
        if sent != count or rows_sent != count or failed != 0:
            run.failures.append(
                f"projection: read model shows sent {sent:,} (recipient rows {rows_sent:,}),"
                f" failed {failed:,}; expected exactly {count:,} sent")
        if completed != CAMPAIGNS:
            run.failures.append(f"projection: {completed} of {CAMPAIGNS} bench campaigns"
                                " completed")
        if applied != count + 3 * CAMPAIGNS:
            run.failures.append(f"projection: {applied:,} records applied, expected"
                                f" {count + 3 * CAMPAIGNS:,}")
        return run
    finally:
        for problem in cleanup(settings, backlog, tables):
            say(f"projection cleanup: {problem}")


def main(argv: list[str]) -> int:
    """`python -m bench.projection [EVENTS]`: this step alone, against the platform that
    KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL name (migrations applied); prints the figures."""
    import json

    from projections.migrate import apply_migrations

    count = int(argv[1]) if len(argv) > 1 else events_wanted(dict(os.environ))
    settings = Settings()
    apply_migrations(settings.database_url)
    run = measure(settings, count)
    print(json.dumps({**run.figures(), "failures": run.failures}, indent=2))
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
