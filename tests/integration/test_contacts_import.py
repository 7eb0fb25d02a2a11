"""The contact import against the real broker: exactly the good rows arrive (keys, bytes that
decode to the expected contacts), every bad row is reported with its line and reason, a
re-import changes no contact's state, and the modes and broker refusals behave as documented."""

from __future__ import annotations

import base64
import os
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

from schemas.contacts import ContactSuppressed, ContactUpserted, contact_id_for, contact_key, fold_contact
from schemas.envelope import Message, decode
from services.cli.contact_csv import ParsedRow, parse_rows
from services.cli.contact_records import BLOCKLIST_DETAIL, EnvelopeIds
from services.cli.contacts_import import import_contacts
from services.common.topics import CONTACTS, topic_name

pytestmark = pytest.mark.integration

TENANT = "acme"
HEADER = "email,first_name,last_name,lists,plan,signup,attr.note\n"
GOOD_ROWS = 400
# Bad rows appended after the good ones, by line (header = 1, good rows = 2..GOOD_ROWS+1).
FIRST_BAD = GOOD_ROWS + 2
BAD_ROWS: list[tuple[bytes, str]] = [
    (b"not-an-address,A,B,l1,pro,2026-01-01,n\n", "not a valid e-mail address: 'not-an-address': An email address must have an @-sign."),
    (b"  ,A,B,l1,pro,2026-01-01,n\n", "empty email"),
    (b"short@example.com,A,B,l1,pro,2026-01-01\n", "expected 7 fields, found 6"),
    (b"long@example.com,A,B,l1,pro,2026-01-01,n,extra\n", "expected 7 fields, found 8"),
    (b"big@example.com,A,B,l1,pro,2026-01-01," + b"x" * 1001 + b"\n",
     "field 'attr.note' is longer than 1000 characters"),
    (b"enc@example.com,Z\xfcrich,B,l1,pro,2026-01-01,n\n", "not valid UTF-8"),
    (b"name@example.com," + b"n" * 201 + b",B,l1,pro,2026-01-01,n\n",
     "first_name and last_name are limited to 200 characters"),
    (b"list@example.com,A,B,l1;no such/list,pro,2026-01-01,n\n", "invalid list id 'no such/list'"),
]


def good_row(n: int) -> bytes:
    """Good rows with what a real export holds: mixed-case domains, padding, quotes, commas,
    a quoted newline, non-ASCII names, several lists, empty cells."""
    plan = ("free", "pro", "team")[n % 3]
    lists = ("l1", "l1;l2", " l2 ; l3 ", "")[n % 4]
    name = ('"Ann ""A"", Jr."', "Zoë", "  Bob  ", '"two\nlines"', "")[n % 5]
    return f'user{n}@Example.COM,{name},Last{n},{lists},{plan},2025-{1 + n % 12:02d}-01,"50% off, \\o/"\n'.encode()


def contacts_csv(path: Path) -> Path:
    with open(path, "wb") as f:
        f.write(HEADER.encode())
        for n in range(GOOD_ROWS):
            f.write(good_row(n))
        for raw, _ in BAD_ROWS:
            f.write(raw)
    return path


def expected_reasons() -> dict[int, str]:
    """Good rows 0..GOOD_ROWS-1 take one physical line each except the quoted-newline names,
    which take two; the bad rows follow."""
    line = 2 + GOOD_ROWS + sum(1 for n in range(GOOD_ROWS) if n % 5 == 3)
    return {line + i: reason for i, (_, reason) in enumerate(BAD_ROWS)}


