"""Figures of issue 3's audience at scale: the CSV import rate and the raw produce rate beside it.

- `write_contacts_csv(path, contacts, lists=10)`: a contacts file the import and the
  hydration bench share, with its expected audience (`ContactsFile`): contact n is
  `user{n}@example.com`, member of list n % lists (and, every 10th contact, of a second
  list, so list audiences overlap: a send to all lists reaches each contact once), attributes
  `plan` in {free, pro, team} (n % 3) and `signup` an ISO date (segments: `attr.plan`,
  `attr.signup`).
- `measure_csv_import(settings, rows)`: writes such a file and imports it with the real import
  code (`import_contacts`) into contacts.events under `settings`; csv_import_rows_per_s is
  rows / seconds by the importer's own clock, from opening the file until the broker
  acknowledged the last record. Also where the time went: the importing thread's CPU seconds,
  the whole process's (librdkafka's threads included), the local broker's (when it runs on
  this machine), the machine's busy share (other processes included), and the rate of the
  parse-and-encode stage alone (no Kafka) on the same file.
- `measure_raw_produce(settings, count)`: a plain confluent-kafka producer with the import's
  tuning (and its delivery-report thread) sends `count` messages the size of a
  RecipientQueued event (the campaign bench's template) to a fresh 12-partition topic,
  deleted afterwards; raw_produce_rate is count / seconds until the last acknowledgement.

Standalone: `python -m bench.contacts_import_bench --rows 1000000` (against the test platform:
KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:39092) creates contacts.events under a fresh TOPIC_PREFIX,
prints the figures as JSON and deletes every topic it created.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message
from confluent_kafka.admin import AdminClient, NewTopic

from bench.campaign import template
from bench.proc_cpu import cpu_seconds, ticks_to_seconds
from schemas.contacts import contact_id_for
from schemas.envelope import encode, wrap
from schemas.events import RecipientQueued
from services.cli.contact_csv import RejectedRow, numbered_rows
from services.cli.contact_records import ContactRecordWriter
from services.cli.contacts_import import (
    BULK_PRODUCER_SETTINGS,
    QUEUE_FULL_WAIT_SECONDS,
    DeliveryReportThread,
    import_contacts,
)
from services.common.kafka import make_producer
from services.common.settings import Settings
from services.common.topics import CONTACTS, RECIPIENT_PARTITIONS, ensure_topics, topic_name

DEFAULT_ROWS = 1_000_000
DEFAULT_LISTS = 10
PLANS = ("free", "pro", "team")
# Every OVERLAP_EVERY-th contact is also in the next list: list audiences overlap, so a send to
# several lists must deduplicate.
OVERLAP_EVERY = 10
# Signup dates spread over three years from this day.
FIRST_SIGNUP = date(2023, 1, 1)
SIGNUP_DAYS = 3 * 365
# Rows written per write() call: large enough that generating 1M rows takes about a second.
WRITE_CHUNK_ROWS = 10_000
# Distinct RecipientQueued values the raw producer cycles through: batches hold different
# values (as real ones do), so compression is not flattered by identical records.
RAW_DISTINCT_VALUES = 1_000
# Guards the raw run against a broker that stops acknowledging.
RAW_FLUSH_TIMEOUT_SECONDS = 300.0
# Topic creation and deletion: a single local broker answers within seconds.
ADMIN_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class ContactsFile:
    """A generated contacts CSV and the audience it describes (see the module docstring).

    Contact n (0 <= n < contacts) is fully described by `email_of(n)`, `lists_of(n)`,
    `plan_of(n)` and `signup_of(n)`; `contact_id_of(n)` is its id once imported for
    `tenant_id`, and `contacts_in` lists the contacts of a send, for exact expected sets."""

    path: Path
    tenant_id: str
    contacts: int
    list_ids: tuple[str, ...]
    members_per_list: dict[str, int]
    plan_counts: dict[str, int]
    size_bytes: int

    @staticmethod
    def email_of(n: int) -> str:
        return f"user{n}@example.com"

    def contact_id_of(self, n: int) -> str:
        return contact_id_for(self.tenant_id, self.email_of(n))

    def contacts_in(self, list_ids: Collection[str], plans: Collection[str] | None = None) -> Iterator[int]:
        """The contacts that are members of any of `list_ids` (and, given `plans`, on one of
        those plans), each once, in order."""
        wanted = set(list_ids)
        for n in range(self.contacts):
            if wanted.intersection(self.lists_of(n)) and (plans is None or self.plan_of(n) in plans):
                yield n

    @staticmethod
    def plan_of(n: int) -> str:
        return PLANS[n % len(PLANS)]

    @staticmethod
    def signup_of(n: int) -> str:
        return (FIRST_SIGNUP + timedelta(days=(n * 7) % SIGNUP_DAYS)).isoformat()

    def lists_of(self, n: int) -> tuple[str, ...]:
        lists = len(self.list_ids)
        own = n % lists
        if n % OVERLAP_EVERY or lists == 1:
            return (self.list_ids[own],)
        # The second list rotates over the others, so the overlap is spread over every list.
        other = (own + 1 + (n // OVERLAP_EVERY) % (lists - 1)) % lists
        return (self.list_ids[own], self.list_ids[other])


def write_contacts_csv(path: Path, contacts: int, *, lists: int = DEFAULT_LISTS, tenant_id: str = "bench",
                       list_prefix: str = "list-") -> ContactsFile:
    """Write `contacts` rows (email, first_name, last_name, lists, plan, signup) to `path`, to
    be imported for `tenant_id` (the file itself names no tenant)."""
    if contacts < 0 or lists < 1:
        raise ValueError("contacts must be >= 0 and lists >= 1")
    list_ids = tuple(f"{list_prefix}{i}" for i in range(lists))
    described = ContactsFile(path, tenant_id, contacts, list_ids, dict.fromkeys(list_ids, 0),
                             dict.fromkeys(PLANS, 0), 0)
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write("email,first_name,last_name,lists,plan,signup\n")
        for start in range(0, contacts, WRITE_CHUNK_ROWS):
            chunk = io.StringIO()
            for n in range(start, min(start + WRITE_CHUNK_ROWS, contacts)):
                memberships = described.lists_of(n)
                for list_id in memberships:
                    described.members_per_list[list_id] += 1
                plan = described.plan_of(n)
                described.plan_counts[plan] += 1
                chunk.write(f"{described.email_of(n)},First{n},Last{n},{';'.join(memberships)},{plan},"
                            f"{described.signup_of(n)}\n")
            out.write(chunk.getvalue())
    return replace(described, size_bytes=path.stat().st_size)


@contextmanager
def _machine_cpu() -> Iterator[dict[str, float]]:
    """Busy CPU seconds of the whole machine (all cores, every process) while the block runs,
    from /proc/stat; empty when /proc/stat cannot be read."""
    figures: dict[str, float] = {}
    before = _busy_and_total_ticks()
    started = time.monotonic()
    yield figures
    after = _busy_and_total_ticks()
    if before is not None and after is not None:
        figures["busy_s"] = ticks_to_seconds(after[0] - before[0])
        figures["share"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
        figures["wall_s"] = time.monotonic() - started


def broker_pid(bootstrap_servers: str) -> int | None:
    """The local Kafka broker listening on the bootstrap address's port, found by its
    server.properties (`kafka.Kafka <file>` on its command line); None when not on this machine."""
    port = bootstrap_servers.split(",")[0].rpartition(":")[2]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            if b"kafka.Kafka" not in args:
                continue
            properties = Path(args[args.index(b"kafka.Kafka") + 1].decode()).read_text()
        except (OSError, IndexError, UnicodeDecodeError):
            continue
        listeners = [line for line in properties.splitlines() if line.startswith("listeners=")]
        if any(f":{port}," in line + "," for line in listeners):
            return int(proc.name)
    return None


def process_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process so far (all its threads), from /proc."""
    return None if pid is None else cpu_seconds(pid)


