"""Sender scale-out: recipients per second with 1, 2 and 4 sender processes.

For each process count N, on fresh topics (own prefix, deleted afterwards): a sink process
adding `latency_ms` per message (`python -m services.smtp_sink`), N `python -m services.sender`
processes that have all joined the group, then N x `recipients_per_sender` RecipientQueued
records produced at once; the figure is recipients / seconds from the first record produced
to the last message the sink accepted. Every recipient must be accepted exactly once, else the
run fails. The work grows with N so that every run lasts about as long: the fixed costs (first
fetch, the slowest sender's last chunk) weigh the same in each figure.

Per-sender concurrency (SENDER_CONCURRENCY, DEFAULT_CONCURRENCY = 2): the question is whether
adding consumers adds throughput, so each sender must be bounded by its own SMTP connections,
not by the machine. With 20 ms of sink latency (plus ~8 ms of SMTP round trips) a sender with
C connections mails at most about C / 0.028 s. With C = 8 (the service default), one sender
already does ~280 mails/s and four would need ~1,100 mails/s of Python SMTP client and sink
work: on a 2-core machine shared with Kafka and PostgreSQL that saturates the CPU, and the
figure then measures the cores, not the group. With C = 2, four senders hold 8 connections in
all, the load one default sender carries, so every run stays latency-bound and the ratio
rate_N / rate_1 shows what the consumer group adds. The concurrency used is part of the
figures (`scaleout_concurrency`); on a machine with more cores, pass a larger one.

Usage from code: `measure_scaleout(settings) -> {"scaleout_rate_1": ..., "scaleout_rate_2":
..., "scaleout_rate_4": ..., "scaleout_concurrency": ..., ...}`, `settings` pointing at a
running Kafka and PostgreSQL (the send ledger). From a shell: `python -m bench.scaleout`
against the `make up` platform. The issue's target: scaleout_rate_N >= 0.85 x N x
scaleout_rate_1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime
from pathlib import Path

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from schemas.envelope import encode, wrap
from schemas.events import MessageTemplate, RecipientQueued
from services.common.kafka import producer_config
from services.common.settings import Settings
from services.common.topics import RECIPIENTS, ensure_topics, topic_name
from services.smtp_sink import count_records, read_records

REPO_ROOT = Path(__file__).resolve().parents[1]
TENANT = "bench"
TEMPLATE = MessageTemplate(subject="Scale-out {{ first_name }}", from_address="bench@example.com",
                           body_text="Hello {{ first_name }},\nthis is a scale-out run.\n")
# Guards against a run that never finishes (a sender that died, a sink that hangs).
RUN_TIMEOUT_SECONDS = 600.0
# Group join of N fresh senders: well above a normal join and rebalance.
JOIN_TIMEOUT_SECONDS = 120.0
# SMTP connections per sender: see the module docstring for why 2 and not the default 8.
DEFAULT_CONCURRENCY = 2
# Recipients per sender process: ~14 s of mail at 2 connections and 20 ms, long enough that
# the first fetch and the last chunk are a small share of each run.
DEFAULT_RECIPIENTS_PER_SENDER = 1000


def measure_scaleout(
    settings: Settings,
    *,
    process_counts: tuple[int, ...] = (1, 2, 4),
    recipients_per_sender: int = DEFAULT_RECIPIENTS_PER_SENDER,
    latency_ms: float = 20.0,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> dict[str, float | int]:
    """recipients/s for each sender process count, keyed `scaleout_rate_<N>`, with the
    conditions they were measured under (`scaleout_*`) and the ratio to N x rate_1."""
    figures: dict[str, float | int] = {
        "scaleout_concurrency": concurrency,
        "scaleout_latency_ms": latency_ms,
        "scaleout_recipients_per_sender": recipients_per_sender,
    }
    for n in process_counts:
        rate = sender_run(settings, n, n * recipients_per_sender, latency_ms, concurrency)
        figures[f"scaleout_rate_{n}"] = round(rate, 1)
    single = figures.get("scaleout_rate_1")
    for n in process_counts:
        if single and n > 1:
            figures[f"scaleout_efficiency_{n}"] = round(
                float(figures[f"scaleout_rate_{n}"]) / (n * float(single)), 3)
    return figures


def sender_run(base: Settings, processes: int, count: int, latency_ms: float,
             concurrency: int, *, sender_env: Mapping[str, str] | None = None,
             alongside: Callable[[], AbstractContextManager[object]] = nullcontext) -> float:
    """recipients/s of one run; `sender_env` is added to the senders' environment, and
    `alongside()` is entered while the recipients are mailed (e.g. a scraper)."""
    settings = fresh_settings(base, "bench")
    ensure_topics(settings)
    records = Path(tempfile.mkdtemp(prefix="scaleout-")) / "sink.jsonl"
    env = process_env(settings, records, concurrency=concurrency, latency_ms=latency_ms)
    senders = {**env, **(sender_env or {})}
    started: list[subprocess.Popen[bytes]] = []
    try:
        started.append(spawn("services.smtp_sink", env))
        wait_listening(settings.smtp_port)
        started += [spawn("services.sender", senders) for _ in range(processes)]
        wait_group(settings, processes)
        batch = recipient_records(count)  # built before the clock starts: only sending is timed
        with alongside():
            begin = time.time()
            produce_records(settings, batch)
            deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
            while count_records(records) < count:
                if time.monotonic() > deadline or any(p.poll() is not None for p in started):
                    raise RuntimeError(f"run with {processes} senders did not finish: "
                                       f"{count_records(records)} of {count} accepted")
                time.sleep(0.2)
        accepted = read_records(records)
    finally:
        stop_processes(started)
        delete_topics(settings)
    recipients = {r["rcpt_tos"][0] for r in accepted}
    if len(accepted) != count or len(recipients) != count:
        raise RuntimeError(f"{len(accepted)} mails to {len(recipients)} recipients, {count} expected")
    last = max(_timestamp(r["received_at"]) for r in accepted)
    return count / (last - begin)


def fresh_settings(base: Settings, label: str) -> Settings:
    """`base` with a fresh topic prefix and a free loopback port for a sink of its own."""
    return base.replace(topic_prefix=f"{label}{uuid.uuid4().hex[:8]}.", smtp_host="127.0.0.1",
                   smtp_port=free_port())


def process_env(settings: Settings, records: Path, *, concurrency: int,
                latency_ms: float) -> dict[str, str]:
    """Environment of the sink and sender processes of one run."""
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "DATABASE_URL": settings.database_url,
        "SMTP_HOST": settings.smtp_host,
        "SMTP_PORT": str(settings.smtp_port),
        "TOPIC_PREFIX": settings.topic_prefix,
        "SENDER_CONCURRENCY": str(concurrency),
        "SINK_RECORD_PATH": str(records),
        "SINK_LATENCY_MS": str(latency_ms),
        "PYTHONUNBUFFERED": "1",
    }


def spawn(module: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", module], env=env, cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_processes(started: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process (last started first), then wait; kill one that ignores it for 30 s
    (a wedged process must not hang the bench)."""
    for process in reversed(started):
        process.terminate()
    for process in started:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def wait_group(settings: Settings, members: int) -> None:
    """Until the sender group has `members` members, each with partitions (a stable group)."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    group = settings.group("sender")
    deadline = time.monotonic() + JOIN_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        try:
            description = admin.describe_consumer_groups([group])[group].result(timeout=10)
        except Exception:  # the group does not exist until the first member joins
            time.sleep(0.5)
            continue
        assigned = [m for m in description.members if m.assignment.topic_partitions]
        if str(description.state).endswith("STABLE") and len(assigned) == members:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{members} senders did not join group {group}")


def recipient_records(count: int, *, start: int = 0,
                      campaign: str | None = None) -> list[tuple[bytes, bytes]]:
    """(key, value) of `count` RecipientQueued records of one fresh campaign, keyed like the
    hydrator's (tenant + contact), contacts c<start> .. c<start + count - 1>."""
    campaign = campaign or f"scaleout-{uuid.uuid4().hex[:8]}"
    out = []
    for i in range(start, start + count):
        recipient = RecipientQueued(campaign_id=campaign, contact_id=f"c{i}",
                                    email=f"person{i}@example.org", first_name=f"P{i}",
                                    template=TEMPLATE)
        envelope = wrap(recipient, tenant_id=TENANT, aggregate_id=campaign)
        out.append((f"{TENANT}:c{i}".encode(), encode(envelope)))
    return out


def produce_records(settings: Settings, records: list[tuple[bytes, bytes]]) -> None:
    """Produce (key, value) records onto campaign.recipients and wait until all are acked."""
    producer = Producer(producer_config(settings))
    topic = topic_name(RECIPIENTS, settings)
    for key, value in records:
        while True:
            try:
                producer.produce(topic, key=key, value=value)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    if producer.flush(60):
        raise RuntimeError("recipients not produced")


def delete_topics(settings: Settings) -> None:
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    mine = [t for t in admin.list_topics(timeout=10).topics if t.startswith(settings.topic_prefix)]
    for future in admin.delete_topics(mine, operation_timeout=30).values() if mine else ():
        future.result()


def _timestamp(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


if __name__ == "__main__":
    print(json.dumps(measure_scaleout(Settings()), indent=2))
