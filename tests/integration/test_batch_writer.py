"""The batch writer's one recipient path (COPY into the staging table, then one statement)
against the real database: exact counters for new and existing recipients whatever the batch
size, every value carried unchanged, and a session without the staging table yet.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest

from projections import batch_writer, read_models
from projections.batch_writer import BatchWriter
from projections.facts import RecipientFact, RecipientStatus

pytestmark = pytest.mark.integration

T0 = datetime(2030, 5, 1, 8, 0, tzinfo=UTC)
BATCH = 600


@pytest.fixture
def db(platform_settings: Any) -> Iterator[BatchWriter]:
    with psycopg.connect(platform_settings.database_url, autocommit=True) as conn:
        writer = BatchWriter(conn)
        writer.prepare_session()
        yield writer


def fact(tenant: str, campaign: str, contact: str, status: RecipientStatus, *,
         seconds: int, attempt: int = 1, ambiguous: int = 0) -> RecipientFact:
    return RecipientFact(
        str(uuid.uuid4()), "test", tenant, campaign, contact, f"{contact}@example.com", status,
        attempt if status in ("sent", "failed", "retrying") else 0,
        T0 + timedelta(seconds=seconds), ambiguous=ambiguous,
        smtp_code=550 if status == "failed" else None,
        detail="550 no such user" if status == "failed" else None,
    )


def first_status(i: int) -> RecipientStatus:
    for divisor, status in ((7, "failed"), (11, "excluded"), (13, "skipped"), (17, "retrying"),
                            (19, "queued")):
        if i % divisor == 0:
            return status  # type: ignore[return-value]
    return "sent"


def batches(tenant: str, campaign: str) -> list[list[RecipientFact]]:
    """A backlog of new recipients in every status, then a batch mixing new ones with
    duplicates and climbs of existing ones."""
    first = [fact(tenant, campaign, f"k-b-{i:04d}", first_status(i), seconds=i % 3,
                  ambiguous=i % 2) for i in range(BATCH)]
    second = [fact(tenant, campaign, f"k-a-{i:04d}", "queued" if i % 5 else "excluded",
                   seconds=10) for i in range(BATCH)]
    second += [fact(tenant, campaign, f"k-b-{i:04d}", "sent", seconds=20) for i in range(100)]
    second += [fact(tenant, campaign, f"k-a-{i:04d}", "sent", seconds=30)
               for i in range(0, BATCH, 3)]
    return [first, second]


def final_statuses() -> list[str]:
    """Each recipient's status after both batches (statuses only climb; terminal ones stay)."""
    climbing = ("excluded", "queued", "retrying")
    older = ["sent" if i < 100 and first_status(i) in climbing else first_status(i)
             for i in range(BATCH)]
    newer = ["sent" if i % 3 == 0 else "queued" if i % 5 else "excluded" for i in range(BATCH)]
    return older + newer


def apply_batches(writer: BatchWriter, tenant: str, campaign: str, *, size: int) -> None:
    """Both batches of `batches`, `size` facts per transaction."""
    for facts in batches(tenant, campaign):
        for start in range(0, len(facts), size):
            with writer.conn.transaction():
                writer.apply(read_models.plan(facts[start:start + size]))


def forget(conn: psycopg.Connection[Any], tenant: str, campaign: str) -> None:
    for table in ("campaign_recipients", "recipient_attempts", "campaign_throughput",
                  "campaigns"):
        conn.execute(f"DELETE FROM {table} WHERE campaign_id = %s", (campaign,))  # noqa: S608
    conn.execute("DELETE FROM tenant_daily_sends WHERE tenant_id = %s", (tenant,))


def snapshot(conn: psycopg.Connection[Any], tenant: str, campaign: str) -> dict[str, Any]:
    counters = conn.execute(
        "SELECT queued, excluded, retrying, sent, failed, skipped, ambiguous, last_delivery_at"
        " FROM campaigns WHERE campaign_id = %s", (campaign,)).fetchone()
    rows = conn.execute(
        "SELECT contact_id, email, status, attempts, last_error, reason, smtp_code, ambiguous,"
        " last_event_at FROM campaign_recipients WHERE campaign_id = %s ORDER BY contact_id",
        (campaign,)).fetchall()
    daily = conn.execute("SELECT day, sent, failed, skipped FROM tenant_daily_sends"
                         " WHERE tenant_id = %s ORDER BY day", (tenant,)).fetchall()
    throughput = conn.execute("SELECT second, settled FROM campaign_throughput"
                              " WHERE campaign_id = %s ORDER BY second", (campaign,)).fetchall()
    return {"counters": counters, "rows": rows, "daily": daily, "throughput": throughput}


