"""Chaos: SIGKILL the sender mid-campaign, restart it, and check the send ledger's guarantee.

The whole pipeline runs as real processes (command handler, hydrator, sender, projector) with
an in-process SMTP sink. While a campaign of CHAOS_RECIPIENTS recipients is being mailed, the
sender is killed CHAOS_KILLS times (kill -9, at seeded random points of progress) and a new
one is started at once. Then, against the exact expected set of addresses:
- nothing is lost: every recipient is in the sink's record, the read model says all sent;
- duplicates in the sink never exceed the ambiguous outcomes counted in the send ledger;
- the read model's `sent` equals the distinct recipients the sink received.

Sizes: CHAOS_RECIPIENTS (default 3000) and CHAOS_KILLS (default 3); the issue's full size is
CHAOS_RECIPIENTS=20000 CHAOS_KILLS=5. CHAOS_SEED reproduces a run's kill points.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections import Counter

import psycopg
import pytest

from projections.queries import campaign_progress, recipient_status_counts
from schemas.base import normalise_email
from schemas.commands import CreateCampaign, SendCampaign
from schemas.contacts import ContactUpserted, contact_id_for, contact_key
from schemas.envelope import wrap
from schemas.events import EmailFailed, EmailSent, RecipientSkipped
from services.common.topics import COMMANDS, CONTACTS, DELIVERIES
from services.smtp_sink import SinkConfig, SmtpSink, header
from tests.kafka_io import publish, read_topic
from tests.service_process import ServiceProcess

RECIPIENTS = int(os.environ.get("CHAOS_RECIPIENTS", "3000"))
KILLS = int(os.environ.get("CHAOS_KILLS", "3"))
SEED = int(os.environ.get("CHAOS_SEED", str(random.SystemRandom().randrange(1 << 31))))
# A killed sender keeps its partitions until the broker's session timeout (45 s) evicts it,
# so every kill stalls the campaign for about that long.
COMPLETION_TIMEOUT = 240 + 75 * KILLS + RECIPIENTS // 50

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(COMPLETION_TIMEOUT + 300)]


class Pipeline:
    """The running services; the sender is replaced on every kill."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.others = [ServiceProcess(name, settings).start()
                       for name in ("command_handler", "hydrator", "projector")]
        self.sender = ServiceProcess("sender", settings).start()
        self.killed: list[ServiceProcess] = []

    def check_alive(self) -> None:
        for p in [*self.others, self.sender]:
            assert p.proc is not None
            code = p.proc.poll()
            assert code is None, f"{p.service} died unexpectedly (exit {code}):\n{p.log_tail(60)}"

    def kill_and_restart_sender(self) -> None:
        self.sender.kill()
        self.killed.append(self.sender)
        self.sender = ServiceProcess("sender", self.settings).start()

    def stop(self) -> dict[str, int]:
        codes = {p.service: p.stop() for p in self.others}
        codes["sender"] = self.sender.stop()
        return codes


def wait_for(predicate, timeout, what, pipeline: Pipeline):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        pipeline.check_alive()
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; sender log:\n"
                         f"{pipeline.sender.log_tail(60)}")


