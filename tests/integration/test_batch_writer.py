"""The batch writer's ways of writing a large batch of recipients agree, against the real
database.

A large batch is first tried as all new unless the connection's last such batch found existing
rows: a COPY straight into campaign_recipients where the session may (row-level security does
not apply to it: the test platform's superuser), else a plain insert counted from the staging
table. These tests run the same batches each of those ways and forced through the general
statement, and compare every row and counter.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest

from projections import batch_writer, read_models
from projections.facts import RecipientFact, RecipientStatus

pytestmark = pytest.mark.integration

T0 = datetime(2030, 5, 1, 8, 0, tzinfo=UTC)
# Larger than ARRAY_BATCH_MAX: these batches go through the staging table.
BATCH = batch_writer.ARRAY_BATCH_MAX + 100


@pytest.fixture
def db(platform_settings: Any) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(platform_settings.database_url, autocommit=True) as conn:
        batch_writer.prepare_session(conn)
        yield conn


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
    """A backlog of new recipients in every status, then a batch mixing new ones (sorted
    first, so a failed all-new try has already inserted some when it meets an existing row)
    with duplicates and climbs of existing ones."""
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


def apply_batches(conn: psycopg.Connection[Any], tenant: str, campaign: str, *,
                  general_only: bool) -> None:
    for facts in batches(tenant, campaign):
        if general_only:
            batch_writer._FOUND_EXISTING.add(conn)
        with conn.transaction():
            batch_writer.apply(conn, read_models.plan(facts))


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


# The two all-new tries: (the function, whether the session copies straight into the table).
TRIES = {"copy": ("_copy_all_new", True), "staged": ("_insert_all_new", False)}


@pytest.mark.parametrize("way", sorted(TRIES))
def test_the_all_new_try_and_the_general_statement_write_the_same(db, monkeypatch, way) -> None:
    name, direct = TRIES[way]
    tried: list[bool] = []
    real_try = getattr(batch_writer, name)

    def recording_try(*args: Any) -> bool:
        tried.append(real_try(*args))
        return tried[-1]

    monkeypatch.setattr(batch_writer, name, recording_try)
    monkeypatch.setitem(batch_writer._COPIES_DIRECT, db, direct)
    runs = {}
    for general_only in (False, True):
        tenant = f"tenant-{uuid.uuid4().hex[:8]}"
        campaign = f"camp-{uuid.uuid4()}"
        batch_writer._FOUND_EXISTING.discard(db)
        try:
            apply_batches(db, tenant, campaign, general_only=general_only)
            runs[general_only] = snapshot(db, tenant, campaign)
        finally:
            db.execute("DELETE FROM campaign_recipients WHERE campaign_id = %s", (campaign,))
            db.execute("DELETE FROM recipient_attempts WHERE campaign_id = %s", (campaign,))
            db.execute("DELETE FROM campaign_throughput WHERE campaign_id = %s", (campaign,))
            db.execute("DELETE FROM campaigns WHERE campaign_id = %s", (campaign,))
            db.execute("DELETE FROM tenant_daily_sends WHERE tenant_id = %s", (tenant,))
        # The first batch went in by the all-new try; the second one's try met existing
        # rows after inserting some new ones, and was undone.
        assert tried == ([] if general_only else [True, False])
        tried.clear()

    assert runs[False] == runs[True]
    final = final_statuses()
    queued, excluded, retrying, sent, failed, skipped, ambiguous, last = runs[True]["counters"]
    assert (queued, excluded, retrying, sent, failed, skipped) == (
        sum(f != "excluded" for f in final), final.count("excluded"), final.count("retrying"),
        final.count("sent"), final.count("failed"), final.count("skipped"))
    assert ambiguous == sum(i % 2 for i in range(BATCH) if first_status(i) in ("sent", "failed"))
    assert last == T0 + timedelta(seconds=30)
    assert sorted(row[2] for row in runs[True]["rows"]) == sorted(final)
    assert sum(settled for _, settled in runs[True]["throughput"]) == (
        final.count("sent") + final.count("failed") + final.count("skipped"))


def test_a_superuser_session_copies_straight_into_the_table(db) -> None:
    assert batch_writer._may_copy_direct(db) is True


@pytest.mark.parametrize("way", sorted(TRIES))
def test_only_a_connection_whose_last_large_batch_found_no_rows_tries_all_new(
        db, monkeypatch, way) -> None:
    name, direct = TRIES[way]
    calls: list[bool] = []

    def declining_try(*args: Any) -> bool:
        calls.append(True)
        return False  # as if some row existed: the general statement follows

    monkeypatch.setattr(batch_writer, name, declining_try)
    monkeypatch.setitem(batch_writer._COPIES_DIRECT, db, direct)
    tenant, campaign = f"tenant-{uuid.uuid4().hex[:8]}", f"camp-{uuid.uuid4()}"
    first, second = batches(tenant, campaign)
    try:
        batch_writer._FOUND_EXISTING.add(db)
        with db.transaction():
            batch_writer.apply(db, read_models.plan(first))
        # No row of it existed: the next batch tries the all-new insert again ...
        assert calls == [] and db not in batch_writer._FOUND_EXISTING
        with db.transaction():
            batch_writer.apply(db, read_models.plan(second))
        # ... which found existing rows, so the one after that does not.
        assert calls == [True] and db in batch_writer._FOUND_EXISTING
        with db.transaction():
            batch_writer.apply(db, read_models.plan(second))
        assert calls == [True]
    finally:
        db.execute("DELETE FROM campaign_recipients WHERE campaign_id = %s", (campaign,))
        db.execute("DELETE FROM recipient_attempts WHERE campaign_id = %s", (campaign,))
        db.execute("DELETE FROM campaign_throughput WHERE campaign_id = %s", (campaign,))
        db.execute("DELETE FROM campaigns WHERE campaign_id = %s", (campaign,))
        db.execute("DELETE FROM tenant_daily_sends WHERE tenant_id = %s", (tenant,))


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


@pytest.mark.parametrize("way", ["copy", "staged", "general"])
def test_copied_rows_land_with_every_value_unchanged(db, monkeypatch, way) -> None:
    """Each COPY path (straight into campaign_recipients; into the staging table, then the
    all-new insert or the general statement) stores exactly the planned rows."""
    monkeypatch.setitem(batch_writer._COPIES_DIRECT, db, way == "copy")
    tenant, campaign = f"tenant-{uuid.uuid4().hex[:8]}", f"camp-{uuid.uuid4()}"
    changes = read_models.plan(odd_facts(tenant, campaign))
    expected = sorted(changes.recipients.values(), key=lambda row: row.contact_id)
    assert len(expected) > batch_writer.ARRAY_BATCH_MAX  # through COPY, not arrays
    batch_writer._FOUND_EXISTING.discard(db)
    if way == "general":
        batch_writer._FOUND_EXISTING.add(db)
    try:
        with db.transaction():
            batch_writer.apply(db, changes)
        stored = db.execute(
            "SELECT tenant_id, campaign_id, contact_id, email, status, attempts, last_error,"
            " reason, smtp_code, ambiguous, last_event_at FROM campaign_recipients"
            " WHERE campaign_id = %s ORDER BY contact_id COLLATE \"C\"", (campaign,)).fetchall()
    finally:
        batch_writer._FOUND_EXISTING.discard(db)
        db.execute("DELETE FROM campaign_recipients WHERE campaign_id = %s", (campaign,))
        db.execute("DELETE FROM campaign_throughput WHERE campaign_id = %s", (campaign,))
        db.execute("DELETE FROM campaigns WHERE campaign_id = %s", (campaign,))
        db.execute("DELETE FROM tenant_daily_sends WHERE tenant_id = %s", (tenant,))
    assert [tuple(row) for row in stored] == [tuple(row) for row in expected]