def expected_payloads(path: Path, base_lists: list[str]) -> dict[int, ContactUpserted]:
    """Line -> the ContactUpserted the import must write for it (the reference parser and the
    pydantic model: the slow, obvious route)."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        rows = [r for r in parse_rows(f) if isinstance(r, ParsedRow)]
    return {
        r.line: ContactUpserted(
            contact_id=contact_id_for(TENANT, r.email), email=r.email, first_name=r.first_name,
            last_name=r.last_name, attributes=r.attributes,
            lists=[*base_lists, *(x for x in r.lists if x not in base_lists)],
        )
        for r in rows
    }


def read_records(settings) -> list[tuple[int, bytes, bytes]]:
    """Every record of contacts.events as (partition, key, value), each partition in order."""
    topic = topic_name(CONTACTS, settings)
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": f"r-{uuid.uuid4()}",
                         "enable.partition.eof": True, "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        unread, out = set(partitions), []
        while unread:
            msg = consumer.poll(30)
            assert msg is not None, f"partitions {unread} never reached their end"
            error = msg.error()
            if error is not None:
                assert error.code() == KafkaError._PARTITION_EOF, error
                unread.discard(msg.partition())
                continue
            out.append((msg.partition() or 0, msg.key() or b"", msg.value() or b""))
        return out
    finally:
        consumer.close()


def by_contact(records) -> dict[bytes, list[Message]]:
    grouped: dict[bytes, list[Message]] = defaultdict(list)
    for _, key, value in records:
        grouped[key].append(decode(value))
    return grouped


def test_exactly_the_good_rows_arrive_and_a_re_import_changes_no_contact(settings, tmp_path):
    path = contacts_csv(tmp_path / "contacts.csv")
    expected = expected_payloads(path, ["all"])
    assert len(expected) == GOOD_ROWS
    progress: list[tuple[int, int]] = []

    report = import_contacts(path, tenant_id=TENANT, list_id="all", settings=settings,
                             on_progress=lambda done, total: progress.append((done, total)))

    assert report.imported == GOOD_ROWS and report.skipped == 0
    assert {r.line: r.reason for r in report.rejected} == expected_reasons()
    assert report.rejected_count == len(BAD_ROWS)
    assert progress[-1] == (path.stat().st_size, path.stat().st_size)
    records = read_records(settings)
    assert len(records) == GOOD_ROWS
    first_ids = set()
    for _, key, value in records:
        message = decode(value)
        line = EnvelopeIds.line_of(value)
        assert message.payload == expected.pop(line)  # each good line exactly once
        assert key == contact_key(TENANT, message.payload.contact_id) == contact_key(
            TENANT, message.envelope.aggregate_id)
        assert message.envelope.tenant_id == TENANT and message.envelope.correlation_id == message.envelope.id
        first_ids.add(message.envelope.id)
    assert expected == {}
    state_after_one = {key: fold_contact(m.payload for m in ms) for key, ms in by_contact(records).items()}
    sample = state_after_one[contact_key(TENANT, contact_id_for(TENANT, "user0@example.com"))]
    assert sample is not None
    assert (sample.first_name, sample.last_name, sample.lists) == ('Ann "A", Jr.', "Last0", {"all", "l1"})
    assert sample.attributes == {"plan": "free", "signup": "2025-01-01", "note": "50% off, \\o/"}

    again = import_contacts(path, tenant_id=TENANT, list_id="all", settings=settings)

    assert (again.imported, again.rejected) == (report.imported, report.rejected)
    records = read_records(settings)
    assert len(records) == 2 * GOOD_ROWS
    grouped = by_contact(records)
    assert set(grouped) == set(state_after_one)  # the same contacts, under the same keys
    assert {key: fold_contact(m.payload for m in ms) for key, ms in grouped.items()} == state_after_one
    second_ids = {m.envelope.id for ms in grouped.values() for m in ms} - first_ids
    assert len(second_ids) == GOOD_ROWS  # new facts, each with its own id


def test_blocklist_suppresses_each_contact_right_after_its_upsert(settings, tmp_path):
    path = tmp_path / "blocklist.csv"
    path.write_text("email,lists\nspam@example.com,l1\nBad@Example.org,\nnot an address,\n")
    report = import_contacts(path, tenant_id=TENANT, list_id=None, settings=settings, mode="blocklist")
    assert report.imported == 2
    assert [(r.line, r.reason) for r in report.rejected] == [
        (4, "not a valid e-mail address: 'not an address': An email address must have an @-sign.")]
    grouped = by_contact(read_records(settings))
    assert len(grouped) == 2
    for messages in grouped.values():
        upsert, suppressed = messages
        assert isinstance(upsert.payload, ContactUpserted) and upsert.payload.lists == []
        assert suppressed.payload == ContactSuppressed(contact_id=upsert.payload.contact_id,
                                                       reason="manual_blocklist", detail=BLOCKLIST_DETAIL)
        assert suppressed.envelope.causation_id == upsert.envelope.id
        state = fold_contact(m.payload for m in messages)
        assert state is not None and state.suppressed_reason == "manual_blocklist"


def test_skip_existing_imports_only_contacts_not_yet_on_the_topic(settings, tmp_path):
    first = tmp_path / "first.csv"
    first.write_text("email,first_name\na@example.com,A\nb@example.com,B\n")
    assert import_contacts(first, tenant_id=TENANT, list_id=None, settings=settings).imported == 2
    second = tmp_path / "second.csv"
    second.write_text("email,first_name\nb@Example.com,changed\nc@example.com,C\na@example.com,changed\n"
                      "c@example.com,again\nd@example.com,D\n")
    report = import_contacts(second, tenant_id=TENANT, list_id=None, settings=settings, mode="skip-existing")
    assert (report.imported, report.skipped, report.rejected_count) == (2, 3, 0)
    payloads = [decode(value).payload for _, _, value in read_records(settings)]
    upserts = [p for p in payloads if isinstance(p, ContactUpserted)]
    assert upserts == payloads
    assert sorted((p.email, p.first_name) for p in upserts) == [
        ("a@example.com", "A"), ("b@example.com", "B"), ("c@example.com", "C"), ("d@example.com", "D")]


def limit_batches_on_the_broker(settings, max_bytes: int) -> None:
    """Set the topic's max.message.bytes and wait until the broker reports it in force."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    topic = topic_name(CONTACTS, settings)
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=[
        ConfigEntry("max.message.bytes", str(max_bytes), incremental_operation=AlterConfigOpType.SET)])
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        [described] = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, topic)]).values()
        if described.result(30)["max.message.bytes"].value == str(max_bytes):
            return
        time.sleep(0.1)
    raise AssertionError(f"max.message.bytes of {topic} never became {max_bytes}")


