"""Sender scale-out: recipients per second with 1, 2 and 4 sender processes.

For each process count N, on fresh topics (own prefix, deleted afterwards): a sink process
adding `latency_ms` per message (`python -m services.smtp_sink`), N `python -m services.sender`
processes that have all joined the group, then `recipients` RecipientQueued records produced
at once; the figure is recipients / seconds from the first record produced to the last
message the sink accepted. Every recipient must be accepted exactly once, else the run fails.

Usage from code: `measure_scaleout(settings) -> {"scaleout_rate_1": ..., "scaleout_rate_2":
..., "scaleout_rate_4": ...}`, `settings` pointing at a running Kafka and PostgreSQL (the
send ledger). From a shell: `python -m bench.scaleout` against the `make up` platform.
The issue's target: scaleout_rate_N >= 0.85 x N x scaleout_rate_1, as long as the machine has
the cores (with 2 cores, 4 senders and the sink compete for CPU and cannot scale linearly).
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
from dataclasses import replace
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


def measure_scaleout(
    settings: Settings,
    *,
    process_counts: tuple[int, ...] = (1, 2, 4),
    recipients: int = 4000,
    latency_ms: float = 20.0,
    concurrency: int = 8,
) -> dict[str, float]:
    """recipients/s for each sender process count, keyed `scaleout_rate_<N>`."""
    return {
        f"scaleout_rate_{n}": round(_one_run(settings, n, recipients, latency_ms, concurrency), 1)
        for n in process_counts
    }


def _one_run(base: Settings, processes: int, count: int, latency_ms: float,
             concurrency: int) -> float:
    settings = replace(base, topic_prefix=f"bench{uuid.uuid4().hex[:8]}.", smtp_host="127.0.0.1",
                       smtp_port=_free_port())
    ensure_topics(settings)
    records = Path(tempfile.mkdtemp(prefix="scaleout-")) / "sink.jsonl"
    env = {
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
    started: list[subprocess.Popen[bytes]] = []
    try:
        started.append(_spawn("services.smtp_sink", env))
        _wait_listening(settings.smtp_port)
        started += [_spawn("services.sender", env) for _ in range(processes)]
        _wait_group(settings, processes)
        begin = time.time()
        _produce(settings, count)
        deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
        while count_records(records) < count:
            if time.monotonic() > deadline or any(p.poll() is not None for p in started):
                raise RuntimeError(f"run with {processes} senders did not finish: "
                                   f"{count_records(records)} of {count} accepted")
            time.sleep(0.2)
        accepted = read_records(records)
    finally:
        for process in reversed(started):
            process.terminate()
        for process in started:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        _delete_topics(settings)
    recipients = {r["rcpt_tos"][0] for r in accepted}
    if len(accepted) != count or len(recipients) != count:
        raise RuntimeError(f"{len(accepted)} mails to {len(recipients)} recipients, {count} expected")
    last = max(_timestamp(r["received_at"]) for r in accepted)
    return count / (last - begin)


def _spawn(module: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", module], env=env, cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _wait_group(settings: Settings, members: int) -> None:
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


def _produce(settings: Settings, count: int) -> None:
    producer = Producer(producer_config(settings))
    topic = topic_name(RECIPIENTS, settings)
    campaign = f"scaleout-{uuid.uuid4().hex[:8]}"
    for i in range(count):
        recipient = RecipientQueued(campaign_id=campaign, contact_id=f"c{i}",
                                    email=f"person{i}@example.org", first_name=f"P{i}",
                                    template=TEMPLATE)
        envelope = wrap(recipient, tenant_id=TENANT, aggregate_id=campaign)
        while True:
            try:
                producer.produce(topic, key=f"{TENANT}:c{i}".encode(), value=encode(envelope))
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    if producer.flush(60):
        raise RuntimeError("recipients not produced")


def _delete_topics(settings: Settings) -> None:
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    mine = [t for t in admin.list_topics(timeout=10).topics if t.startswith(settings.topic_prefix)]
    for future in admin.delete_topics(mine, operation_timeout=30).values() if mine else ():
        future.result()


def _timestamp(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


if __name__ == "__main__":
    print(json.dumps(measure_scaleout(Settings()), indent=2))
