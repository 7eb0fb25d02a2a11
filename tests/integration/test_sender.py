"""The sender against the real broker, PostgreSQL and the SMTP sink.

Each test uses fresh topics (the `settings` fixture) and a random campaign id, and checks
the exact output: the sink's record (what was mailed) and campaign.deliveries (what was
reported), plus the send ledger.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import replace

import psycopg
import pytest

from schemas.contacts import ContactSuppressed
from schemas.envelope import encode, wrap
from schemas.events import EmailDeferred, EmailFailed, EmailSent, RecipientRetryScheduled
from services.common.topics import CONTACTS, RETRY_TIERS
from services.sender.delivery import Outcome, Status
from services.sender.ledger import _SETTLE, ClaimState, LedgerEntry, SendLedger
from services.sender.mime import OutgoingMail
from services.sender.replies import Verdict
from services.sender.smtp_pool import SMTPUTF8_REFUSAL, SmtpPool
from services.smtp_sink import SinkConfig, SmtpSink
from tests.integration.sender_kit import (
    REPO_ROOT,
    TENANT,
    deliveries_until,
    expected_subject,
    ledger_rows,
    produce,
    read_deliveries,
    recipients,
    running_sender,
    sender_env,
    terminal_for_all,
    wait_until,
)
from tests.kafka_io import read_topic

pytestmark = pytest.mark.integration

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
        # The content went out with MAIL and RCPT (BDAT): a drop at RCPT may have been after
        # the relay took it, as far as the sender can tell. With DATA it cannot have.
        ({"drop_before_data_rate": 1.0}, Verdict.TRANSIENT, None, True),
        ({"drop_before_data_rate": 1.0, "chunking": False}, Verdict.TRANSIENT, None, False),
        ({"chunking": False}, Verdict.SENT, 250, False),
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
            # Dot-stuffed (DATA) or counted (BDAT): the same body arrives.
            assert sink.messages[0]["body"].replace("\r\n", "\n") == "body\n.dot\n"
        else:
            assert sink.messages == []


def test_pool_mails_non_ascii_addresses_with_smtputf8_and_keeps_the_envelope_exact():
    mails = [
        OutgoingMail("<c.k1@example.com>", "news@example.com", "jörg@example.de", MAIL.content),
        OutgoingMail("<c.k2@example.com>", "news@example.com", "o'neil+tag@example.org",
                     MAIL.content),
    ]
    with SmtpSink(SinkConfig(port=0)) as sink:
        pool = SmtpPool("127.0.0.1", sink.port, 1)
        try:
            attempts = [pool.transmit(mail) for mail in mails]
        finally:
            pool.close()
        assert [(a.verdict, a.code) for a in attempts] == [(Verdict.SENT, 250)] * 2
        assert [(m["mail_from"], m["rcpt_tos"]) for m in sink.messages] == [
            ("news@example.com", ["jörg@example.de"]),
            ("news@example.com", ["o'neil+tag@example.org"]),
        ]


def test_pool_refuses_a_non_ascii_local_part_when_the_relay_lacks_smtputf8():
    utf8 = OutgoingMail("<c.k1@example.com>", "news@example.com", "jörg@example.de", MAIL.content)
    idn = OutgoingMail("<c.k2@example.com>", "news@example.com", "ann@xn--bcher-kva.example",
                       MAIL.content)
    with SmtpSink(SinkConfig(port=0, smtputf8=False)) as sink:
        pool = SmtpPool("127.0.0.1", sink.port, 1)
        try:
            refused, sent = pool.transmit(utf8), pool.transmit(idn)
        finally:
            pool.close()
        assert (refused.verdict, refused.text) == (Verdict.PERMANENT, SMTPUTF8_REFUSAL)
        # An IDN domain travels in its ASCII form: no SMTPUTF8 needed.
        assert sent.verdict is Verdict.SENT
        assert [m["rcpt_tos"] for m in sink.messages] == [["ann@xn--bcher-kva.example"]]


def test_pool_refuses_an_address_that_would_inject_a_command_without_sending_anything():
    evil = OutgoingMail("<c.k@example.com>", "news@example.com",
                        "a@example.org>\r\nRCPT TO:<b@example.org", MAIL.content)
    with SmtpSink(SinkConfig(port=0)) as sink:
        pool = SmtpPool("127.0.0.1", sink.port, 1)
        try:
            refused = pool.transmit(evil)
            after = pool.transmit(MAIL)
        finally:
            pool.close()
        assert refused.verdict is Verdict.PERMANENT and "line break" in refused.text
        assert after.verdict is Verdict.SENT
        assert [m["rcpt_tos"] for m in sink.messages] == [["jane@example.org"]]


# --- the send ledger (PostgreSQL only) -------------------------------------------------------------


def _entries(*contacts: str) -> tuple[str, list[LedgerEntry]]:
    """A fresh campaign and a ledger entry of each contact in it."""
    campaign = f"cmp-{uuid.uuid4()}"
    return campaign, [LedgerEntry(campaign, contact, TENANT, f"<{campaign}.{contact}@example.com>")
                      for contact in contacts]


def test_ledger_claim_states(settings):
    campaign, (entry, other) = _entries("k1", "k2")
    ledger = SendLedger(settings.database_url)
    try:
        assert ledger.claim([entry, other])[entry.key].state is ClaimState.FRESH
        # Claimed again without a settlement: the outcome of the first claim is unknown.
        again = ledger.claim([entry])[entry.key]
        assert again.state is ClaimState.UNSETTLED and again.ambiguous == 1
        ledger.settle({entry.key: Outcome(Status.DEFERRED, 1, 451, "451 later", ambiguous=1),
                       other.key: Outcome(Status.FAILED, 1, 550, "550 no", permanent=True)})
        claims = ledger.claim([entry, other])
        assert claims[entry.key].state is ClaimState.DEFERRED  # a copy of attempt 1
        assert claims[other.key].outcome == Outcome(Status.FAILED, 1, 550, "550 no",
                                                    permanent=True)
        second = replace(entry, attempt=2)
        assert ledger.claim([second])[entry.key].state is ClaimState.FRESH
        assert ledger.claim([entry])[entry.key].state is ClaimState.STALE
        ledger.settle({entry.key: Outcome(Status.SENT, 2, 250, "250 OK")})
        replayed = ledger.claim([second])[entry.key]
        assert replayed.state is ClaimState.SETTLED
        assert replayed.outcome == Outcome(Status.SENT, 2, 250, "250 OK", ambiguous=2)
        skipped = LedgerEntry(campaign, "k3", TENANT, "<id>", cancelled=True)
        assert ledger.claim([skipped])[skipped.key].state is ClaimState.SKIPPED
    finally:
        ledger.close()
    rows = {r["contact_id"]: r for r in ledger_rows(settings, campaign)}
    assert rows["k1"]["status"] == "sent" and rows["k1"]["attempts"] == 2
    assert rows["k1"]["ambiguous"] == 2
    assert rows["k2"]["status"] == "failed" and rows["k2"]["reason"] == "550 no"
    assert "k3" not in rows  # a cancelled campaign's recipient is looked up, never claimed


def test_a_chunk_of_new_and_known_recipients_claims_each_as_its_row_says(settings):
    # New rows are claimed by one insert, known ones by the lock-and-judge transaction: a
    # chunk with both gets each verdict, and a new row is written as a fresh claim in flight.
    campaign, (known, new) = _entries("k1", "k2")
    ledger = SendLedger(settings.database_url)
    try:
        ledger.claim([known])
        ledger.settle({known.key: Outcome(Status.SENT, 1, 250, "250 OK")})
        claims = ledger.claim([new, known])
        assert claims[new.key].state is ClaimState.FRESH and claims[new.key].ambiguous == 0
        assert claims[known.key].state is ClaimState.SETTLED
        with psycopg.connect(settings.database_url) as conn:
            row = conn.execute(
                "SELECT status, claims, attempts, ambiguous, settled_at IS NULL,"
                " claimed_at IS NOT NULL, message_id, tenant_id FROM send_ledger"
                " WHERE campaign_id = %s AND contact_id = 'k2'", (campaign,)).fetchone()
        assert row == ("claimed", 1, 0, 0, True, True, new.message_id, TENANT)
        # In flight: claimed again before a settlement, it is a possible duplicate.
        assert ledger.claim([new])[new.key].state is ClaimState.UNSETTLED
    finally:
        ledger.close()


def test_ledger_statements_find_rows_by_key_even_when_statistics_say_the_table_is_tiny(settings):
    # A fresh database: the planner believes send_ledger is empty, the plan the statement
    # would get there is the one it keeps using while the table grows.
    ledger = SendLedger(settings.database_url)
    try:
        conn = ledger._conn
        assert conn is not None
        assert conn.execute("SHOW enable_seqscan").fetchone() == ("off",)
        plan = "\n".join(row[0] for row in conn.execute(
            "EXPLAIN " + _SETTLE.replace("%s", "'[]'"), prepare=False))
    finally:
        ledger.close()
    assert "Index Scan using send_ledger_pkey" in plan and "Seq Scan on send_ledger" not in plan


# --- the worker --------------------------------------------------------------------------------


def test_mails_each_recipient_once_and_replays_outcomes_on_redelivery(settings):
    batch = recipients(300)
    campaign = batch[0].campaign_id
    junk = [b"{not json", encode(wrap(EmailFailed(campaign_id="x", contact_id="y", email="a@b.cd",
                                                  attempt=1, reason="r", permanent=True),
                                      tenant_id=TENANT, aggregate_id="x"))]
    produce(settings, batch, extra=tuple(junk))
    with SmtpSink(SinkConfig(port=0)) as sink, running_sender(settings.replace(smtp_port=sink.port)):
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


def test_copies_within_one_batch_are_mailed_once_and_reported(settings):
    batch = recipients(40)
    produce(settings, batch + batch)  # both copies are waiting when the sender starts
    with SmtpSink(SinkConfig(port=0)) as sink, running_sender(settings.replace(smtp_port=sink.port)):
        events = read_deliveries(settings, 40)
        time.sleep(0.5)
        records = sink.messages
    assert len(records) == 40
    # One event per recipient and batch: both copies in one batch give one event, copies
    # split over two batches give two (the second replayed from the ledger).
    assert {e.payload.contact_id for e in events} == {r.contact_id for r in batch}
    assert 40 <= len(events) <= 80 and all(isinstance(e.payload, EmailSent) for e in events)
    rows = ledger_rows(settings, batch[0].campaign_id)
    assert {(r["status"], r["ambiguous"]) for r in rows} == {("sent", 0)}


def test_permanent_refusals_fail_for_good_and_hard_bounces_suppress(settings):
    batch = recipients(50)
    produce(settings, batch)
    with SmtpSink(SinkConfig(port=0, permfail_rate=1.0)) as sink, \
            running_sender(settings.replace(smtp_port=sink.port)):
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
    # The sink answers "550 5.1.1": the address is unknown, so each contact is suppressed.
    suppressions = read_topic(settings, CONTACTS, until=50)
    assert len(suppressions) == 50
    for message in suppressions:
        assert isinstance(message.payload, ContactSuppressed)
        assert message.payload.reason == "hard_bounce" and "5.1.1" in message.payload.detail
        assert message.envelope.tenant_id == TENANT
    assert {m.payload.contact_id for m in suppressions} == {r.contact_id for r in batch}


def test_transient_failures_are_retried_through_the_delay_topics(settings):
    batch = recipients(300)
    produce(settings, batch)
    with SmtpSink(SinkConfig(port=0, tempfail_rate=0.3, seed=11)) as sink, \
            running_sender(settings.replace(smtp_port=sink.port)):
        events = deliveries_until(settings, terminal_for_all(300))
        records = sink.messages
        tempfails = sink.stats["tempfail"]
    terminal = [e.payload for e in events if not isinstance(e.payload, EmailDeferred)]
    deferred = [e.payload for e in events if isinstance(e.payload, EmailDeferred)]
    assert all(isinstance(t, EmailSent) for t in terminal)  # 0.3 ** 8: none gives up
    assert Counter(t.contact_id for t in terminal) == Counter({r.contact_id: 1 for r in batch})
    assert len(records) == len({rec["rcpt_tos"][0] for rec in records}) == 300
    assert len(deferred) == tempfails > 0
    assert {(d.smtp_code, d.reason.startswith("451")) for d in deferred} == {(451, True)}
    # Attempt n of a recipient follows n - 1 deferrals of it.
    per_contact = Counter(d.contact_id for d in deferred)
    assert all(t.attempt == per_contact[t.contact_id] + 1 for t in terminal)
    assert any(t.attempt > 2 for t in terminal)
    retried = read_topic(settings, RETRY_TIERS[0], until=1)
    assert retried and all(isinstance(m.payload, RecipientRetryScheduled) for m in retried)


def test_lost_replies_after_data_are_counted_as_ambiguous(settings):
    batch = recipients(100)
    produce(settings, batch)
    with SmtpSink(SinkConfig(port=0, drop_rate=0.2, seed=3)) as sink, \
            running_sender(settings.replace(smtp_port=sink.port)):
        events = deliveries_until(settings, terminal_for_all(100))
        dropped = sink.stats["drop_after_data"]
    sent = [e.payload for e in events if isinstance(e.payload, EmailSent)]
    assert {s.contact_id for s in sent} == {r.contact_id for r in batch}
    rows = ledger_rows(settings, batch[0].campaign_id)
    assert dropped > 0
    assert sum(r["ambiguous"] for r in rows) == dropped
    assert sum(s.ambiguous for s in {s.contact_id: s for s in sent}.values()) == dropped


def test_a_claim_left_unsettled_by_a_crash_is_mailed_again_and_counted(settings):
    batch = recipients(3)
    campaign = batch[0].campaign_id
    # What a sender that died between claim and settle leaves behind.
    ledger = SendLedger(settings.database_url)
    ledger.claim([LedgerEntry(campaign, batch[0].contact_id, TENANT, "<id>")])
    ledger.claim([LedgerEntry(campaign, batch[1].contact_id, TENANT, "<id>")])
    ledger.settle({(campaign, batch[1].contact_id): Outcome(Status.FAILED, 3, 451, "451 later")})
    ledger.close()
    produce(settings, batch)
    with SmtpSink(SinkConfig(port=0)) as sink, running_sender(settings.replace(smtp_port=sink.port)):
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
            code = process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
        stderr = process.stderr.read().decode() if process.stderr else ""
        assert code == 0, stderr[-3000:]
        mailed_at_stop = len(sink.messages)
        assert mailed_at_stop < len(batch), "stopped too late to test anything"
        # Everything mailed before the stop was settled and reported (the in-flight batch
        # completed); a new sender finishes the rest without mailing anyone twice.
        assert len(read_deliveries(settings, mailed_at_stop)) == mailed_at_stop
        with running_sender(settings.replace(smtp_port=sink.port)):
            events = read_deliveries(settings, len(batch), timeout=120)
        records = sink.messages
    assert "sender stopped" in stderr
    assert len(events) == len(batch)
    assert len(records) == len({rec["rcpt_tos"][0] for rec in records}) == len(batch)
    rows = ledger_rows(settings, batch[0].campaign_id)
    assert sum(r["ambiguous"] for r in rows) == 0
