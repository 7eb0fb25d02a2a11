"""The completion tracker against the real broker: exactly one CampaignCompleted per campaign,
under duplicate deliveries, restarts and a crash inside a transaction.

Every test has its own topics and consumer group (the `settings` fixture) and random campaign
ids. Records are produced with the services' murmur2 producer, so a campaign's events and
deliveries share a partition number, as in production.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import pytest
from confluent_kafka import Consumer, IsolationLevel, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from schemas.base import Record
from schemas.envelope import Envelope, Message, decode, wrap
from schemas.events import CampaignCompleted, CampaignHydrated, EmailSent
from services.common.settings import Settings
from services.common.topics import DELIVERIES, EVENTS, TopicSpec, topic_name
from services.completion.service import CompletionService
from tests.kafka_io import publish, read_topic
from tests.service_process import ServiceProcess

pytestmark = pytest.mark.integration

# A tracker that has not caught up within this is stuck, not slow.
DRAIN_TIMEOUT_SECONDS = 60.0


class SimulatedCrash(Exception):
    """The process dies inside a transaction: after producing, before committing."""


@dataclass
class Campaign:
    tenant: str = field(default_factory=lambda: f"tenant-{uuid.uuid4().hex[:8]}")
    id: str = field(default_factory=lambda: f"camp-{uuid.uuid4()}")
    flow: uuid.UUID = field(default_factory=uuid.uuid4)

    def event(self, payload: Record) -> tuple[bytes, Envelope]:
        return self.id.encode(), wrap(payload, tenant_id=self.tenant, aggregate_id=self.id,
                                      correlation_id=self.flow)

    def sent(self, contact: str) -> tuple[bytes, Envelope]:
        return self.event(EmailSent(campaign_id=self.id, contact_id=contact,
                                    email=f"{contact}@example.com", message_id=f"<{contact}@mx>",
                                    attempt=1, smtp_reply="250 ok"))


def completions(settings: Settings, *, until: int | None = None,
                uncommitted: bool = False) -> list[Message]:
    if uncommitted:
        records = read_uncommitted(settings, EVENTS)
    else:
        # `until` completions, not records: the topic also holds the campaign's own events,
        # and a completion published a second after them was missed.
        records = read_topic(settings, EVENTS, until=until, timeout=DRAIN_TIMEOUT_SECONDS,
                             counting=lambda m: isinstance(m.payload, CampaignCompleted))
    return [m for m in records if isinstance(m.payload, CampaignCompleted)]


def read_uncommitted(settings: Settings, spec: TopicSpec) -> list[Message]:
    """Every record physically in the log, also those of open or aborted transactions."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers,
                         "group.id": f"raw-{uuid.uuid4()}", "auto.offset.reset": "earliest",
                         "enable.auto.commit": False, "isolation.level": "read_uncommitted",
                         "enable.partition.eof": True})
    name = topic_name(spec, settings)
    consumer.assign([TopicPartition(name, p, 0) for p in range(spec.partitions)])
    out: list[Message] = []
    at_end: set[int] = set()
    deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
    try:
        while len(at_end) < spec.partitions and time.monotonic() < deadline:
            for m in consumer.consume(1000, 0.5):
                error = m.error()
                if error is not None:
                    assert error.code() == KafkaError._PARTITION_EOF, error
                    at_end.add(m.partition() or 0)
                    continue
                out.append(decode(m.value()))
    finally:
        consumer.close()
    return out


