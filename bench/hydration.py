"""Hydration at scale (issue 3): a 1,000,000-contact audience across 10 lists and a segment.

On fresh topics (own prefix, deleted afterwards), with its own hydrator process:
1. the contacts CSV (bench.contacts_import_bench: contact n in list n % 10, every 10th also in
   a second list, plan in free/pro/team) is imported with the real importer: gives
   csv_import_rows_per_s;
2. the hydrator folds contacts.events into its local RocksDB replicas: hydrator_ingest_rate
   is contact records / seconds from the hydrator's start until its replicas' progress
   (the `hydrator-replicas` group's committed offsets) reaches the end offsets, polled
   every 0.1 s; hydrator_ingest_cpu_us_per_record is the hydrator process's CPU seconds
   (all its threads, /proc, start-up included) over that time per record, the figure to
   compare on a shared machine (the wall rate moves with other people's load);
   hydrator_ingest_startup_s is how long until the first replica progress showed (interpreter
   start and imports, the replicas' first batch), hydrator_ingest_rate_after_startup the
   records over the time after it (the import's own clock starts in a running interpreter),
   and hydrator_ingest_broker_cpu_s the local broker's CPU
   over the ingest;
3. a CampaignSendRequested naming the 10 lists and the segment `plan = team` (which names no
   one new: every contact is in a list, so the dedup is exercised across 11 sources) is
   published to campaign.events; hydration_rate is recipients / seconds from just before that
   publish until a throwaway read_committed consumer sees CampaignHydrated, which the gather
   commits after every partition's fan-out transaction committed (all RecipientQueued
   acknowledged and visible);
4. hydrator_peak_rss_mb: the hydrator's VmHWM, reset after ingest, read after hydration (the
   fan-out's peak); hydrator_ingest_peak_rss_mb: its VmHWM over ingest;
5. raw_produce_rate: a plain confluent-kafka producer sending as many RecipientQueued-sized
   messages to a fresh 12-partition topic, in the same run (bench.contacts_import_bench).

Checks: CampaignHydrated.total equals the number of contacts, and nobody was excluded.
Standalone: `python -m bench.hydration --contacts 1000000` (KAFKA_BOOTSTRAP_SERVERS etc. from
the environment; against the test platform: KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:39092).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from bench.campaign import template
from bench.contacts_import_bench import (
    broker_pid,
    delete_prefixed_topics,
    measure_csv_import,
    measure_raw_produce,
    process_cpu_seconds,
)
from bench.proc_cpu import cpu_seconds
from bench.process_memory import peak_rss_mb, reset_peak_rss
from schemas.envelope import decode, encode, wrap
from schemas.events import Audience, AudienceSegment, CampaignHydrated, CampaignSendRequested
from schemas.segments import parse_criteria
from services.common.kafka import make_producer
from services.common.settings import Settings
from services.common.topics import CONTACTS, EVENTS, ensure_topics, topic_name
from services.hydrator.replica import REPLICAS_GROUP

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONTACTS = 1_000_000
# BENCH_SCALE=small: a quick run.
SMALL_CONTACTS = 100_000
LISTS = 10
# Bounds each wait: ingest and hydration of a million contacts take minutes, not hours.
WAIT_SECONDS = 1800.0
# How often the ingest's progress is read: the figure's resolution.
PROGRESS_POLL_SECONDS = 0.1


def _end_offsets(admin: AdminClient, topic: str, partitions: int) -> dict[int, int]:
    request = {TopicPartition(topic, p): OffsetSpec.latest() for p in range(partitions)}
    return {tp.partition: f.result().offset for tp, f in admin.list_offsets(request).items()}


def _progress_probe(settings: Settings) -> Consumer:
    """A consumer of the replicas' group that only reads its committed offsets (made before
    the clock starts, reused for every poll)."""
    return Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers,
                     "group.id": settings.group(REPLICAS_GROUP), "enable.auto.commit": False})


def _consumed(probe: Consumer, topic: str, partitions: int) -> dict[int, int]:
    """How far the hydrator's contact replicas got: their group's committed offsets on
    `topic` (negative when none yet)."""
    committed = probe.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=30)
    return {tp.partition: tp.offset for tp in committed}


def _start_hydrator(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "TOPIC_PREFIX": settings.topic_prefix,
        "CAMPAIGN_STATE_DIR": str(settings.state_dir),
        "PYTHONUNBUFFERED": "1",
    }
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen([sys.executable, "-m", "services.hydrator"], env=env, cwd=REPO_ROOT,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _wait_hydrated(settings: Settings, campaign: str, proc: subprocess.Popen[bytes]) -> CampaignHydrated:
    reader = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers,
                       "group.id": f"bench-{uuid.uuid4()}", "auto.offset.reset": "earliest",
                       "enable.auto.commit": False, "isolation.level": "read_committed"})
    reader.subscribe([topic_name(EVENTS, settings)])
    deadline = time.monotonic() + WAIT_SECONDS
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the hydrator exited with {proc.returncode}")
            for msg in reader.consume(500, 0.05):
                if msg.error() is not None:
                    continue
                message = decode(msg.value())
                payload = message.payload
                if isinstance(payload, CampaignHydrated) and message.envelope.aggregate_id == campaign:
                    return payload
    finally:
        reader.close()
    raise TimeoutError("no CampaignHydrated")


def measure_hydration(
    settings: Settings, contacts: int = DEFAULT_CONTACTS, *, say: Any = print,
) -> dict[str, Any]:
    """Run the steps of the module docstring under `settings` (fresh topics are created under
    its prefix and deleted afterwards); returns the figures."""
    ensure_topics(settings)
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    contacts_topic = topic_name(CONTACTS, settings)
    figures: dict[str, Any] = {"hydration_contacts": contacts}
    proc: subprocess.Popen[bytes] | None = None
    try:
        say(f"hydration: importing {contacts:,} contacts over {LISTS} lists")
        imported = measure_csv_import(settings, contacts, lists=LISTS, stages=False)
        figures.update(imported)
        tenant = imported["csv_import_tenant_id"]
        ends = _end_offsets(admin, contacts_topic, CONTACTS.partitions)

        say("hydration: hydrator ingesting contacts.events")
        broker = broker_pid(settings.kafka_bootstrap_servers)
        probe = _progress_probe(settings)
        _consumed(probe, contacts_topic, CONTACTS.partitions)  # connected before the clock starts
        broker_before = process_cpu_seconds(broker)
        started = time.monotonic()
        log_path = settings.state_dir / "bench-logs" / f"{settings.topic_prefix}hydrator.log"
        proc = _start_hydrator(settings, log_path)
        first_progress: float | None = None
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the hydrator exited with {proc.returncode}")
            consumed = _consumed(probe, contacts_topic, CONTACTS.partitions)
            if first_progress is None and any(offset > 0 for offset in consumed.values()):
                first_progress = time.monotonic() - started
            if all(consumed.get(p, -1) >= end for p, end in ends.items()):
                break
            if time.monotonic() - started > WAIT_SECONDS:
                raise TimeoutError("the hydrator never caught up with contacts.events")
            time.sleep(PROGRESS_POLL_SECONDS)
        ingest_seconds = time.monotonic() - started
        probe.close()
        records = sum(ends.values())
        ingest_cpu = cpu_seconds(proc.pid)
        broker_after = process_cpu_seconds(broker)
        figures["hydrator_ingest_seconds"] = round(ingest_seconds, 2)
        figures["hydrator_ingest_rate"] = round(records / ingest_seconds, 1)
        figures["hydrator_ingest_startup_s"] = round(first_progress or ingest_seconds, 2)
        # The fold alone, from the first progress seen: comparable with the import's rate,
        # whose clock starts in a running interpreter with its modules loaded.
        folding = ingest_seconds - (first_progress or 0.0)
        figures["hydrator_ingest_rate_after_startup"] = (
            round(records / folding, 1) if first_progress is not None and folding > 0 else None)
        figures["hydrator_ingest_cpu_s"] = None if ingest_cpu is None else round(ingest_cpu, 2)
        figures["hydrator_ingest_cpu_us_per_record"] = (
            round(ingest_cpu / records * 1e6, 2) if ingest_cpu is not None and records else None)
        figures["hydrator_ingest_broker_cpu_s"] = (
            round(broker_after - broker_before, 2)
            if broker_before is not None and broker_after is not None else None)
        figures["hydrator_ingest_peak_rss_mb"] = peak_rss_mb(proc.pid)
        reset_peak_rss({"hydrator": proc.pid})

        campaign = f"bench-{uuid.uuid4().hex[:12]}"
        audience = Audience(
            list_ids=list(imported["csv_import_list_ids"]),
            segments=[AudienceSegment(segment_id="team", criteria=parse_criteria(
                {"op": "eq", "field": "attr.plan", "value": "team"}))],
        )
        send = CampaignSendRequested(template=template(), audience=audience, contacts_snapshot=ends)
        say(f"hydration: fanning out campaign {campaign}")
        producer = make_producer(settings)
        started = time.monotonic()
        producer.produce(topic_name(EVENTS, settings), key=campaign.encode(),
                         value=encode(wrap(send, tenant_id=tenant, aggregate_id=campaign)))
        producer.flush(30)
        hydrated = _wait_hydrated(settings, campaign, proc)
        seconds = time.monotonic() - started
        figures.update({
            "hydration_seconds_1m": round(seconds, 2),
            "hydration_rate": round(hydrated.total / seconds, 1),
            "hydration_total": hydrated.total,
            "hydration_excluded": hydrated.excluded,
            "hydrator_peak_rss_mb": peak_rss_mb(proc.pid),
            "hydration_ok": hydrated.total == contacts and not hydrated.excluded,
        })
        say(f"hydration: {hydrated.total:,} recipients in {seconds:.1f} s; raw produce of as many")
        figures.update(measure_raw_produce(settings, hydrated.total))
        raw = figures.get("raw_produce_rate")
        figures["hydration_to_raw_produce_ratio"] = round(figures["hydration_rate"] / raw, 3) if raw else None
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        delete_prefixed_topics(settings)
        # The replicas of this run's throwaway topics (hundreds of MB at full size).
        shutil.rmtree(settings.state_dir / "hydrator" / settings.topic_prefix, ignore_errors=True)
    return figures


def contacts_wanted(env: dict[str, str]) -> int:
    """BENCH_AUDIENCE_CONTACTS=N, else 100,000 under BENCH_SCALE=small, else 1,000,000."""
    if env.get("BENCH_AUDIENCE_CONTACTS"):
        return int(env["BENCH_AUDIENCE_CONTACTS"])
    return SMALL_CONTACTS if env.get("BENCH_SCALE") == "small" else DEFAULT_CONTACTS


HEADLINE = ("csv_import_rows_per_s", "csv_import_rows", "hydration_rate", "hydration_contacts",
            "raw_produce_rate", "hydration_to_raw_produce_ratio", "hydrator_peak_rss_mb",
            "hydrator_ingest_rate", "hydrator_ingest_peak_rss_mb", "hydrator_ingest_cpu_us_per_record")


def headline(figures: dict[str, Any]) -> dict[str, Any]:
    """The issue's top-level figures (None when the step failed)."""
    return {name: figures.get(name) for name in HEADLINE}


def failures(figures: dict[str, Any]) -> list[str]:
    out = []
    if not figures.get("csv_import_ok"):
        out.append(f"audience import: {figures.get('csv_import_imported')} of"
                   f" {figures.get('csv_import_rows')} rows imported")
    if not figures.get("hydration_ok"):
        out.append(f"hydration: total {figures.get('hydration_total')}, excluded"
                   f" {figures.get('hydration_excluded')};"
                   f" expected {figures.get('hydration_contacts')} queued")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--contacts", type=int, default=DEFAULT_CONTACTS)
    args = parser.parse_args(argv)
    base = Settings()
    settings = base.replace(topic_prefix=f"{base.topic_prefix}hyb{uuid.uuid4().hex[:8]}.")
    figures = measure_hydration(settings, args.contacts)
    print(json.dumps(figures, indent=2))
    return 0 if figures.get("hydration_ok") else 1


if __name__ == "__main__":
    sys.exit(main())
