"""Contact import: a CSV file streamed into ContactUpserted records on contacts.events.

Guarantees:
- Constant memory: the file is read line by line through the csv module and produced as it is
  read; only the producer's bounded queue and at most MAX_KEPT_REJECTIONS rejections are held.
- A row counts as imported only once the broker acknowledged it (idempotent producer,
  acks=all); a row the broker did not acknowledge is reported as rejected with the reason.
- Bad rows are reported with their line number and reason and skipped; the good rows of the
  same file are still imported. Only a file without a usable header is rejected as a whole.
- Idempotent upsert: a contact's id is derived from tenant + normalised e-mail, so importing
  a file twice (or a file that names an address twice) upserts the same contacts.

Modes (`mode=`):
- "upsert" (default): one ContactUpserted per good row, joining `list_id` and the row's lists.
- "skip-existing": as upsert, but only for contact ids not already present, determined from a
  local set built while scanning the tenant's records on contacts.events once at the start
  (O(contacts of the topic) time, O(tenant's contacts) memory). A contact counts as present
  after a ContactUpserted and absent again after a ContactDeleted. The first row naming an
  address wins: later rows of the same file for that contact are skipped too. Skipped rows are
  counted in `ImportReport.skipped`. Not atomic: a contact created by someone else during the
  import may still be upserted.
- "blocklist": every good row produces a ContactUpserted without list memberships (so the
  contact exists) followed by ContactSuppressed(reason="manual_blocklist"), same key, so in
  order; the row counts as imported once both are acknowledged. `list_id` and the `lists`
  column are refused / ignored: a blocklist adds no memberships.

The pure part, `parse_rows`, turns lines into `ParsedRow` or `RejectedRow` without I/O.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
import time
import typing
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from confluent_kafka import KafkaError, Message, Producer
from pydantic import TypeAdapter, ValidationError

from schemas.base import EntityId, InvalidEmail, TenantId, normalise_email
from schemas.contacts import ContactSuppressed, ContactUpserted, contact_id_for, contact_key
from schemas.envelope import SchemaViolation, decode, encode, wrap
from schemas.registry import wire_name
from services.cli.publishing import TopicUnavailable, cli_producer, require_topic
from services.common.kafka import make_consumer
from services.common.settings import Settings
from services.common.topics import CONTACTS, topic_name

# Longest value accepted in any field: longer ones are almost always a broken quote that
# swallowed the following lines, not data.
MAX_FIELD_CHARS = 1000
# ContactUpserted's limit on first_name and last_name; checked here so that a too-long name
# rejects its row instead of failing the schema.
MAX_NAME_CHARS = 200
# Rejections kept for the report: a file of nothing but bad rows must not grow memory without
# bound. The count of all rejections is kept regardless.
MAX_KEPT_REJECTIONS = 10_000
# Rows between two producer polls: serves delivery reports often enough to keep the queue
# moving without paying a poll per row.
POLL_EVERY_ROWS = 200
# Rows between two progress callbacks.
PROGRESS_EVERY_ROWS = 2_000
# A full producer queue waits this long for deliveries to free space before trying again.
QUEUE_FULL_WAIT_SECONDS = 0.05
# How long a record may wait for its acknowledgement, queueing included: a broker gone for
# this long fails the remaining rows instead of hanging the CLI (librdkafka's default is 5 min).
DELIVERY_TIMEOUT_MS = 120_000
# The final flush outlasts the delivery timeout, so every record gets its delivery report.
FLUSH_TIMEOUT_SECONDS = DELIVERY_TIMEOUT_MS / 1000 + 15
# Larger batches for a bulk load: a few ms of latency buy far fewer produce requests.
BULK_PRODUCER_SETTINGS = {"linger.ms": 20, "delivery.timeout.ms": DELIVERY_TIMEOUT_MS}

# How long the skip-existing scan waits for a record before deciding the broker has stalled:
# guards against hanging on a partition that never reaches its end (e.g. an open transaction).
SCAN_IDLE_TIMEOUT_SECONDS = 30.0
# Consumer group named by the skip-existing scan; it assigns partitions and never commits.
SCAN_GROUP = "campaignctl-contacts-scan"
# Detail written on the suppressions of a blocklist import.
BLOCKLIST_DETAIL = "csv blocklist import"

ImportMode = Literal["upsert", "skip-existing", "blocklist"]
IMPORT_MODES: tuple[str, ...] = typing.get_args(ImportMode)

# Column names with a meaning of their own; every other named column is an attribute.
EMAIL, FIRST_NAME, LAST_NAME, LISTS = "email", "first_name", "last_name", "lists"
# Separator of list ids inside the `lists` column.
LIST_SEPARATOR = ";"
_BOM = "\ufeff"


class CsvImportError(Exception):
    """The file as a whole cannot be imported (unreadable, empty, no email column...)."""


@dataclass(frozen=True, slots=True)
class RejectedRow:
    """A row that was not imported: its line number in the file (header = 1) and why."""

    line: int
    reason: str


@dataclass(frozen=True, slots=True)
class ParsedRow:
    """A row that passed every check: its e-mail is normalised, its list ids are valid."""

    line: int
    email: str
    first_name: str = ""
    last_name: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
    lists: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ImportReport:
    """Outcome of an import. `rejected` holds at most MAX_KEPT_REJECTIONS rows, sorted by line;
    `rejected_count` counts them all. `seconds` runs from start to the last acknowledgement.
    `skipped` counts good rows left out because their contact already existed (skip-existing)."""

    imported: int
    rejected: list[RejectedRow]
    seconds: float
    rejected_count: int
    skipped: int = 0

    @property
    def rows_per_second(self) -> float:
        rows = self.imported + self.rejected_count + self.skipped
        return rows / self.seconds if self.seconds > 0 else 0.0


def _pattern_of(annotated: object) -> re.Pattern[str]:
    """The regex of a constrained-string alias, so the checks here cannot drift from schemas."""
    for constraint in typing.get_args(annotated)[1:]:
        pattern = getattr(constraint, "pattern", None)
        if isinstance(pattern, str):
            return re.compile(pattern)
    raise TypeError(f"{annotated!r} has no pattern")


_ENTITY_ID = _pattern_of(EntityId)


# --- parsing (pure) --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    """Where the known columns sit, and the attribute columns by name."""

    width: int
    email: int
    first_name: int | None
    last_name: int | None
    lists: int | None
    attributes: tuple[tuple[str, int], ...]
    names: tuple[str, ...]


def _read_header(fields: list[str]) -> _Header:
    names = [name.strip() for name in fields]
    if not any(names):
        raise CsvImportError("the first line must be a header naming the columns; it is empty")
    if not "".join(names).isascii():
        try:
            "".join(names).encode()
        except UnicodeEncodeError:
            raise CsvImportError("the header line is not valid UTF-8") from None
    known: dict[str, int] = {}
    attributes: list[tuple[str, int]] = []
    seen: set[str] = set()
    for index, name in enumerate(names):
        if not name:
            continue  # an unnamed column (e.g. a trailing comma) carries nothing to keep
        folded = name.lower()
        if folded in seen:
            raise CsvImportError(f"column {name!r} appears twice in the header")
        seen.add(folded)
        if folded in (EMAIL, FIRST_NAME, LAST_NAME, LISTS):
            known[folded] = index
        else:
            attributes.append((name, index))
    if EMAIL not in known:
        columns = ", ".join(n for n in names if n)
        raise CsvImportError(f"the header has no 'email' column (columns: {columns})")
    return _Header(
        width=len(names),
        email=known[EMAIL],
        first_name=known.get(FIRST_NAME),
        last_name=known.get(LAST_NAME),
        lists=known.get(LISTS),
        attributes=tuple(attributes),
        names=tuple(names),
    )


def _split_lists(value: str) -> list[str] | str:
    """The list ids of a `lists` cell, or the reason they are unusable."""
    lists: list[str] = []
    for part in value.split(LIST_SEPARATOR):
        list_id = part.strip()
        if not list_id:
            continue
        if not _ENTITY_ID.match(list_id):
            return f"invalid list id {list_id!r}"
        if list_id not in lists:
            lists.append(list_id)
    return lists


def _check_row(row: list[str], line: int, header: _Header) -> ParsedRow | RejectedRow:
    if len(row) != header.width:
        return RejectedRow(line, f"expected {header.width} fields, found {len(row)}")
    joined = "".join(row)
    if not joined.isascii():
        try:
            joined.encode()
        except UnicodeEncodeError:  # lone surrogates: bytes the UTF-8 decoder could not read
            return RejectedRow(line, "not valid UTF-8")
    if len(joined) > MAX_FIELD_CHARS:  # cheap pre-check before looking at each field
        for name, value in zip(header.names, row, strict=True):
            if len(value) > MAX_FIELD_CHARS:
                return RejectedRow(line, f"field {name!r} is longer than {MAX_FIELD_CHARS} characters")
    raw_email = row[header.email]
    if not raw_email.strip():
        return RejectedRow(line, "empty email")
    try:
        email = normalise_email(raw_email)
    except InvalidEmail as exc:
        return RejectedRow(line, str(exc))
    first_name = row[header.first_name].strip() if header.first_name is not None else ""
    last_name = row[header.last_name].strip() if header.last_name is not None else ""
    if len(first_name) > MAX_NAME_CHARS or len(last_name) > MAX_NAME_CHARS:
        return RejectedRow(line, f"first_name and last_name are limited to {MAX_NAME_CHARS} characters")
    lists: list[str] = []
    if header.lists is not None:
        split = _split_lists(row[header.lists])
        if isinstance(split, str):
            return RejectedRow(line, split)
        lists = split
    attributes = {name: row[index] for name, index in header.attributes}
    return ParsedRow(line, email, first_name, last_name, attributes, lists)


def parse_rows(lines: Iterable[str]) -> Iterator[ParsedRow | RejectedRow]:
    """Parse CSV lines (header first) into checked rows or rejections, lazily.

    `lines` are text lines with their line endings, as from a file opened with newline="";
    undecodable bytes are expected as lone surrogates (errors="surrogateescape") and reject
    their row. Line numbers count physical lines from the header (line 1); a row is numbered
    by the line it starts on, also when a quoted field spans several lines. Blank lines are
    skipped. Raises CsvImportError (on the first `next`) when the header is missing, unreadable
    or has no `email` column.
    """
    source = iter(lines)
    first = next(source, None)
    if first is None:
        raise CsvImportError("the file is empty: a header line naming the columns is required")
    reader = csv.reader(itertools.chain([first.removeprefix(_BOM)], source))
    try:
        header_fields = next(reader)
    except csv.Error as exc:
        raise CsvImportError(f"the header line is not valid CSV: {exc}") from None
    header = _read_header(header_fields)
    end = reader.line_num
    while True:
        start = end + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            end = reader.line_num
            yield RejectedRow(start, f"malformed CSV: {exc}")
            continue
        end = reader.line_num
        if row:
            yield _check_row(row, start, header)


# --- envelopes -------------------------------------------------------------------------------

# A JSON string literal, escaped as pydantic escapes it (control characters and quotes only;
# other characters stay UTF-8). The C function costs a fraction of a JSONEncoder call.
_JSON_STR = json.encoder.encode_basestring


def _json_list(items: list[str]) -> str:
    return "[" + ",".join(map(_JSON_STR, items)) + "]"


def _json_object(items: dict[str, str]) -> str:
    return "{" + ",".join([f"{_JSON_STR(k)}:{_JSON_STR(v)}" for k, v in items.items()]) + "}"


def _timestamp(moment: datetime) -> str:
    """An aware UTC datetime as pydantic writes it (ISO 8601, 'Z', microseconds when non-zero)."""
    text = moment.astimezone(UTC).isoformat()
    return text.removesuffix("+00:00") + "Z"


class RandomIds:
    """Random (version 4) UUID strings, drawn from os.urandom in blocks.

    `str(uuid.uuid4())` costs about three times as much per row; the ids are the same kind:
    122 random bits from the OS's CSPRNG with the version and variant bits set.
    """

    # UUIDs drawn per os.urandom call.
    BLOCK = 4096

    def __init__(self) -> None:
        self._hex = ""
        self._pos = 0

    def next(self) -> str:
        if self._pos >= len(self._hex):
            self._hex = os.urandom(16 * self.BLOCK).hex()
            self._pos = 0
        h, p = self._hex, self._pos
        self._pos = p + 32
        variant = "89ab"[int(h[p + 16], 16) & 3]
        return f"{h[p:p+8]}-{h[p+8:p+12]}-4{h[p+13:p+16]}-{variant}{h[p+17:p+20]}-{h[p+20:p+32]}"


class ContactUpsertEncoder:
    """Writes ContactUpserted envelopes byte for byte as `encode(wrap(...))` does, for one tenant.

    Building two pydantic models per row costs most of an import's time; the values here are
    already checked by `parse_rows` against the same rules (e-mail, list ids, name lengths),
    so the JSON is written directly. Equality with the pydantic path is unit-tested, and each
    import checks its first record with `decode`.
    """

    def __init__(self, tenant_id: str) -> None:
        TypeAdapter(TenantId).validate_python(tenant_id)
        type_name, version = wire_name(ContactUpserted)
        self.tenant_id = tenant_id
        self._middle = f'"type":{_JSON_STR(type_name)},"version":{version},"tenant_id":{_JSON_STR(tenant_id)}'
        self._ids = RandomIds()
        self._moment: datetime | None = None
        self._moment_text = ""

    def encode(
        self,
        contact_id: str,
        row: ParsedRow,
        lists: list[str],
        *,
        message_id: uuid.UUID | None = None,
        occurred_at: datetime | None = None,
    ) -> bytes:
        """One envelope: a new message id that is also the correlation id (a new flow).

        `occurred_at` defaults to now; a caller writing many rows may pass the same moment for
        a batch of rows (its text is formatted once).
        """
        mid = str(message_id) if message_id is not None else self._ids.next()
        moment = occurred_at or datetime.now(UTC)
        if moment is not self._moment:
            self._moment, self._moment_text = moment, _timestamp(moment)
        cid = _JSON_STR(contact_id)
        return (
            f'{{"id":"{mid}",{self._middle},"aggregate_id":{cid},'
            f'"occurred_at":"{self._moment_text}",'
            f'"correlation_id":"{mid}","causation_id":null,'
            f'"payload":{{"contact_id":{cid},"email":{_JSON_STR(row.email)},'
            f'"first_name":{_JSON_STR(row.first_name)},"last_name":{_JSON_STR(row.last_name)},'
            f'"attributes":{_json_object(row.attributes)},"lists":{_json_list(lists)}}}}}'
        ).encode()


# --- producing -------------------------------------------------------------------------------


class _Rejections:
    """Rejected rows: all counted, the first MAX_KEPT_REJECTIONS kept."""

    def __init__(self) -> None:
        self.kept: list[RejectedRow] = []
        self.count = 0

    def add(self, row: RejectedRow) -> None:
        self.count += 1
        if len(self.kept) < MAX_KEPT_REJECTIONS:
            self.kept.append(row)


class _Acknowledgements:
    """Delivery reports: acknowledged rows counted, refused ones rejected with their line."""

    def __init__(self, rejections: _Rejections) -> None:
        self.acked = 0
        self.rejections = rejections

    def for_line(self, line: int) -> Callable[[KafkaError | None, Message], None]:
        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is None:
                self.acked += 1
            else:
                self.rejections.add(RejectedRow(line, f"not acknowledged by Kafka: {err.str()}"))

        return delivered

    def for_pair(self, line: int) -> tuple[Callable[[KafkaError | None, Message], None], ...]:
        """Delivery callbacks for a row written as two records: the row counts as acknowledged
        once both are, and is rejected once (with the first error) when either is refused."""
        state = {"pending": 2, "failed": False}

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            state["pending"] -= 1
            if err is not None and not state["failed"]:
                state["failed"] = True
                self.rejections.add(RejectedRow(line, f"not acknowledged by Kafka: {err.str()}"))
            elif not state["pending"] and not state["failed"]:
                self.acked += 1

        return delivered, delivered


# --- modes (pure parts) ----------------------------------------------------------------------


def suppression_envelope(tenant_id: str, contact_id: str, upsert_id: uuid.UUID, moment: datetime) -> bytes:
    """The ContactSuppressed(manual_blocklist) of a blocklist row, caused by its upsert."""
    payload = ContactSuppressed(contact_id=contact_id, reason="manual_blocklist", detail=BLOCKLIST_DETAIL)
    return encode(wrap(payload, tenant_id=tenant_id, aggregate_id=contact_id, correlation_id=upsert_id,
                       causation_id=upsert_id, occurred_at=moment))


def track_existing(existing: set[str], tenant_id: str, key: bytes | None, value: bytes | None) -> None:
    """Update the set of a tenant's present contact ids with one contacts.events record.

    Records of other tenants (told by the key, `tenant:contact`) are skipped unread; a
    ContactUpserted adds its contact, a ContactDeleted removes it, other types change nothing.
    """
    prefix = f"{tenant_id}:".encode()
    if key is None or value is None or not key.startswith(prefix):
        return
    try:
        kind = json.loads(value).get("type")
    except (ValueError, AttributeError):
        return  # not ours to judge: consumers of the topic dead-letter it
    contact_id = key[len(prefix):].decode(errors="replace")
    if kind == "ContactUpserted":
        existing.add(contact_id)
    elif kind == "ContactDeleted":
        existing.discard(contact_id)


def existing_contact_ids(settings: Settings, tenant_id: str) -> set[str]:
    """The tenant's present contact ids: every partition of contacts.events read from the
    start until the consumer reports its end. Raises TopicUnavailable when the scan fails or
    stalls for SCAN_IDLE_TIMEOUT_SECONDS."""
    from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition

    topic = topic_name(CONTACTS, settings)
    consumer = make_consumer(settings, SCAN_GROUP, **{"enable.partition.eof": True})
    existing: set[str] = set()
    try:
        try:
            metadata = consumer.list_topics(topic, timeout=SCAN_IDLE_TIMEOUT_SECONDS)
        except KafkaException as exc:
            raise TopicUnavailable(f"reading {topic} failed: {exc}") from None
        unread = set(metadata.topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(unread)])
        while unread:
            msg = consumer.poll(SCAN_IDLE_TIMEOUT_SECONDS)
            if msg is None:
                raise TopicUnavailable(f"reading {topic} stalled with {len(unread)} partitions unread")
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    raise TopicUnavailable(f"reading {topic} failed: {err.str()}")
                unread.discard(msg.partition())
                continue
            track_existing(existing, tenant_id, msg.key(), msg.value())
    finally:
        consumer.close()
    return existing


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
) -> ImportReport:
    """Stream a CSV file of contacts onto contacts.events as ContactUpserted records.

    Columns: `email` (required), `first_name`, `last_name`, `lists` (`;`-separated list ids),
    every other named column an attribute. Each contact joins `list_id` (when given) and the
    lists of its row. `on_progress(bytes_read, total_bytes)` is called as the file is read.
    `mode` is described in the module docstring.
    Raises CsvImportError (file unusable, bad tenant, list id or mode), OSError (file
    unreadable) and TopicUnavailable (Kafka unreachable) before anything is produced.
    """
    started = time.monotonic()
    if mode not in IMPORT_MODES:
        raise CsvImportError(f"unknown import mode {mode!r} (modes: {', '.join(IMPORT_MODES)})")
    try:
        encoder = ContactUpsertEncoder(tenant_id)
    except ValidationError:
        raise CsvImportError(f"invalid tenant id {tenant_id!r}") from None
    base_lists = _check_list_id(list_id)
    blocklist = mode == "blocklist"
    if blocklist and base_lists:
        raise CsvImportError("a blocklist import adds no list memberships: give no list id")
    topic = topic_name(CONTACTS, settings)
    rejections = _Rejections()
    acks = _Acknowledgements(rejections)
    with open(path, "rb") as raw:
        total_bytes = os.fstat(raw.fileno()).st_size
        # Decoding never fails here: bad bytes become lone surrogates, and parse_rows rejects
        # the row that holds them with its line number.
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
        rows = parse_rows(text)
        first = next(rows, None)  # reads the header: a bad file fails before Kafka is touched
        producer = cli_producer(settings, **BULK_PRODUCER_SETTINGS)
        require_topic(producer, topic, settings)
        skip = existing_contact_ids(settings, tenant_id) if mode == "skip-existing" else None
        skipped = 0
        produced = 0
        # The clock is read once per POLL_EVERY_ROWS rows: rows produced within the same few
        # milliseconds share their occurred_at.
        now = datetime.now(UTC)
        for item in itertools.chain([first] if first is not None else [], rows):
            if isinstance(item, RejectedRow):
                rejections.add(item)
                continue
            contact_id = contact_id_for(tenant_id, item.email)
            if skip is not None:
                if contact_id in skip:
                    skipped += 1
                    continue
                skip.add(contact_id)
            key = contact_key(tenant_id, contact_id)
            if blocklist:
                upsert_id = uuid.uuid4()
                value = encoder.encode(contact_id, item, [], message_id=upsert_id, occurred_at=now)
                suppressed = suppression_envelope(tenant_id, contact_id, upsert_id, now)
                if not produced:
                    _self_check(value)
                    _self_check(suppressed)
                on_upsert, on_suppressed = acks.for_pair(item.line)
                _produce(producer, topic, key, value, on_upsert)
                _produce(producer, topic, key, suppressed, on_suppressed)
            else:
                lists = item.lists
                if base_lists:
                    lists = base_lists + [x for x in item.lists if x not in base_lists]
                value = encoder.encode(contact_id, item, lists, occurred_at=now)
                if not produced:
                    _self_check(value)
                while True:
                    try:
                        producer.produce(topic, value, key, on_delivery=acks.for_line(item.line))
                        break
                    except BufferError:  # queue full: serving delivery reports frees space
                        producer.poll(QUEUE_FULL_WAIT_SECONDS)
            produced += 1
            if produced % POLL_EVERY_ROWS == 0:
                producer.poll(0)
                now = datetime.now(UTC)
                if on_progress is not None and produced % PROGRESS_EVERY_ROWS == 0:
                    on_progress(raw.tell(), total_bytes)
        if on_progress is not None:
            on_progress(total_bytes, total_bytes)
        if producer.flush(FLUSH_TIMEOUT_SECONDS):
            # Rows still unacknowledged after the delivery timeout: purging hands each of them a
            # delivery report (an error), so each is rejected with its line.
            producer.purge()
            producer.flush(0)
    rejected = sorted(rejections.kept, key=lambda r: r.line)
    return ImportReport(acks.acked, rejected, time.monotonic() - started, rejections.count, skipped)


def _produce(producer: Producer, topic: str, key: bytes, value: bytes,
             on_delivery: Callable[[KafkaError | None, Message], None]) -> None:
    while True:
        try:
            producer.produce(topic, value, key, on_delivery=on_delivery)
            return
        except BufferError:  # queue full: serving delivery reports frees space
            producer.poll(QUEUE_FULL_WAIT_SECONDS)


def _self_check(value: bytes) -> None:
    """Validate the first record of an import against the schemas: guards the direct encoder
    against drifting from the pydantic models."""
    try:
        decode(value)
    except SchemaViolation as exc:
        raise RuntimeError(f"contact envelope encoder out of step with the schema: {exc}") from exc
