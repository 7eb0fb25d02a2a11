"""The fan-out's exactly-once mechanism on the real broker, with the crash placed for certain
inside an open transaction: a writer process is SIGKILLed halfway through a partition's share;
its records are on the log but never visible to read_committed readers; the next owner fences
it, writes the share once, and a repeat of the request writes nothing."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from schemas.envelope import wrap
from schemas.events import Audience, HydrationRequested, MessageTemplate, RecipientQueued
from services.common.topics import RECIPIENTS, topic_name
from services.hydrator.fanout import PartitionFanout
from tests.kafka_io import read_topic
from tests.service_process import REPO_ROOT, service_env

pytestmark = pytest.mark.integration
SHARE = 2_000
TEMPLATE = MessageTemplate(subject="Hi", from_address="news@example.com", body_text="b")


def contacts(count):
    for i in range(count):
        cid = f"contact-{i:05d}"
        yield f"acme:{cid}".encode(), {"id": cid, "email": f"u{i}@example.com", "first_name": "",
                                        "last_name": "", "attributes": {}}, None


def request(campaign):
    payload = HydrationRequested(campaign_id=campaign, partition=3, partitions=12, snapshot_offset=0,
                                 template=TEMPLATE, audience=Audience(list_ids=["l"]))
    return payload, wrap(payload, tenant_id="acme", aggregate_id=campaign)


def log_end(settings):
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    topic = topic_name(RECIPIENTS, settings)
    req = {TopicPartition(topic, p): OffsetSpec.latest() for p in range(RECIPIENTS.partitions)}
    return sum(f.result().offset for f in admin.list_offsets(req).values())


# A writer that produces half the share, says so, then hangs with its transaction open.
WRITER = textwrap.dedent("""
    import sys, time
    from schemas.envelope import decode
    from services.common.settings import Settings
    from services.hydrator.fanout import PartitionFanout
    from tests.integration.test_hydrator_fanout import SHARE, contacts, request

    def half_then_hang():
        for n, item in enumerate(contacts(SHARE)):
            if n == SHARE // 2:
                fanout._partitions[3].producer.flush(30)
                print("half written", flush=True)
                time.sleep(600)
            yield item

    payload, env = request(sys.argv[1])
    fanout = PartitionFanout(Settings(), sys.argv[2])
    fanout.fan_out(payload, env, half_then_hang())
""")


def test_a_fan_out_killed_mid_transaction_is_invisible_and_redone_once(settings):
    campaign, app_id = f"c-{uuid.uuid4().hex[:8]}", f"{settings.topic_prefix}hydrator"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, campaign, app_id], env=service_env(settings),
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert writer.stdout is not None
        deadline = time.monotonic() + 60
        while b"half written" not in writer.stdout.readline():
            assert time.monotonic() < deadline and writer.poll() is None, "the writer never got halfway"
        assert log_end(settings) >= SHARE // 2  # on the log, inside the open transaction
        assert read_topic(settings, RECIPIENTS, timeout=5, idle=2) == []  # but not visible
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)

    payload, env = request(campaign)
    fanout = PartitionFanout(settings, app_id)  # the next owner: fences the dead writer
    try:
        report = fanout.fan_out(payload, env, contacts(SHARE))
        assert report is not None and report.queued == SHARE
        again = PartitionFanout(settings, app_id)  # e.g. the request redelivered to a restart
        try:
            assert again.fan_out(payload, env, contacts(SHARE)) is None
        finally:
            again.close()
    finally:
        fanout.close()
    queued = Counter(m.payload.contact_id for m in read_topic(settings, RECIPIENTS, until=SHARE, timeout=60)
                     if isinstance(m.payload, RecipientQueued))
    assert len(queued) == SHARE and set(queued.values()) == {1}
    assert log_end(settings) >= SHARE + SHARE // 2  # the aborted half is still on the log


def test_a_full_producer_queue_delays_the_marker_instead_of_crashing(settings, monkeypatch):
    """A local queue of one record is full whenever the previous one is unsent: the report
    and the marker must wait for room (the marker's BufferError once crashed faust's agent
    and the campaign never hydrated)."""
    monkeypatch.setattr("services.hydrator.fanout.QUEUE_MAX_MESSAGES", 1)
    campaign, app_id = f"c-{uuid.uuid4().hex[:8]}", f"{settings.topic_prefix}hydrator-q1"
    payload, env = request(campaign)
    fanout = PartitionFanout(settings, app_id)
    try:
        report = fanout.fan_out(payload, env, contacts(20))
        assert report is not None and report.queued == 20
    finally:
        fanout.close()
    queued = {m.payload.contact_id for m in read_topic(settings, RECIPIENTS, until=20, timeout=60)
              if isinstance(m.payload, RecipientQueued) and m.payload.campaign_id == campaign}
    assert len(queued) == 20
