"""Command handler against the real broker: accepted, rejected, dead-lettered, idempotent."""

from __future__ import annotations

import threading
import uuid

import pytest

from schemas.commands import CancelCampaign, CreateCampaign, SendCampaign
from schemas.envelope import wrap
from schemas.events import CampaignCancelled, CampaignCreated, CampaignSendRequested, CommandRejected
from services.command_handler.handler import CommandHandler
from services.common.topics import COMMANDS, COMMANDS_DLQ, EVENTS
from tests.kafka_io import publish, read_topic

pytestmark = pytest.mark.integration


@pytest.fixture
def handler(settings):
    stop = threading.Event()
    worker = CommandHandler(settings)
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    yield worker
    stop.set()
    thread.join(30)
    assert not thread.is_alive()


def command(payload, campaign, tenant="acme", command_id=None):
    return campaign.encode(), wrap(payload, tenant_id=tenant, aggregate_id=campaign, message_id=command_id)


def test_commands_become_events_and_bad_ones_are_rejected(settings, handler):
    c1 = f"c-{uuid.uuid4().hex[:8]}"
    create = CreateCampaign(name="n", subject="s", from_address="a@example.com", body_text="b")
    dup_id = uuid.uuid4()
    publish(settings, COMMANDS, [
        command(create, c1),
        command(SendCampaign(list_ids=["l1"]), c1, command_id=dup_id),
        command(SendCampaign(list_ids=["l1"]), c1, command_id=dup_id),   # same id: ignored
        command(SendCampaign(), c1),                                    # wrong state
        (b"c-x", b"{not json"),                                         # malformed
        (b"c-y", b'{"id": "1", "type": "SendCampaign"}'),               # schema violation
        command(CancelCampaign(), c1, tenant="other"),                  # wrong tenant
        command(SendCampaign(list_ids=["l"]), "never-created"),         # unknown campaign
        command(CancelCampaign(reason="r"), c1),
    ])
    events = read_topic(settings, EVENTS, until=8)
    mine = [e for e in events if e.envelope.aggregate_id == c1]
    kinds = [type(e.payload).__name__ for e in mine]
    assert kinds == ["CampaignCreated", "CampaignSendRequested", "CommandRejected", "CommandRejected",
                     "CampaignCancelled"]
    assert isinstance(mine[0].payload, CampaignCreated)
    send = mine[1].payload
    assert isinstance(send, CampaignSendRequested) and send.audience.list_ids == ["l1"]
    assert len(send.contacts_snapshot) > 0
    assert mine[1].envelope.causation_id == dup_id
    assert "not draft" in mine[2].payload.reason
    assert "unknown campaign" in mine[3].payload.reason and mine[3].envelope.tenant_id == "other"
    assert isinstance(mine[4].payload, CampaignCancelled)
    rejections = [e.payload for e in events if isinstance(e.payload, CommandRejected)]
    reasons = " | ".join(r.reason for r in rejections)
    assert "malformed JSON" in reasons and "invalid envelope" in reasons
    assert len(events) == 8
    dlq = read_topic_raw_count(settings)
    assert dlq == 2


def read_topic_raw_count(settings):
    from confluent_kafka import Consumer, Message

    from services.common.topics import topic_name
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": str(uuid.uuid4()),
                         "auto.offset.reset": "earliest", "isolation.level": "read_committed"})
    consumer.subscribe([topic_name(COMMANDS_DLQ, settings)])
    seen: list[Message] = []
    for _ in range(10):
        seen += [m for m in consumer.consume(100, 0.5) if not m.error()]
    consumer.close()
    for m in seen:
        headers = m.headers()
        assert headers is not None and dict(headers)["reason"]
    return len(seen)


def test_state_survives_restart(settings):
    """A new handler instance rebuilds aggregates from campaign.events."""
    c1 = f"c-{uuid.uuid4().hex[:8]}"
    create = CreateCampaign(name="n", subject="s", from_address="a@example.com", body_text="b")
    for commands in ([command(create, c1)], [command(create, c1), command(SendCampaign(contact_ids=["x"]), c1)]):
        stop = threading.Event()
        worker = CommandHandler(settings)
        thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        thread.start()
        publish(settings, COMMANDS, commands)
        expected = 1 if len(commands) == 1 else 3
        events = read_topic(settings, EVENTS, until=expected, timeout=40)
        stop.set()
        thread.join(30)
    kinds = [type(e.payload).__name__ for e in events]
    assert kinds == ["CampaignCreated", "CommandRejected", "CampaignSendRequested"]
    assert "already exists" in events[1].payload.reason


