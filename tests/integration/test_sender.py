"""The sender against the real broker, PostgreSQL and the SMTP sink.

Each test uses fresh topics (the `settings` fixture) and a random campaign id, and checks
the exact output: the sink's record (what was mailed) and campaign.deliveries (what was
reported), plus the send ledger.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import Consumer, Producer

from schemas.envelope import Message, decode, encode, wrap
from schemas.events import EmailFailed, EmailSent, MessageTemplate, RecipientQueued
from services.common.settings import Settings
from services.common.topics import DELIVERIES, RECIPIENTS, topic_name
from services.sender.delivery import Outcome
from services.sender.ledger import ClaimState, LedgerEntry, SendLedger
from services.sender.mime import OutgoingMail
from services.sender.replies import Verdict
from services.sender.smtp_pool import SmtpPool
from services.sender.worker import SenderWorker
from services.smtp_sink import SinkConfig, SmtpSink

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
TENANT = "acme"
TEMPLATE = MessageTemplate(
    subject='Hello {{ first_name | "there" }}, news for {{ attr.city }}',
    from_address="news@example.com",
    body_text="Hi {{ first_name }},\nour news.\n",
    body_html="<p>Hi {{ first_name }}</p>",
)


# --- helpers -------------------------------------------------------------------------------


def recipients(count: int, campaign_id: str | None = None) -> list[RecipientQueued]:
    campaign_id = campaign_id or f"cmp-{uuid.uuid4()}"
    return [
        RecipientQueued(
            campaign_id=campaign_id,
            contact_id=f"ct-{i}",
            email=f"user{i}@example.org",
            first_name=f"First{i}" if i % 10 else "",  # every 10th has no name: the fallback
            attributes={"city": f"City{i % 7}"},
            template=TEMPLATE,
        )
        for i in range(count)
    ]


def expected_subject(r: RecipientQueued) -> str:
    return f"Hello {r.first_name or 'there'}, news for {r.attributes['city']}"


def produce(settings: Settings, items: list[RecipientQueued], *,
            extra: tuple[bytes, ...] = ()) -> None:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers, "linger.ms": 5})
    topic = topic_name(RECIPIENTS, settings)
    for raw in extra:
        producer.produce(topic, key=b"junk", value=raw)
    for r in items:
        envelope = wrap(r, tenant_id=TENANT, aggregate_id=r.campaign_id)
        producer.produce(topic, key=f"{TENANT}:{r.contact_id}".encode(), value=encode(envelope))
        producer.poll(0)
    assert producer.flush(30) == 0


def read_deliveries(settings: Settings, at_least: int, timeout: float = 60.0,
                    settle: float = 1.5) -> list[Message]:
    """Every record on the deliveries topic once at least `at_least` arrived (then lingers a
    moment so extra records are seen too)."""
    consumer = Consumer({
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "group.id": f"reader-{uuid.uuid4()}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    })
    consumer.subscribe([topic_name(DELIVERIES, settings)])
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    reached: float | None = None
    try:
        while time.monotonic() < deadline:
            for record in consumer.consume(1000, 0.3):
                assert record.error() is None, record.error()
                out.append(decode(record.value()))
            if len(out) >= at_least:
                reached = reached or time.monotonic()
                if time.monotonic() - reached >= settle:
                    break
    finally:
        consumer.close()
    assert len(out) >= at_least, f"only {len(out)} of {at_least} delivery events"
    return out


def ledger_rows(settings: Settings, campaign_id: str) -> list[dict]:
    with psycopg.connect(settings.database_url) as conn:
        cur = conn.execute(
            "SELECT contact_id, status, claims, attempts, ambiguous, smtp_code, smtp_reply,"
            " reason, permanent, message_id FROM send_ledger WHERE campaign_id = %s",
            (campaign_id,),
        )
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


@contextlib.contextmanager
def running_sender(settings: Settings, concurrency: int = 8) -> Iterator[SenderWorker]:
    stop = threading.Event()
    worker = SenderWorker(settings, concurrency=concurrency)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            worker.run(stop)
        except BaseException as exc:  # surfaced in the test, not lost in the thread
            errors.append(exc)

    thread = threading.Thread(target=run, name="sender", daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive(), "sender did not stop"
    assert not errors, errors


def sender_env(settings: Settings, smtp_port: int) -> dict[str, str]:
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "DATABASE_URL": settings.database_url,
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp_port),
        "TOPIC_PREFIX": settings.topic_prefix,
        "PYTHONUNBUFFERED": "1",
    }


def wait_until(condition, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.1)


# --- SMTP pool against the sink's faults (no Kafka) ----------------------------------------------

MAIL = OutgoingMail(
    "<c.k@example.com>", "news@example.com", "jane@example.org",
    b"From: news@example.com\r\nTo: jane@example.org\r\nSubject: t\r\n\r\nbody\r\n.dot\r\n",
)


@pytest.mark.parametrize(
    ("config", "verdict", "code", "ambiguous"),
    [
        ({}, Verdict.SENT, 250, False),
        ({"tempfail_rate": 1.0}, Verdict.TRANSIENT, 451, False),
        ({"permfail_rate": 1.0}, Verdict.PERMANENT, 550, False),
        ({"drop_rate": 1.0}, Verdict.TRANSIENT, None, True),
        ({"drop_before_data_rate": 1.0}, Verdict.TRANSIENT, None, False),
    ],
)
def test_pool_classifies_what_the_relay_does(config, verdict, code, ambiguous):
    with SmtpSink(SinkConfig(port=0, **config)) as sink:
        pool = SmtpPool("127.0.0.1", sink.port, 2)
        try:
            attempts = [pool.transmit(MAIL) for _ in range(3)]  # also: reconnects after drops
        finally:
            pool.close()
        assert {(a.verdict, a.code, a.ambiguous) for a in attempts} == {(verdict, code, ambiguous)}
        if verdict is Verdict.SENT:
            assert len(sink.messages) == 3
            assert sink.messages[0]["body"].replace("\r\n", "\n") == "body\n.dot\n"  # dot-stuffed
        else:
            assert sink.messages == []


# --- the send ledger (PostgreSQL only) -------------------------------------------------------------


def test_ledger_claim_states(settings):
    campaign = f"cmp-{uuid.uuid4()}"
    entry = LedgerEntry(campaign, "k1", TENANT, f"<{campaign}.k1@example.com>")
    other = LedgerEntry(campaign, "k2", TENANT, f"<{campaign}.k2@example.com>")
    ledger = SendLedger(settings.database_url)
    try:
        assert ledger.claim([entry, other])[entry.key].state is ClaimState.FRESH
        # Claimed again without a settlement: the outcome of the first claim is unknown.
        assert ledger.claim([entry])[entry.key].state is ClaimState.UNSETTLED
        ledger.settle({entry.key: Outcome(True, 2, 250, "250 OK", ambiguous=1),
                       other.key: Outcome(False, 1, 550, "550 no", permanent=True)})
        claims = ledger.claim([entry, other])
        assert claims[entry.key].state is ClaimState.SETTLED
        assert claims[entry.key].outcome == Outcome(True, 2, 250, "250 OK", ambiguous=2)
        assert claims[other.key].outcome == Outcome(False, 1, 550, "550 no", permanent=True)
    finally:
        ledger.close()
    rows = {r["contact_id"]: r for r in ledger_rows(settings, campaign)}
    assert rows["k1"]["claims"] == 3 and rows["k1"]["ambiguous"] == 2
    assert rows["k2"]["status"] == "failed" and rows["k2"]["reason"] == "550 no"


# --- the worker --------------------------------------------------------------------------------


def test_mails_each_recipient_once_and_replays_outcomes_on_redelivery(settings):
    batch = recipients(300)
    campaign = batch[0].campaign_id
    junk = [b"{not json", encode(wrap(EmailFailed(campaign_id="x", contact_id="y", email="a@b.cd",
                                                  attempt=1, reason="r", permanent=True),
                                      tenant_id=TENANT, aggregate_id="x"))]
    produce(settings, batch, extra=tuple(junk))
    with SmtpSink(SinkConfig(port=0)) as sink, running_sender(replace(settings, smtp_port=sink.port)):
        assert sink.wait_for_messages(300, timeout=60)
        first = read_deliveries(settings, 300)
        # The same recipients again, as after a crash or rebalance upstream.
        produce(settings, batch)
        events = read_deliveries(settings, 600)
        time.sleep(1)
        records = sink.messages

    assert len(records) == 300
    by_rcpt = {rec["rcpt_tos"][0]: rec for rec in records}
    assert len(by_rcpt) == 300
    for r in batch:
        rec = by_rcpt[r.email]
        assert rec["subject"] == expected_subject(r)
        assert rec["message_id"] == f"<{campaign}.{r.contact_id}@example.com>"
        assert rec["mail_from"] == "news@example.com"

    assert len(first) == 300 and all(isinstance(e.payload, EmailSent) for e in first)
    assert len(events) == 600
    per_contact = Counter(e.payload.contact_id for e in events)
    assert set(per_contact) == {r.contact_id for r in batch}
    assert set(per_contact.values()) == {2}
    for event in events:
        payload = event.payload
        assert isinstance(payload, EmailSent) and payload.attempt == 1
        assert payload.message_id == f"<{campaign}.{payload.contact_id}@example.com>"
        assert payload.smtp_reply.startswith("250")
        assert event.envelope.aggregate_id == campaign and event.envelope.tenant_id == TENANT
        assert event.envelope.causation_id is not None

    rows = ledger_rows(settings, campaign)
    assert len(rows) == 300
    assert {(r["status"], r["claims"], r["ambiguous"]) for r in rows} == {("sent", 2, 0)}


def test_copies_within_one_batch_are_mailed_once_and_each_reported(settings):
    batch = recipients(40)
    produce(settings, batch + batch)  # both copies are waiting when the sender starts
    with SmtpSink(SinkConfig(port=0)) as sink, running_sender(replace(settings, smtp_port=sink.port)):
        events = read_deliveries(settings, 80)
        time.sleep(0.5)
        records = sink.messages
    assert len(records) == 40
    assert len(events) == 80 and all(isinstance(e.payload, EmailSent) for e in events)
    # Usually one batch holds both copies (claims == 1); if the fetch split them, the second
    # copy met a settled entry (claims == 2). Either way: mailed once, never ambiguous.
    rows = ledger_rows(settings, batch[0].campaign_id)
    assert {(r["status"], r["ambiguous"]) for r in rows} == {("sent", 0)}


def test_permanent_refusals_fail_for_good_without_retry(settings):
    batch = recipients(50)
    produce(settings, batch)
    with SmtpSink(SinkConfig(port=0, permfail_rate=1.0)) as sink, \
            running_sender(replace(settings, smtp_port=sink.port)):
        events = read_deliveries(settings, 50)
        stats = sink.stats
    assert len(events) == 50
    assert all(isinstance(e.payload, EmailFailed) for e in events)
    assert {(e.payload.permanent, e.payload.smtp_code, e.payload.attempt) for e in events} == {
        (True, 550, 1)
    }
    assert stats["permfail"] == 50 and sink.messages == []
    rows = ledger_rows(settings, batch[0].campaign_id)
    assert {(r["status"], r["permanent"], r["smtp_code"]) for r in rows} == {("failed", True, 550)}


def test_transient_failures_are_retried_in_process(settings):
    batch = recipients(300)
    produce(settings, batch)
    with SmtpSink(SinkConfig(port=0, tempfail_rate=0.3, seed=11)) as sink, \
            running_sender(replace(settings, smtp_port=sink.port)):
        events = read_deliveries(settings, 300)
        records = sink.messages
    assert len(events) == 300
    assert {e.payload.contact_id for e in events} == {r.contact_id for r in batch}
    sent = [e.payload for e in events if isinstance(e.payload, EmailSent)]
    failed = [e.payload for e in events if isinstance(e.payload, EmailFailed)]
    assert len(sent) == len(records)  # nothing mailed that was not reported, and vice versa
    assert len({rec["rcpt_tos"][0] for rec in records}) == len(records)
    assert any(s.attempt > 1 for s in sent)
    assert all(not f.permanent and f.smtp_code == 451 and f.attempt == 3 for f in failed)
    # 0.3 ** 3 of 300: a handful at most fail after three attempts.
    assert len(failed) < 30


def test_lost_replies_after_data_are_counted_as_ambiguous(settings):
    batch = recipients(100)
    produce(settings, batch)
    with SmtpSink(SinkConfig(port=0, drop_rate=0.2, seed=3)) as sink, \
            running_sender(replace(settings, smtp_port=sink.port)):
        events = read_deliveries(settings, 100)
        dropped = sink.stats["drop_after_data"]
    assert len(events) == 100
    rows = ledger_rows(settings, batch[0].campaign_id)
    assert dropped > 0
    assert sum(r["ambiguous"] for r in rows) == dropped


def test_a_claim_left_unsettled_by_a_crash_is_mailed_again_and_counted(settings):
    batch = recipients(3)
    campaign = batch[0].campaign_id
    # What a sender that died between claim and settle leaves behind.
    ledger = SendLedger(settings.database_url)
    ledger.claim([LedgerEntry(campaign, batch[0].contact_id, TENANT, "<id>")])
    ledger.claim([LedgerEntry(campaign, batch[1].contact_id, TENANT, "<id>")])
    ledger.settle({(campaign, batch[1].contact_id): Outcome(False, 3, 451, "451 later")})
    ledger.close()
    produce(settings, batch)
    with SmtpSink(SinkConfig(port=0)) as sink, running_sender(replace(settings, smtp_port=sink.port)):
        events = read_deliveries(settings, 3)
        mailed = sorted(rec["rcpt_tos"][0] for rec in sink.messages)
    assert mailed == sorted([batch[0].email, batch[2].email])  # the settled one is not mailed
    outcome = {e.payload.contact_id: e.payload for e in events}
    replayed = outcome[batch[1].contact_id]
    assert isinstance(replayed, EmailFailed) and replayed.reason == "451 later"
    assert replayed.attempt == 3 and not replayed.permanent
    rows = {r["contact_id"]: r for r in ledger_rows(settings, campaign)}
    assert rows[batch[0].contact_id]["ambiguous"] == 1
    assert rows[batch[2].contact_id]["ambiguous"] == 0


def test_sigterm_finishes_the_batch_and_exits_zero(settings):
    batch = recipients(3000)
    produce(settings, batch)
    with SmtpSink(SinkConfig(port=0, latency_ms=2)) as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.sender"], cwd=REPO_ROOT,
            env=sender_env(settings, sink.port), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            wait_until(lambda: len(sink.messages) >= 200, 60, "sender mailed nothing")
            process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            code = process.wait(timeout=20)
            took = time.monotonic() - started
        finally:
            if process.poll() is None:
                process.kill()
        stderr = process.stderr.read().decode() if process.stderr else ""
        assert code == 0, stderr[-3000:]
        assert took < 10, f"took {took:.1f}s to stop"
        mailed_at_stop = len(sink.messages)
        assert mailed_at_stop < len(batch), "stopped too late to test anything"
        # Everything mailed before the stop was settled and reported (the in-flight batch
        # completed); a new sender finishes the rest without mailing anyone twice.
        assert len(read_deliveries(settings, mailed_at_stop)) == mailed_at_stop
        with running_sender(replace(settings, smtp_port=sink.port)):
            events = read_deliveries(settings, len(batch), timeout=120)
        records = sink.messages
    assert "sender stopped" in stderr
    assert len(events) == len(batch)
    assert len(records) == len({rec["rcpt_tos"][0] for rec in records}) == len(batch)
    rows = ledger_rows(settings, batch[0].campaign_id)
    assert sum(r["ambiguous"] for r in rows) == 0


def test_throughput(settings):
    """Mails per second of one `python -m services.sender` (8 connections) against the
    in-process sink with no latency; measured between the first and the last accepted
    message, so group join and start-up are not counted. Printed; the floor is loose because
    the machine is shared with other test runs."""
    count = 5000
    produce(settings, recipients(count))
    with SmtpSink(SinkConfig(port=0)) as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.sender"], cwd=REPO_ROOT,
            env=sender_env(settings, sink.port), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert sink.wait_for_messages(count, timeout=180)
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
        stamps = sorted(datetime.fromisoformat(rec["received_at"]) for rec in sink.messages)
    seconds = (stamps[-1] - stamps[0]).total_seconds()
    rate = (count - 1) / seconds
    print(f"\nsender throughput: {rate:.0f} mails/s ({count} mails in {seconds:.2f}s)")
    assert rate > 100