def _busy_and_total_ticks() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def parse_encode_rate(path: Path, tenant_id: str) -> dict[str, float]:
    """The import's CPU-bound stage alone: rows checked and encoded per second, no Kafka."""
    started, cpu = time.monotonic(), time.thread_time()
    rows = 0
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as text:
        header, numbered = numbered_rows(text)
        for item in ContactRecordWriter(tenant_id, header).records(numbered):
            rows += not isinstance(item, RejectedRow)
    seconds, cpu_seconds = time.monotonic() - started, time.thread_time() - cpu
    return {"rows_per_s": rows / seconds if seconds else 0.0,
            "cpu_us_per_row": cpu_seconds / max(rows, 1) * 1e6}


def measure_csv_import(settings: Settings, rows: int, *, tenant_id: str | None = None,
                       lists: int = DEFAULT_LISTS, stages: bool = True) -> dict[str, Any]:
    """Import a generated `rows`-contact CSV into contacts.events (the topic must exist under
    `settings`) and return the figures; see the module docstring. `stages=False` skips the
    parse-and-encode stage measurement (it reads the file once more, without Kafka)."""
    tenant_id = tenant_id or f"bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="contacts-import-") as folder:
        path = Path(folder) / f"{tenant_id}.csv"
        contacts = write_contacts_csv(path, rows, lists=lists, tenant_id=tenant_id)
        broker = broker_pid(settings.kafka_bootstrap_servers)
        broker_cpu = process_cpu_seconds(broker)
        process_cpu, thread_cpu = time.process_time(), time.thread_time()
        with _machine_cpu() as machine:
            report = import_contacts(contacts.path, tenant_id=tenant_id, list_id=None, settings=settings)
        process_cpu, thread_cpu = time.process_time() - process_cpu, time.thread_time() - thread_cpu
        broker_after = process_cpu_seconds(broker)
        broker_cpu = None if broker_cpu is None or broker_after is None else broker_after - broker_cpu
        stage = parse_encode_rate(contacts.path, tenant_id) if stages else None
    figures: dict[str, Any] = {
        "csv_import_rows_per_s": round(report.rows_per_second, 1),
        "csv_import_rows": rows,
        "csv_import_seconds": round(report.seconds, 3),
        "csv_import_imported": report.imported,
        "csv_import_rejected": report.rejected_count,
        "csv_import_ok": report.imported == rows and report.rejected_count == 0,
        "csv_import_file_mb": round(contacts.size_bytes / 2**20, 1),
        # Where the time goes: the importing thread parses, encodes and calls produce();
        # librdkafka's threads batch, compress and send; the broker shares the machine.
        "csv_import_main_thread_cpu_s": round(thread_cpu, 2),
        "csv_import_process_cpu_s": round(process_cpu, 2),
        "csv_import_broker_cpu_s": None if broker_cpu is None else round(broker_cpu, 2),
        "csv_import_machine_busy_share": round(machine["share"], 3) if machine else None,
        "csv_import_tenant_id": tenant_id,
        "csv_import_list_ids": list(contacts.list_ids),
        "csv_import_members_per_list": contacts.members_per_list,
        "csv_import_plan_counts": contacts.plan_counts,
    }
    if stage is not None:
        figures["csv_parse_encode_rows_per_s"] = round(stage["rows_per_s"], 1)
        figures["csv_parse_encode_cpu_us_per_row"] = round(stage["cpu_us_per_row"], 2)
    return figures


