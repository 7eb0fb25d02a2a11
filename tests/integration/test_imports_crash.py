"""An import job survives a SIGKILL of the API process mid-run: the restarted API takes the
job up again and every row of the upload ends on contacts.events (idempotent re-import: the
same contact ids, so the contacts are exactly the file's)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition

from services.common.settings import Settings
from services.common.topics import CONTACTS, topic_name
from tests.ports import free_ports
from tests.service_process import ServiceProcess

pytestmark = pytest.mark.integration

ROWS = 120_000
# Start-up of the API process (imports, pool, migrations already applied) on a busy machine.
READY_WITHIN_S = 60.0
# 120,000 rows at well over 10,000 rows/s, twice, on 2 shared cores.
DONE_WITHIN_S = 180.0


def _wait_ready(base: str, key: str, proc: ServiceProcess) -> None:
    deadline = time.monotonic() + READY_WITHIN_S
    while time.monotonic() < deadline:
        assert proc.running(), proc.log_tail()
        try:
            if httpx.get(f"{base}/imports", headers={"Authorization": f"Bearer {key}"},
                         timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"API not ready:\n{proc.log_tail()}")


def _job(base: str, key: str, job_id: str) -> dict[str, Any]:
    got = httpx.get(f"{base}/imports/{job_id}", headers={"Authorization": f"Bearer {key}"},
                    timeout=5)
    assert got.status_code == 200, got.text
    job: dict[str, Any] = got.json()
    return job


def _distinct_keys(settings: Settings) -> tuple[set[bytes], int]:
    """Distinct keys and all records of contacts.events, read to its end."""
    topic = topic_name(CONTACTS, settings)
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers,
                         "group.id": f"crash-reader-{uuid.uuid4()}", "enable.auto.commit": False,
                         "auto.offset.reset": "earliest"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in partitions}
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        keys: set[bytes] = set()
        records = 0
        done = {p for p, end in ends.items() if end == 0}
        deadline = time.monotonic() + 120
        while len(done) < len(ends) and time.monotonic() < deadline:
            for msg in consumer.consume(10_000, 1.0):
                if msg.error():
                    continue
                records += 1
                keys.add(msg.key() or b"")
                if (msg.offset() or 0) + 1 >= ends[msg.partition() or 0]:
                    done.add(msg.partition())
        return keys, records
    finally:
        consumer.close()


def test_a_job_killed_mid_import_is_finished_after_restart(settings, tmp_path) -> None:
    tenant, key = f"crash-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    (port,) = free_ports(1)
    base = f"http://127.0.0.1:{port}"
    env = {"API_PORT": str(port), "API_KEYS": f"{tenant}:{key}"}
    body = ("email,first_name\n" + "".join(f"k{i}@example.org,N{i}\n" for i in range(ROWS))).encode()
    first = ServiceProcess("api", settings, tmp_path, **env).start()
    try:
        _wait_ready(base, key, first)
        accepted = httpx.post(f"{base}/imports", content=body, timeout=60,
                              headers={"Authorization": f"Bearer {key}", "Content-Type": "text/csv"})
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["job_id"]
        deadline = time.monotonic() + DONE_WITHIN_S
        while True:  # kill once the run has written progress, before it is done
            job = _job(base, key, job_id)
            assert job["state"] != "done", "the import finished before it could be killed"
            if job["state"] == "running" and job["rows_done"] > 0:
                break
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        first.kill()
        killed_at_rows = job["rows_done"]
    finally:
        if first.running():
            first.stop()
    second = ServiceProcess("api", settings, tmp_path, **env).start()
    try:
        _wait_ready(base, key, second)
        deadline = time.monotonic() + DONE_WITHIN_S
        while (job := _job(base, key, job_id))["state"] not in ("done", "failed"):
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
    finally:
        second.stop()
    print(f"\nkilled at {killed_at_rows}/{ROWS} rows; after restart: {job}")
    assert (job["state"], job["imported"], job["rejected_count"], job["attempts"]) == (
        "done", ROWS, 0, 2), job
    keys, records = _distinct_keys(settings)
    assert len(keys) == ROWS  # every contact of the file, and no other
    assert records >= ROWS  # the first run's rows are there twice (same contact, same fields)
