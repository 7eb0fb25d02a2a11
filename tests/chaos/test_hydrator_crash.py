"""Hydrator killed with SIGKILL mid fan-out and restarted, with the whole pipeline running.

The hydrator is at-least-once (faust's exactly-once mode stalled here, see the issue notes): a
partition whose fan-out was cut short is fanned out again, so campaign.recipients may hold a
recipient twice. What must hold end to end, and is asserted exactly: CampaignHydrated once
with the exact total, every recipient mailed exactly once (the sender's ledger absorbs the
repeated RecipientQueued), and the read model counts each recipient once."""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from dataclasses import replace

import psycopg
import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from projections.queries import campaign_progress
from schemas.base import normalise_email
from schemas.commands import CreateCampaign, SendCampaign
from schemas.contacts import ContactUpserted, contact_id_for, contact_key
from schemas.envelope import wrap
from schemas.events import CampaignHydrated
from services.common.topics import COMMANDS, CONTACTS, EVENTS, RECIPIENTS, topic_name
from services.smtp_sink import SinkConfig, SmtpSink, header
from tests.kafka_io import publish, read_topic
from tests.service_process import ServiceProcess

pytestmark = pytest.mark.chaos
RECIPIENTS_N = int(os.environ.get("CHAOS_HYDRATION_RECIPIENTS", "6000"))


def log_end(settings, spec):
    """Sum of the log-end offsets: grows as soon as records are written, committed or not."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    topic = topic_name(spec, settings)
    req = {TopicPartition(topic, p): OffsetSpec.latest() for p in range(spec.partitions)}
    return sum(f.result().offset for f in admin.list_offsets(req).values())


def test_hydrator_sigkill_mid_fan_out_still_mails_everyone_exactly_once(settings):
    tenant = "acme"
    records = []
    for i in range(RECIPIENTS_N):
        email = normalise_email(f"member{i}@example.org")
        cid = contact_id_for(tenant, email)
        records.append((contact_key(tenant, cid), wrap(
            ContactUpserted(contact_id=cid, email=email, lists=["all"]), tenant_id=tenant, aggregate_id=cid)))
    publish(settings, CONTACTS, records)
    campaign = f"cmp-{uuid.uuid4().hex[:12]}"
    create = CreateCampaign(name="chaos", subject="s", from_address="news@example.com", body_text="b")

    with SmtpSink(SinkConfig(port=0, latency_ms=1)) as sink:
        run = replace(settings, smtp_port=sink.port)
        others = [ServiceProcess(name, run).start() for name in ("command_handler", "sender", "projector")]
        hydrator = ServiceProcess("hydrator", run).start()
        try:
            publish(settings, COMMANDS, [
                (campaign.encode(), wrap(create, tenant_id=tenant, aggregate_id=campaign)),
                (campaign.encode(), wrap(SendCampaign(list_ids=["all"]), tenant_id=tenant, aggregate_id=campaign)),
            ])
            deadline = time.monotonic() + 180
            while log_end(settings, RECIPIENTS) < RECIPIENTS_N // 4:
                assert time.monotonic() < deadline, f"fan-out never started:\n{hydrator.log_tail()}"
                assert hydrator.proc.poll() is None, hydrator.log_tail()
                time.sleep(0.02)
            hydrator.kill()
            written_before_kill = log_end(settings, RECIPIENTS)
            hydrator = ServiceProcess("hydrator", run).start()

            with psycopg.connect(settings.database_url, autocommit=True) as conn:
                deadline = time.monotonic() + 300
                while not ((p := campaign_progress(conn, campaign)) and p.status == "completed"):
                    assert time.monotonic() < deadline, "campaign never completed"
                    for proc in [*others, hydrator]:
                        assert proc.proc.poll() is None, f"{proc.service} died:\n{proc.log_tail()}"
                    time.sleep(0.5)
            events = read_topic(settings, EVENTS, until=3, timeout=60)
            queued = read_topic(settings, RECIPIENTS, until=RECIPIENTS_N, timeout=60)
        finally:
            for proc in [*others, hydrator]:
                proc.stop()
        mails = [m for m in sink.messages if header(m, "X-Campaign-ID") == campaign]

    per_recipient = Counter(m["rcpt_tos"][0] for m in mails)
    repeated = len(queued) - len({m.payload.contact_id for m in queued})
    print(f"\nkilled after {written_before_kill} of {RECIPIENTS_N} recipients written;"
          f" {repeated} RecipientQueued repeated on the topic; mails {len(mails)}")
    assert [m.payload for m in events if isinstance(m.payload, CampaignHydrated)] == [
        CampaignHydrated(total=RECIPIENTS_N)]
    assert p.total == p.sent == RECIPIENTS_N and p.failed == 0
    assert len(per_recipient) == RECIPIENTS_N, "recipients lost"
    assert max(per_recipient.values()) == 1, "a recipient was mailed twice"