def test_new_and_existing_recipients_count_exactly_whatever_the_batch_size(db) -> None:
    runs = {}
    for size in (10_000, 97):
        tenant = f"tenant-{uuid.uuid4().hex[:8]}"
        campaign = f"camp-{uuid.uuid4()}"
        try:
            apply_batches(db, tenant, campaign, size=size)
            runs[size] = snapshot(db.conn, tenant, campaign)
        finally:
            forget(db.conn, tenant, campaign)

    assert runs[10_000] == runs[97]
    final = final_statuses()
    queued, excluded, retrying, sent, failed, skipped, ambiguous, last = runs[97]["counters"]
    assert (queued, excluded, retrying, sent, failed, skipped) == (
        sum(f != "excluded" for f in final), final.count("excluded"), final.count("retrying"),
        final.count("sent"), final.count("failed"), final.count("skipped"))
    assert ambiguous == sum(i % 2 for i in range(BATCH) if first_status(i) in ("sent", "failed"))
    assert last == T0 + timedelta(seconds=30)
    assert sorted(row[2] for row in runs[97]["rows"]) == sorted(final)
    assert sum(settled for _, settled in runs[97]["throughput"]) == (
        final.count("sent") + final.count("failed") + final.count("skipped"))


def test_a_session_without_the_staging_table_creates_it_inside_the_batch(
        platform_settings: Any) -> None:
    tenant, campaign = f"tenant-{uuid.uuid4().hex[:8]}", f"camp-{uuid.uuid4()}"
    first, _ = batches(tenant, campaign)
    with psycopg.connect(platform_settings.database_url, autocommit=True) as conn:
        try:
            for facts in (first[:50], first[50:]):  # the second batch finds it there
                with conn.transaction():
                    batch_writer.apply(conn, read_models.plan(facts))
            assert conn.execute("SELECT sent FROM campaigns WHERE campaign_id = %s",
                                (campaign,)).fetchone() == (first_status_count("sent"),)
        finally:
            forget(conn, tenant, campaign)


def test_the_writers_session_plans_without_jit(db) -> None:
    # A batch's estimate crosses the JIT thresholds (the staging table is never analysed);
    # compiling then costs several times the statement.
    assert db.conn.execute("SHOW jit").fetchone() == ("off",)


def first_status_count(status: str) -> int:
    return sum(first_status(i) == status for i in range(BATCH))


# Values the binary COPY must carry unchanged: non-ASCII and escaping-prone text, NULLs, the
# int4 extremes, times in several zones with microseconds.
TEXTS = ["", "é", "ünïcødé ✉", "😀", "tab\there", 'quote"back\\slash', "x" * 300]
ZONES = [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-11))]


def odd_facts(tenant: str, campaign: str) -> list[RecipientFact]:
    facts = []
    for i in range(BATCH):
        status: RecipientStatus = ("sent", "failed", "queued", "excluded", "skipped")[i % 5]
        text = TEXTS[i % len(TEXTS)]
        facts.append(RecipientFact(
            str(uuid.uuid4()), "test", tenant, campaign, f"k-{i:04d}-{text[:8]}",
            f"{text[:5]}{i}@example.com", status,
            (1, 2**31 - 1, 7)[i % 3] if status in ("sent", "failed") else 0,
            datetime(2030 + i % 50, 1 + i % 12, 1 + i % 28, i % 24, i % 60, i % 60, i * 997 % 10**6,
                     tzinfo=ZONES[i % len(ZONES)]),
            ambiguous=i % 3 if status in ("sent", "failed") else 0,
            smtp_code=(None, 550, -421, 2**31 - 1)[i % 4] if status == "failed" else None,
            detail=(None if i % 2 else text) if status in ("failed", "skipped", "excluded") else None,
        ))
    return facts


def test_copied_rows_land_with_every_value_unchanged(db) -> None:
    """The binary COPY into the staging table and the statement after it store exactly the
    planned rows."""
    tenant, campaign = f"tenant-{uuid.uuid4().hex[:8]}", f"camp-{uuid.uuid4()}"
    changes = read_models.plan(odd_facts(tenant, campaign))
    expected = sorted(changes.recipients.values(), key=lambda row: row.contact_id)
    try:
        with db.conn.transaction():
            db.apply(changes)
        stored = db.conn.execute(
            "SELECT tenant_id, campaign_id, contact_id, email, status, attempts, last_error,"
            " reason, smtp_code, ambiguous, last_event_at FROM campaign_recipients"
            " WHERE campaign_id = %s ORDER BY contact_id COLLATE \"C\"", (campaign,)).fetchall()
    finally:
        forget(db.conn, tenant, campaign)
    assert [tuple(row) for row in stored] == [tuple(row) for row in expected]
