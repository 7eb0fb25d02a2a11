"""Contact import: a CSV file streamed onto contacts.events, acknowledged row by row.

Guarantees:
- Constant memory: the file is read as it is produced; only the producer's bounded queue
  (QUEUE_MAX_MESSAGES records, QUEUE_MAX_KBYTES), a few thousand cached `lists` cells, at
  most MAX_KEPT_REJECTIONS rejections and the line numbers of rows the broker refused are
  held (skip-existing also holds the tenant's contact ids, see below). A 1,000,000-row import
  peaks at 90-170 MB resident, depending on how far the broker lags.
- A row counts as imported only once the broker acknowledged its records (idempotent
  producer, acks=all); a row the broker did not acknowledge is reported as rejected with its
  line and the broker's reason.
- Bad rows are reported with their line number and reason (bad e-mail, missing or extra
  column, oversized field, bad encoding, malformed CSV, bad list id) and skipped; the good rows
  of the same file are still imported. Only a file without a usable header is refused whole.
- Idempotent: a contact's id (and Kafka key) is derived from tenant + the address's identity
  (the whole address lower-cased), so importing a file twice upserts the same contacts with
  the same fields: the new events fold to the same state
  (`schemas.contacts.apply_contact_event`). Every event is a new fact with its own envelope
  id (see `contact_records.EnvelopeIds`).
- One person, one contact: `Ann@Example.COM` and `ann@example.com` are the same contact; the
  address is stored and delivered as given. Before the rows, the import scans contacts.events
  (`existing_contacts.scan_contacts`) for contacts made before ids followed the identity (a
  mixed-case local part): an address lands on such a contact instead of making a second one,
  and contacts that differ only in case are merged into one when the file names them, every
  flag (suppression, unsubscribe) of both kept (`identity_merge`). Reported as `merged`.
- No import lifts a suppression or an unsubscribe: an upsert never touches them
  (`campaignctl contacts unsuppress` / `resubscribe` write the explicit facts that do).

Modes (`mode=`):
- "upsert" (default): one ContactUpserted per good row, joining `list_id` and the row's lists.
- "skip-existing": as upsert, but only for contacts not present on contacts.events when the
  import starts (`existing_contacts`; O(the tenant's contacts) memory). The first row naming
  an address wins: later rows of the same file for that contact are skipped too. Skipped rows
  are counted in `ImportReport.skipped`. Not atomic: a contact created by someone else during
  the import may still be upserted.
- "blocklist": every good row produces a ContactUpserted without list memberships (so the
  contact exists) followed by ContactSuppressed(reason="manual_blocklist"), same key, so in
  order; the row counts as imported once both are acknowledged. `list_id` is refused and the
  `lists` column ignored: a blocklist adds no memberships.

Speed (1,000,000 rows, 2 cores shared with the broker): the rows are checked and written by
`contact_records` (no pydantic model per row, about 4 µs of CPU a row) and produced without a
per-record callback: the producer reports only failures (`delivery.report.only.error`), a
failed record names its line in its own envelope id, and the reports are served on a thread of
their own (`DeliveryReportThread`). The importing thread needs about 6 CPU-seconds per million
rows and is the critical path; librdkafka's threads add about 2, the broker about 2-4.
`python -m bench.contacts_import_bench` measures all of them.
"""

from __future__ import annotations

import io
import os
import threading
import time
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from pydantic import TypeAdapter, ValidationError

from schemas.base import EntityId, TenantId
from schemas.contacts import contact_key
from schemas.envelope import SchemaViolation, decode, encode, wrap
from services.cli.contact_csv import (
    MAX_FIELD_CHARS,
    CsvImportError,
    ParsedRow,
    RejectedRow,
    numbered_rows,
    parse_rows,
)
from services.cli.contact_records import BLOCKLIST_DETAIL, ContactRecordWriter, EnvelopeIds
from services.cli.existing_contacts import scan_contacts
from services.cli.identity_merge import Resolution, resolve_identities
from services.cli.publishing import cli_producer, require_topic
from services.common.settings import Settings
from services.common.topics import CONTACTS, topic_name