def test_records_the_broker_or_producer_refuse_reject_their_rows_with_the_line(settings, tmp_path):
    # The broker takes record batches up to 20 kB on this topic: the 60 kB row is refused by the
    # broker, the 1.1 MB row already by the producer (message.max.bytes, 1 MB). Nothing else is
    # in the file, so no good row shares a refused batch. Blocklist: a row of two records is
    # rejected once.
    limit_batches_on_the_broker(settings, 20_000)
    columns = 1_400
    noise = [base64.b64encode(os.urandom(600)).decode() for _ in range(columns)]  # incompressible
    path = tmp_path / "huge.csv"
    path.write_text(
        "email," + ",".join(f"c{i}" for i in range(columns)) + "\n"
        + "broker@example.com," + ",".join(noise[:75]) + "," * (columns - 75) + "\n"
        + "producer@example.com," + ",".join(noise) + "\n"
    )
    report = import_contacts(path, tenant_id=TENANT, list_id=None, settings=settings, mode="blocklist")
    assert report.imported == 0 and report.rejected_count == 2
    by_line = {r.line: r.reason for r in report.rejected}
    assert by_line[2].startswith("not acknowledged by Kafka: ") and "too large" in by_line[2].lower()
    assert by_line[3].startswith("not accepted by the Kafka producer: ") and "too large" in by_line[3].lower()


def test_cli_imports_another_tools_export_through_a_column_mapping(settings, tmp_path):
    from typer.testing import CliRunner

    from services.cli.main import app
    from tests.service_process import service_env

    path = tmp_path / "export.csv"
    path.write_text("E-Mail Address,Given Name,Tier,Internal\nann@Example.com,Ann,pro,x\nnot-mail,Bob,free,y\n")
    result = CliRunner().invoke(app, [
        "contacts", "import", str(path), "--tenant", TENANT, "--list", "all", "--column", "E-Mail Address=email",
        "--column", "given name=first_name", "--column", "Tier=attr.plan", "--column", "Internal=-",
    ], env=service_env(settings))
    assert result.exit_code == 0, result.output
    assert "imported 1 contacts" in result.stdout and "line 3: not a valid e-mail address" in result.stdout
    [(_, key, value)] = read_records(settings)
    assert key == contact_key(TENANT, contact_id_for(TENANT, "ann@example.com"))
    assert decode(value).payload == ContactUpserted(
        contact_id=contact_id_for(TENANT, "ann@example.com"), email="ann@example.com", first_name="Ann",
        attributes={"plan": "pro"}, lists=["all"])
    bad = CliRunner().invoke(app, ["contacts", "import", str(path), "--tenant", TENANT, "--column", "Mail=email"],
                             env=service_env(settings))
    assert bad.exit_code == 1 and "'Mail', which is not in the header" in bad.stderr