def test_pause_resume_and_automatic_pause(settings, handler):
    from schemas.commands import AutoPauseCampaign, PauseCampaign, ResumeCampaign
    from schemas.events import CampaignPaused, CampaignResumed

    c1 = f"c-{uuid.uuid4().hex[:8]}"
    create = CreateCampaign(name="n", subject="s", from_address="a@example.com", body_text="b")
    publish(settings, COMMANDS, [
        command(create, c1),
        command(PauseCampaign(), c1),                                  # draft: refused
        command(SendCampaign(list_ids=["l1"]), c1),
        command(PauseCampaign(reason="check the link"), c1),
        command(AutoPauseCampaign(reason="failure rate 60%"), c1),     # paused already: refused
        command(ResumeCampaign(), c1),
        command(AutoPauseCampaign(reason="failure rate 60%"), c1),
        command(ResumeCampaign(), c1),
        command(ResumeCampaign(), c1),                                 # sending: refused
    ])
    events = [e.payload for e in read_topic(settings, EVENTS, until=9)]
    assert [type(e).__name__ for e in events] == [
        "CampaignCreated", "CommandRejected", "CampaignSendRequested", "CampaignPaused",
        "CommandRejected", "CampaignResumed", "CampaignPaused", "CampaignResumed",
        "CommandRejected",
    ]
    assert events[3] == CampaignPaused(reason="check the link", automatic=False)
    assert events[6] == CampaignPaused(reason="failure rate 60%", automatic=True)
    assert events[5] == CampaignResumed()
    assert "is draft, not sending" in events[1].reason
    assert "is paused, not sending" in events[4].reason
    assert "is sending, not paused" in events[8].reason


def test_schedules_fire_on_time_and_missed_ones_are_reported_then_forced(settings, handler):
    from datetime import UTC, datetime, timedelta

    from schemas.commands import ForceScheduledSend, ScheduleCampaign
    from schemas.events import CampaignScheduled, CampaignScheduleMissed

    soon, missed = f"c-{uuid.uuid4().hex[:8]}", f"c-{uuid.uuid4().hex[:8]}"
    create = CreateCampaign(name="n", subject="s", from_address="a@example.com", body_text="b")
    now = datetime.now(UTC)
    publish(settings, COMMANDS, [
        command(create, soon), command(create, missed),
        command(ScheduleCampaign(send_at=now + timedelta(seconds=2),
                                 send=SendCampaign(list_ids=["l1"])), soon),
        # As if the handler had been down for an hour: found far beyond its 60 s grace.
        command(ScheduleCampaign(send_at=now - timedelta(hours=1), grace_seconds=60,
                                 send=SendCampaign(list_ids=["l2"])), missed),
        command(SendCampaign(list_ids=["l1"]), soon),  # scheduled: refused
    ])
    events = read_topic(settings, EVENTS, until=8, timeout=60)
    by_campaign = {c: [e for e in events if e.envelope.aggregate_id == c] for c in (soon, missed)}
    assert [type(e.payload).__name__ for e in by_campaign[soon]] == [
        "CampaignCreated", "CampaignScheduled", "CommandRejected", "CampaignSendRequested"]
    scheduled, fired = by_campaign[soon][1], by_campaign[soon][3]
    assert isinstance(scheduled.payload, CampaignScheduled)
    assert fired.payload.audience.list_ids == ["l1"]
    assert fired.envelope.causation_id == scheduled.envelope.id  # the schedule caused it
    assert fired.envelope.occurred_at >= scheduled.payload.send_at
    assert [type(e.payload).__name__ for e in by_campaign[missed]] == [
        "CampaignCreated", "CampaignScheduled", "CampaignScheduleMissed"]
    report = by_campaign[missed][2].payload
    assert isinstance(report, CampaignScheduleMissed) and "grace 60 s" in report.reason

    publish(settings, COMMANDS, [command(ForceScheduledSend(), missed)])
    events = read_topic(settings, EVENTS, until=9, timeout=60)
    forced = [e.payload for e in events if e.envelope.aggregate_id == missed][-1]
    assert isinstance(forced, CampaignSendRequested) and forced.audience.list_ids == ["l2"]