__all__ = [
    "BLOCKLIST_DETAIL", "IMPORT_MODES", "MAX_FIELD_CHARS", "CsvImportError", "ImportMode", "ImportReport",
    "ParsedRow", "RejectedRow", "import_contacts", "parse_rows",
]

# Rejections kept for the report: a file of nothing but bad rows must not grow memory without
# bound. The count of all rejections is kept regardless.
MAX_KEPT_REJECTIONS = 10_000
# The report thread's longest wait in one poll: bounds how long stopping it takes.
REPORT_POLL_SECONDS = 0.05
# Rows between two progress callbacks (about 20 a second at full speed).
PROGRESS_EVERY_ROWS = 5_000
# A full producer queue waits this long for acknowledgements to free space before retrying.
QUEUE_FULL_WAIT_SECONDS = 0.002
# How long a record may wait for its acknowledgement, queueing included: a broker gone for
# this long fails the remaining rows instead of hanging the CLI (librdkafka's default is 5 min).
DELIVERY_TIMEOUT_MS = 120_000
# The final flush outlasts the delivery timeout, so every record gets its delivery report.
FLUSH_TIMEOUT_SECONDS = DELIVERY_TIMEOUT_MS / 1000 + 15
# After a purge, how long the purged records' reports may take to be served.
PURGE_REPORTS_SECONDS = 10.0
# Records (and their bytes) the producer holds unacknowledged before produce() waits: the
# import's memory bound whatever the row size, and still a second of rows at full speed to keep
# every partition's next batch full while the broker catches up.
QUEUE_MAX_MESSAGES = 100_000
QUEUE_MAX_KBYTES = 64 * 1024
# A bulk load trades a little latency for large batches: fewer produce requests and better
# compression (lz4: the cheapest codec per byte on a CPU the broker shares).
BULK_PRODUCER_SETTINGS: dict[str, typing.Any] = {
    "linger.ms": 50,
    "batch.num.messages": 10_000,
    "batch.size": 1_000_000,
    "compression.type": "lz4",
    "queue.buffering.max.messages": QUEUE_MAX_MESSAGES,
    "queue.buffering.max.kbytes": QUEUE_MAX_KBYTES,
    "delivery.timeout.ms": DELIVERY_TIMEOUT_MS,
    # A delivery report per record would be a Python callback per row; failures are enough,
    # the rest is acknowledged once flush() returns with nothing left in flight.
    "delivery.report.only.error": True,
}

ImportMode = Literal["upsert", "skip-existing", "blocklist"]
IMPORT_MODES: tuple[str, ...] = typing.get_args(ImportMode)


@dataclass(frozen=True)
class ImportReport:
    """Outcome of an import. `rejected` holds at most MAX_KEPT_REJECTIONS rows, sorted by line;
    `rejected_count` counts them all. `seconds` runs from start to the last acknowledgement.
    `skipped` counts good rows left out because their contact already existed (skip-existing);
    `merged` the existing contacts merged into another of the same address (`identity_merge`)."""

    imported: int
    rejected: list[RejectedRow]
    seconds: float
    rejected_count: int
    skipped: int = 0
    merged: int = 0

    @property
    def rows_per_second(self) -> float:
        rows = self.imported + self.rejected_count + self.skipped
        return rows / self.seconds if self.seconds > 0 else 0.0


class Rejections:
    """Rejected rows: all counted, the first MAX_KEPT_REJECTIONS kept."""

    def __init__(self) -> None:
        self.kept: list[RejectedRow] = []
        self.count = 0

    def add(self, row: RejectedRow) -> None:
        self.count += 1
        if len(self.kept) < MAX_KEPT_REJECTIONS:
            self.kept.append(row)

    def merge(self, other: Rejections) -> None:
        self.count += other.count
        self.kept.extend(other.kept[: max(MAX_KEPT_REJECTIONS - len(self.kept), 0)])


