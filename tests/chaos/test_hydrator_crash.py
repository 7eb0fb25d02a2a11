"""Hydrator killed with SIGKILL mid fan-out, and two hydrators in one group.

Asserted exactly on campaign.recipients (read_committed, as senders read it): every contact of
the audience appears once, none twice, none missing, and CampaignHydrated comes once with the
exact total. The SIGKILL lands while a fan-out transaction is open (records are on the log but
not committed), so the test also shows that the half-written share is never visible.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from schemas.base import normalise_email
from schemas.contacts import ContactUpserted, contact_id_for, contact_key
from schemas.envelope import wrap
from schemas.events import (
    Audience,
    CampaignHydrated,
    CampaignSendRequested,
    MessageTemplate,
    RecipientQueued,
)
from services.common.topics import CONTACTS, EVENTS, RECIPIENTS, topic_name
from tests.kafka_io import publish, read_topic
from tests.service_process import ServiceProcess

pytestmark = pytest.mark.chaos
RECIPIENTS_N = int(os.environ.get("CHAOS_HYDRATION_RECIPIENTS", "30000"))
TEMPLATE = MessageTemplate(subject="Hi", from_address="news@example.com", body_text="b")


def log_end(settings, spec):
    """Sum of the log-end offsets: grows as soon as records are written, committed or not."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    topic = topic_name(spec, settings)
    req = {TopicPartition(topic, p): OffsetSpec.latest() for p in range(spec.partitions)}
    return sum(f.result().offset for f in admin.list_offsets(req).values())


def publish_audience(settings, tenant, count, lists):
    records = []
    for i in range(count):
        email = normalise_email(f"member{i}@example.org")
        cid = contact_id_for(tenant, email)
        records.append((contact_key(tenant, cid), wrap(
            ContactUpserted(contact_id=cid, email=email, lists=lists), tenant_id=tenant, aggregate_id=cid)))
    publish(settings, CONTACTS, records)
    return {contact_id_for(tenant, normalise_email(f"member{i}@example.org")) for i in range(count)}


def request_send(settings, tenant, campaign, lists):
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    topic = topic_name(CONTACTS, settings)
    req = {TopicPartition(topic, p): OffsetSpec.latest() for p in range(CONTACTS.partitions)}
    snapshot = {tp.partition: f.result().offset for tp, f in admin.list_offsets(req).items()}
    event = CampaignSendRequested(template=TEMPLATE, audience=Audience(list_ids=lists), contacts_snapshot=snapshot)
    publish(settings, EVENTS, [(campaign.encode(), wrap(event, tenant_id=tenant, aggregate_id=campaign))])


def wait_hydrated(settings, campaign, procs, timeout=300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            assert proc.running(), f"hydrator died:\n{proc.log_tail()}"
        events = read_topic(settings, EVENTS, timeout=5, idle=1.0)
        hydrated = [m for m in events if isinstance(m.payload, CampaignHydrated)
                    and m.envelope.aggregate_id == campaign]
        if hydrated:
            time.sleep(2)  # a second (duplicate) CampaignHydrated would show up by now
            events = read_topic(settings, EVENTS, timeout=5, idle=1.0)
            return [m.payload for m in events if isinstance(m.payload, CampaignHydrated)
                    and m.envelope.aggregate_id == campaign]
    raise AssertionError("campaign never hydrated:\n" + "\n".join(p.log_tail() for p in procs))


def queued_contacts(settings, campaign, expected):
    recipients = read_topic(settings, RECIPIENTS, until=expected, timeout=120)
    return Counter(m.payload.contact_id for m in recipients
                   if isinstance(m.payload, RecipientQueued) and m.payload.campaign_id == campaign)


def test_hydrator_sigkill_mid_fan_out_leaves_each_recipient_exactly_once(settings):
    tenant = "acme"
    audience = publish_audience(settings, tenant, RECIPIENTS_N, ["all"])
    campaign = f"cmp-{uuid.uuid4().hex[:12]}"
    hydrator = ServiceProcess("hydrator", settings).start()
    try:
        request_send(settings, tenant, campaign, ["all"])
        deadline = time.monotonic() + 180
        while log_end(settings, RECIPIENTS) < RECIPIENTS_N // 4:
            assert time.monotonic() < deadline, f"fan-out never started:\n{hydrator.log_tail()}"
            assert hydrator.running(), hydrator.log_tail()
            time.sleep(0.01)
        hydrator.kill()
        written_before_kill = log_end(settings, RECIPIENTS)
        hydrator = ServiceProcess("hydrator", settings).start()
        hydrated = wait_hydrated(settings, campaign, [hydrator])
        queued = queued_contacts(settings, campaign, RECIPIENTS_N)
    finally:
        hydrator.stop()
    print(f"\nkilled after {written_before_kill} of {RECIPIENTS_N} records written;"
          f" log end after the restart {log_end(settings, RECIPIENTS)}")
    assert hydrated == [CampaignHydrated(total=RECIPIENTS_N)]
    assert set(queued) == audience, "recipients lost or foreign"
    assert max(queued.values()) == 1, "a recipient was queued twice"


def test_two_hydrators_in_one_group_queue_the_same_set_as_one(settings):
    tenant = "acme"
    count = 3000
    audience = publish_audience(settings, tenant, count, ["all"])
    first, second = f"one-{uuid.uuid4().hex[:8]}", f"two-{uuid.uuid4().hex[:8]}"
    with ServiceProcess("hydrator", settings) as alone:
        request_send(settings, tenant, first, ["all"])
        alone_hydrated = wait_hydrated(settings, first, [alone])
    with ServiceProcess("hydrator", settings, HYDRATOR_INSTANCE="a") as a, \
            ServiceProcess("hydrator", settings, HYDRATOR_INSTANCE="b") as b:
        time.sleep(15)  # both join the group and split the partitions before the send
        request_send(settings, tenant, second, ["all"])
        pair_hydrated = wait_hydrated(settings, second, [a, b])
        a_log, b_log = a.log_path.read_text(), b.log_path.read_text()
    alone_set = queued_contacts(settings, first, 2 * count)
    pair_set = queued_contacts(settings, second, 2 * count)
    assert alone_hydrated == pair_hydrated == [CampaignHydrated(total=count)]
    assert set(alone_set) == set(pair_set) == audience
    assert max(alone_set.values()) == max(pair_set.values()) == 1
    # Both instances did part of the work: the partitions were really split.
    assert "partition fanned out" in a_log and "partition fanned out" in b_log