def drain(service: CompletionService, settings: Settings) -> None:
    """Poll until the service has consumed (and so committed) both topics to their ends."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
    while True:
        service.poll_once()
        assignment = service.consumer.assignment()
        if len(assignment) == EVENTS.partitions + DELIVERIES.partitions:
            futures = admin.list_offsets(
                {TopicPartition(tp.topic, tp.partition): OffsetSpec.latest() for tp in assignment},
                isolation_level=IsolationLevel.READ_COMMITTED, request_timeout=10,
            )
            ends = {(tp.topic, tp.partition): f.result().offset for tp, f in futures.items()}
            positions = {(tp.topic, tp.partition): tp.offset
                         for tp in service.consumer.position(assignment)}
            if all(positions[key] >= end for key, end in ends.items() if end > 0):
                return
        assert time.monotonic() < deadline, "completion tracker did not catch up"


def test_exactly_one_completion_under_duplicates_and_restart(settings) -> None:
    campaign = Campaign()
    contacts = [f"contact-{i:03d}" for i in range(50)]
    hydration = campaign.event(CampaignHydrated(total=50))
    deliveries = [campaign.sent(c) for c in contacts]
    # The sender re-publishes 10 outcomes after a crash: new envelopes, same facts.
    duplicates = [campaign.sent(c) for c in contacts[:10]]
    publish(settings, EVENTS, [hydration])
    publish(settings, DELIVERIES, deliveries[:25] + duplicates + deliveries[25:])

    with CompletionService(settings, batch_size=7) as service:
        drain(service, settings)
        assert service.completions_published == 1
    [completed] = completions(settings, until=1)
    assert completed.payload == CampaignCompleted(total=50, sent=50, failed=0)
    env = completed.envelope
    assert (env.tenant_id, env.aggregate_id, env.correlation_id) == (
        campaign.tenant, campaign.id, campaign.flow
    )
    assert env.causation_id in {e.id for _, e in deliveries + duplicates}  # whichever completed it

    # A new instance rebuilds its state from the log; more duplicates change nothing.
    publish(settings, DELIVERIES, [campaign.sent(c) for c in contacts[20:30]])
    with CompletionService(settings) as restarted:
        drain(restarted, settings)
        assert restarted.completions_published == 0
    assert len(completions(settings, until=1)) == 1


def test_a_crash_inside_the_transaction_does_not_duplicate_the_completion(
    settings, monkeypatch
) -> None:
    campaign = Campaign()
    contacts = [f"contact-{i:03d}" for i in range(50)]
    publish(settings, EVENTS, [campaign.event(CampaignHydrated(total=50))])
    publish(settings, DELIVERIES, [campaign.sent(c) for c in contacts]
            + [campaign.sent(c) for c in contacts[:10]])
    transactional_id = f"{settings.group('completion-tracker')}-instance-0"

    doomed = CompletionService(settings, transactional_id=transactional_id, batch_size=10)
    emitted: list[object] = []
    real_emit, real_commit = doomed._emit, doomed._commit_transaction

    def emit_and_remember(completion):
        real_emit(completion)
        emitted.append(completion)

    def crash_if_completing():
        if emitted:
            doomed.producer.flush(10)  # the completion is in the log, uncommitted
            raise SimulatedCrash
        real_commit()

    monkeypatch.setattr(doomed, "_emit", emit_and_remember)
    monkeypatch.setattr(doomed, "_commit_transaction", crash_if_completing)
    with pytest.raises(SimulatedCrash):
        deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            doomed.poll_once()
    # The process is gone: its group membership ends, its transaction stays open.
    doomed.consumer.close()
    assert doomed.completions_published == 0

    # The supervisor restarts the instance under the same transactional id: that aborts the
    # open transaction, and the batch is decided again from the committed offsets.
    with CompletionService(settings, transactional_id=transactional_id) as restarted:
        drain(restarted, settings)
        assert restarted.completions_published == 1
    [completed] = completions(settings, until=1)
    assert completed.payload == CampaignCompleted(total=50, sent=50, failed=0)
    # Both attempts reached the log; only the committed one is visible to read_committed.
    assert len(completions(settings, uncommitted=True)) == 2


def test_total_zero_completes_and_the_service_exits_cleanly_on_sigterm(settings) -> None:
    campaign = Campaign()
    publish(settings, EVENTS, [campaign.event(CampaignHydrated(total=0))])
    with ServiceProcess("completion", settings) as proc:
        found = completions(settings, until=1)
        assert proc.stop() == 0, proc.log_tail()
    assert [m.payload for m in found] == [CampaignCompleted(total=0, sent=0, failed=0)]
    assert '"completion tracker stopped"' in proc.log_path.read_text()


def test_failure_rate_guard_requests_one_automatic_pause(settings) -> None:
    from schemas.commands import AutoPauseCampaign
    from schemas.events import EmailFailed, RecipientSkipped
    from services.common.topics import COMMANDS
    from services.completion.tracker import FailureGuard

    campaign = Campaign()

    def failed(contact: str) -> tuple[bytes, Envelope]:
        return campaign.event(EmailFailed(campaign_id=campaign.id, contact_id=contact,
                                          email=f"{contact}@example.com", attempt=1,
                                          reason="550 no", permanent=True, smtp_code=550))

    publish(settings, EVENTS, [campaign.event(CampaignHydrated(total=40))])
    # 3 sent, 9 failed (75%), 2 skipped (not deliveries, not counted), then more failures.
    skipped = [campaign.event(RecipientSkipped(campaign_id=campaign.id, contact_id=f"s{i}",
                                               email=f"s{i}@example.com", reason="cancelled"))
               for i in range(2)]
    publish(settings, DELIVERIES, [campaign.sent(f"ok{i}") for i in range(3)] + skipped
            + [failed(f"bad{i}") for i in range(15)])
    guard = FailureGuard(min_deliveries=10, failure_rate=0.5)
    with CompletionService(settings, guard=guard) as service:
        drain(service, settings)
        assert service.pauses_requested == 1 and service.completions_published == 0
    [command] = read_topic(settings, COMMANDS, until=1)
    assert isinstance(command.payload, AutoPauseCampaign)
    assert "70%" in command.payload.reason  # 7 of the first 10 deliveries failed
    env = command.envelope
    assert (env.tenant_id, env.aggregate_id, env.correlation_id) == (
        campaign.tenant, campaign.id, campaign.flow
    )
    # The handler's answer, then more failures: a restarted tracker replays the facts and
    # asks nothing again.
    from schemas.events import CampaignPaused

    publish(settings, EVENTS, [campaign.event(CampaignPaused(reason="r", automatic=True))])
    publish(settings, DELIVERIES, [failed(f"worse{i}") for i in range(3)])
    with CompletionService(settings, guard=guard) as restarted:
        drain(restarted, settings)
        assert restarted.pauses_requested == 0


def test_a_fenced_consumer_is_replaced_and_completions_go_on(settings) -> None:
    """A static member fenced by another with its group.instance.id (as after a broker hang)
    gets a fatal error whose fatal() flag is not set: the tracker replaces its consumer and
    goes on completing campaigns, instead of polling a dead consumer for good."""
    import threading

    from services.common.kafka import consumer_config
    from services.completion.service import SERVICE

    first, second = Campaign(), Campaign()
    publish(settings, EVENTS, [first.event(CampaignHydrated(total=3))])
    publish(settings, DELIVERIES, [first.sent(f"a{i}") for i in range(3)])
    service = CompletionService(settings, instance="0")  # a static member, as deployed
    stop = threading.Event()
    runner = threading.Thread(target=service.run, args=(stop,), daemon=True)
    runner.start()
    try:
        assert len(completions(settings, until=1)) == 1
        fenced = service.consumer
        impostor = Consumer(consumer_config(settings, SERVICE, **service._consumer_config))
        impostor.subscribe([service.events_topic, service.deliveries_topic])
        deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
        while service.consumer is fenced:  # the impostor's join fences the tracker's member
            assert time.monotonic() < deadline, "the tracker kept its fenced consumer"
            impostor.poll(0.2)
        impostor.close()
        publish(settings, EVENTS, [second.event(CampaignHydrated(total=2))])
        publish(settings, DELIVERIES, [second.sent(f"b{i}") for i in range(2)])
        done = completions(settings, until=2)
        assert sorted(m.envelope.aggregate_id for m in done) == sorted([first.id, second.id])
        assert runner.is_alive()
    finally:
        stop.set()
        runner.join(30)
    assert not runner.is_alive()