class DeliveryFailures:
    """Rows with a record that did not reach the broker, each rejected once (a blocklist row has
    two records), with the first reason. The producer's delivery reports (failures only) come
    here on the report thread, told apart by the line in their envelope id; the importing
    thread adds a row whose second record the producer refused. Thread-safe."""

    def __init__(self) -> None:
        self.rejections = Rejections()
        self.lines: set[int] = set()
        self._lock = threading.Lock()

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        value = msg.value()
        if err is None or value is None:
            return  # an acknowledgement (only with delivery.report.only.error off), or not ours
        self.fail(EnvelopeIds.line_of(value), f"not acknowledged by Kafka: {err.str()}")

    def fail(self, line: int, reason: str) -> None:
        with self._lock:
            if line not in self.lines:
                self.lines.add(line)
                self.rejections.add(RejectedRow(line, reason))


class DeliveryReportThread:
    """Serves the producer's delivery reports on a thread of its own while the rows are read.

    Serving reports is where librdkafka frees acknowledged records: C work that runs without
    the GIL, but cost the importing thread about 0.7 µs a record when it polled itself. Only
    this thread polls inside the `with` block (so delivery callbacks never run on two threads
    at once); on exit it stops within REPORT_POLL_SECONDS and the caller flushes.
    """

    def __init__(self, producer: Producer) -> None:
        self._producer = producer
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="contacts-import-reports", daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(REPORT_POLL_SECONDS)

    def __enter__(self) -> DeliveryReportThread:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _check_tenant(tenant_id: str) -> None:
    try:
        TypeAdapter(TenantId).validate_python(tenant_id)
    except ValidationError:
        raise CsvImportError(f"invalid tenant id {tenant_id!r}") from None


def _check_list_id(list_id: str | None) -> list[str]:
    if list_id is None:
        return []
    try:
        TypeAdapter(EntityId).validate_python(list_id)
    except ValidationError:
        raise CsvImportError(f"invalid list id {list_id!r}") from None
    return [list_id]


def import_contacts(
    path: Path,
    *,
    tenant_id: str,
    list_id: str | None,
    settings: Settings,
    on_progress: Callable[[int, int], None] | None = None,
    mode: ImportMode = "upsert",
    columns: Mapping[str, str] | None = None,
) -> ImportReport:
    """Stream a CSV file of contacts onto contacts.events (see `contact_csv` for the columns;
    `columns` maps the file's header names to them, see `contact_csv.read_header`).

    Each contact joins `list_id` (when given) and the lists of its row.
    `on_progress(bytes_read, total_bytes)` is called as the file is read. `mode` is described
    in the module docstring. Raises CsvImportError (file unusable, bad tenant, list id or
    mode), OSError (file unreadable) and TopicUnavailable (Kafka unreachable) before anything
    is produced.
    """
    started = time.monotonic()
    if mode not in IMPORT_MODES:
        raise CsvImportError(f"unknown import mode {mode!r} (modes: {', '.join(IMPORT_MODES)})")
    _check_tenant(tenant_id)
    base_lists = _check_list_id(list_id)
    blocklist = mode == "blocklist"
    if blocklist and base_lists:
        raise CsvImportError("a blocklist import adds no list memberships: give no list id")
    topic = topic_name(CONTACTS, settings)
    rejections = Rejections()
    failures = DeliveryFailures()
    with open(path, "rb") as raw:
        total_bytes = os.fstat(raw.fileno()).st_size
        # Decoding never fails here: bad bytes become lone surrogates, and the row that holds
        # them is rejected with its line number.
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
        header, rows = numbered_rows(text, columns)  # a bad header fails before Kafka is touched
        writer = ContactRecordWriter(tenant_id, header, base_lists=base_lists, with_row_lists=not blocklist,
                                     suppress=blocklist)
        producer = cli_producer(settings, on_delivery=failures, **BULK_PRODUCER_SETTINGS)
        require_topic(producer, topic, settings)
        known = scan_contacts(settings, tenant_id, present=mode == "skip-existing")
        resolutions = resolve_identities(known.identities)
        writer.aliases = {own: r.target for own, r in resolutions.items() if r.target != own}
        # Merges are written once, after the first row of the identity that was produced.
        merges = {r.target: r for r in resolutions.values() if r.merges}
        skip = known.present
        skipped = produced = merged = 0
        produce = producer.produce
        with DeliveryReportThread(producer):
            for item in writer.records(rows):
                if isinstance(item, RejectedRow):
                    rejections.add(item)
                    continue
                line, contact_id, key, value, then = item
                if skip is not None:
                    if contact_id in skip:
                        skipped += 1
                        continue
                    skip.add(contact_id)
                if not produced:
                    _self_check(value, then)
                try:
                    produce(topic, value, key)
                except BufferError:
                    refused = _produce_when_room(producer, topic, key, value)
                except KafkaException as exc:
                    refused = _refusal(exc)
                else:
                    refused = None
                if refused is not None:  # nothing of this row is on its way
                    rejections.add(RejectedRow(line, refused))
                    continue
                produced += 1
                if merges and contact_id in merges:
                    resolution = merges.pop(contact_id)
                    for line_refused in _produce_merges(producer, topic, tenant_id, resolution):
                        failures.fail(line, line_refused)
                    merged += resolution.merged
                if then is not None:
                    refused = _produce_when_room(producer, topic, key, then)
                    if refused is not None:  # its upsert is on its way: the row fails once
                        failures.fail(line, refused)
                if on_progress is not None and not produced % PROGRESS_EVERY_ROWS:
                    on_progress(raw.tell(), total_bytes)
        if on_progress is not None:
            on_progress(total_bytes, total_bytes)
        _settle(producer)
    rejections.merge(failures.rejections)
    rejected = sorted(rejections.kept, key=lambda r: r.line)
    imported = produced - len(failures.lines)
    return ImportReport(imported, rejected, time.monotonic() - started, rejections.count, skipped, merged)