def recipient_queued_values(count: int) -> list[bytes]:
    """`count` distinct RecipientQueued envelopes as the hydrator writes them (the campaign
    bench's template, a contact with two attributes)."""
    values = []
    for n in range(count):
        email = f"user{n}@example.com"
        contact_id = contact_id_for("bench", email)
        payload = RecipientQueued(
            campaign_id="cmp-bench-000000", contact_id=contact_id, email=email, first_name=f"First{n}",
            last_name=f"Last{n}", attributes={"plan": PLANS[n % 3], "signup": "2024-05-06"},
            template=template(),
        )
        values.append(encode(wrap(payload, tenant_id="bench", aggregate_id="cmp-bench-000000")))
    return values


def measure_raw_produce(
    settings: Settings, count: int, *, partitions: int = RECIPIENT_PARTITIONS
) -> dict[str, Any]:
    """Send `count` RecipientQueued-sized messages with a plain producer (the import's tuning) to
    a fresh topic of `partitions` partitions, created and deleted here; see the module docstring."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    topic = f"{settings.topic_prefix}bench.raw-produce.{uuid.uuid4().hex[:8]}"
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(ADMIN_TIMEOUT_SECONDS)
    try:
        values = recipient_queued_values(min(count, RAW_DISTINCT_VALUES) or 1)
        failed: list[KafkaError] = []

        def on_failure(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                failed.append(err)

        producer = make_producer(settings, on_delivery=on_failure, **BULK_PRODUCER_SETTINGS)
        producer.list_topics(topic, timeout=ADMIN_TIMEOUT_SECONDS)  # metadata before the clock starts
        distinct = len(values)
        produce = producer.produce
        started = time.monotonic()
        with DeliveryReportThread(producer):  # reports served off this thread, as the import does
            for n in range(count):
                key = f"bench:{n:012d}".encode()
                while True:
                    try:
                        produce(topic, values[n % distinct], key)
                        break
                    except BufferError:  # queue full: acknowledgements free space
                        time.sleep(QUEUE_FULL_WAIT_SECONDS)
        left = producer.flush(RAW_FLUSH_TIMEOUT_SECONDS)
        seconds = time.monotonic() - started
    finally:
        for future in admin.delete_topics([topic], operation_timeout=ADMIN_TIMEOUT_SECONDS).values():
            future.result(ADMIN_TIMEOUT_SECONDS)
    return {
        "raw_produce_rate": round(count / seconds, 1) if seconds else None,
        "raw_produce_count": count,
        "raw_produce_seconds": round(seconds, 3),
        "raw_produce_message_bytes": len(values[0]),
        "raw_produce_partitions": partitions,
        "raw_produce_failed": len(failed) + left,
    }


def delete_prefixed_topics(settings: Settings) -> None:
    """Delete every topic under the run's prefix. A topic deleted a moment ago may still be
    listed by the broker's metadata: that one is gone already, not an error."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    mine = [t for t in admin.list_topics(timeout=ADMIN_TIMEOUT_SECONDS).topics
            if t.startswith(settings.topic_prefix)]
    if mine:
        for future in admin.delete_topics(mine, operation_timeout=ADMIN_TIMEOUT_SECONDS).values():
            try:
                future.result(ADMIN_TIMEOUT_SECONDS)
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                if not (isinstance(error, KafkaError) and error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART):
                    raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="CSV rows to import")
    parser.add_argument("--raw", type=int, default=None, help="raw messages to produce (default: --rows)")
    parser.add_argument("--no-stages", action="store_true", help="skip the parse-and-encode stage figure")
    args = parser.parse_args(argv)
    base = Settings()
    # A prefix of our own: the run never touches another run's or a test's topics.
    settings = base.replace(topic_prefix=f"{base.topic_prefix}cib{uuid.uuid4().hex[:8]}.")
    ensure_topics(settings, specs=(CONTACTS,))
    try:
        figures = measure_csv_import(settings, args.rows, stages=not args.no_stages)
        figures.update(measure_raw_produce(settings, args.raw if args.raw is not None else args.rows))
    finally:
        delete_prefixed_topics(settings)
    figures["contacts_topic"] = topic_name(CONTACTS, settings)
    figures["cpu_count"] = os.cpu_count()
    print(json.dumps(figures, indent=2))
    return 0 if figures["csv_import_ok"] and not figures["raw_produce_failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