def kill_points(rng: random.Random, n: int, kills: int) -> list[int]:
    """Sink record counts at which to kill: sorted, spread over 5%..85% of the campaign."""
    low, high = max(1, n // 20), max(2, n * 85 // 100)
    return sorted(rng.randint(low, high) for _ in range(kills))


def test_sender_sigkill_loses_nobody_and_duplicates_only_ambiguous(settings):
    print(f"\nchaos: recipients={RECIPIENTS} kills={KILLS} seed={SEED} (CHAOS_SEED={SEED} reproduces)")
    rng = random.Random(SEED)
    tenant = "chaos"
    expected: set[str] = set()
    contacts = []
    for i in range(RECIPIENTS):
        email = normalise_email(f"person{i}@example.org")
        expected.add(email)
        cid = contact_id_for(tenant, email)
        contacts.append((contact_key(tenant, cid), wrap(
            ContactUpserted(contact_id=cid, email=email, first_name=f"P{i}", lists=["all"]),
            tenant_id=tenant, aggregate_id=cid)))
    publish(settings, CONTACTS, contacts)

    campaign = f"cmp-{uuid.uuid4().hex[:12]}"
    create = CreateCampaign(name="Chaos", subject="Hello {{ first_name }}",
                            from_address="news@example.com", body_text="Hi {{ first_name }}")
    # A little latency per message, so the campaign lasts long enough to be killed mid-way.
    with SmtpSink(SinkConfig(port=0, latency_ms=2)) as sink:
        pipeline = Pipeline(settings.replace(smtp_port=sink.port))
        try:
            started = time.monotonic()
            publish(settings, COMMANDS, [
                (campaign.encode(), wrap(create, tenant_id=tenant, aggregate_id=campaign)),
                (campaign.encode(), wrap(SendCampaign(list_ids=["all"]), tenant_id=tenant,
                                         aggregate_id=campaign)),
            ])
            min_progress = max(1, RECIPIENTS // (10 * (KILLS + 1)))
            last = 0
            for number, point in enumerate(kill_points(rng, RECIPIENTS, KILLS), 1):
                target = max(point, last + min_progress)
                wait_for(lambda t=target: sink.wait_for_messages(t, timeout=0.2), COMPLETION_TIMEOUT,
                         f"{target} messages in the sink before kill {number}", pipeline)
                # A random moment past the progress mark: inside SMTP, between batches, anywhere.
                time.sleep(rng.uniform(0.0, 0.05))
                pipeline.check_alive()
                pipeline.kill_and_restart_sender()
                last = len(sink.messages)
                print(f"chaos: kill {number} at {last} sink records "
                      f"(t={time.monotonic() - started:.1f}s)")

            with psycopg.connect(settings.database_url, autocommit=True) as conn:
                done = wait_for(
                    lambda: (p := campaign_progress(conn, campaign)) and p.status == "completed" and p,
                    COMPLETION_TIMEOUT, "campaign completed", pipeline)
                duration = time.monotonic() - started
                statuses = recipient_status_counts(conn, campaign)
                ledger = conn.execute(
                    "SELECT count(*), coalesce(sum(ambiguous), 0),"
                    " count(*) FILTER (WHERE status <> 'sent')"
                    " FROM send_ledger WHERE campaign_id = %s", (campaign,)).fetchone()
                assert ledger is not None
                ledger_rows, ambiguous, unsettled = ledger
            pipeline.check_alive()
        finally:
            codes = pipeline.stop()
        mails = [m for m in sink.messages if header(m, "X-Campaign-ID") == campaign]
        deliveries = read_topic(settings, DELIVERIES, timeout=60)

    by_rcpt = Counter(rcpt for m in mails for rcpt in m["rcpt_tos"])
    by_message_id = Counter(m["message_id"] for m in mails)
    duplicates = sum(c - 1 for c in by_rcpt.values())
    print(f"chaos: completed in {duration:.1f}s; {len(mails)} mails to {len(by_rcpt)} distinct "
          f"recipients; duplicates={duplicates} ambiguous(ledger)={ambiguous} "
          f"read model sent={done.sent} failed={done.failed}")

    lost = expected - set(by_rcpt)
    assert not lost, f"{len(lost)} recipients never mailed, e.g. {sorted(lost)[:5]}"
    assert set(by_rcpt) == expected, "mail to an address outside the campaign"
    assert len(by_message_id) == len(by_rcpt), "message ids do not match recipients one to one"
    assert sum(by_message_id.values()) - len(by_message_id) == duplicates
    assert done.total == RECIPIENTS
    assert done.sent == RECIPIENTS and done.failed == 0 and done.pending == 0
    assert statuses == {"queued": 0, "sent": RECIPIENTS, "failed": 0}
    assert done.sent == len(by_rcpt)
    assert ledger_rows == RECIPIENTS and unsettled == 0, "send ledger incomplete"
    assert duplicates <= ambiguous, (
        f"{duplicates} duplicate mails but only {ambiguous} ambiguous outcomes in the send ledger")
    # campaign.deliveries may hold copies re-published after a kill; each copy of a
    # recipient's terminal event carries the same event id, so readers deduplicate by id.
    terminal = [d for d in deliveries if isinstance(d.payload, EmailSent | EmailFailed | RecipientSkipped)
                and d.payload.campaign_id == campaign]
    ids_by_contact: dict[str, set] = {}
    for d in terminal:
        ids_by_contact.setdefault(d.payload.contact_id, set()).add(d.envelope.id)
    print(f"chaos: {len(terminal)} terminal events on campaign.deliveries for {len(ids_by_contact)} "
          f"recipients ({len(terminal) - len(ids_by_contact)} re-published copies)")
    assert len(ids_by_contact) == RECIPIENTS
    assert all(len(ids) == 1 for ids in ids_by_contact.values()), "a copy with another event id"
    assert len(pipeline.killed) == KILLS
    assert codes == {"command_handler": 0, "hydrator": 0, "projector": 0, "sender": 0}, \
        "a service did not exit cleanly on SIGTERM"