def _produce_merges(producer: Producer, topic: str, tenant_id: str, resolution: Resolution) -> list[str]:
    """Queue the facts of one merge; the reasons of any the producer refused. They are few (a
    handful per merged contact), so they take the schema path."""
    refused = []
    for contact_id, payload in resolution.merges:
        value = encode(wrap(payload, tenant_id=tenant_id, aggregate_id=contact_id))
        reason = _produce_when_room(producer, topic, contact_key(tenant_id, contact_id), value)
        if reason is not None:
            refused.append(reason)
    return refused


def _produce_when_room(producer: Producer, topic: str, key: bytes, value: bytes) -> str | None:
    """Queue a record, waiting while the queue is full; the reason when the producer refuses it."""
    while True:
        try:
            producer.produce(topic, value, key)
            return None
        except BufferError:  # queue full: the report thread frees space as records are acknowledged
            time.sleep(QUEUE_FULL_WAIT_SECONDS)
        except KafkaException as exc:
            return _refusal(exc)


def _refusal(exc: KafkaException) -> str:
    """Why the producer refused a record outright (e.g. larger than message.max.bytes)."""
    error = exc.args[0] if exc.args else None
    return f"not accepted by the Kafka producer: {error.str() if isinstance(error, KafkaError) else exc}"


def _settle(producer: Producer) -> None:
    """Wait until every record is acknowledged or has failed, and its failure was reported."""
    if producer.flush(FLUSH_TIMEOUT_SECONDS):
        # Records still unacknowledged after the delivery timeout: purging hands each of them
        # a failure report, so each row is rejected with its line.
        producer.purge()
        deadline = time.monotonic() + PURGE_REPORTS_SECONDS
        while len(producer) and time.monotonic() < deadline:
            producer.poll(0.1)


def _self_check(*values: bytes | None) -> None:
    """Validate the first records of an import against the schemas: guards the record writer
    against drifting from the pydantic models (the unit tests compare them byte for byte)."""
    for value in values:
        if value is None:
            continue
        try:
            decode(value)
        except SchemaViolation as exc:
            raise RuntimeError(f"contact record writer out of step with the schema: {exc}") from exc
