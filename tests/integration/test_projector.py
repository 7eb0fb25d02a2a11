"""The projector against the real broker and database: exact counts, restarts, bad records.

Every test has its own topics and consumer group (the `settings` fixture) and random campaign
ids, so tests share the database without seeing each other's rows.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from projections.batch_writer import BatchWriter
from projections.lanes import DELIVERY_LANE, MAIN_LANE, run_lanes
from projections.projector import Projector, lane_projectors, projector_for
from projections.queries import campaign_progress, list_campaigns, recipient_status_counts
from projections.record_feed import RecordFeed
from schemas.base import Record
from schemas.commands import SendCampaign
from schemas.contacts import (
    ContactDeleted,
    ContactListMembershipRemoved,
    ContactSuppressed,
    ContactUnsubscribed,
    ContactUpserted,
    contact_key,
)
from schemas.envelope import encode, wrap
from schemas.events import (
    Audience,
    CampaignCancelled,
    CampaignCreated,
    CampaignHydrated,
    CampaignPaused,
    CampaignResumed,
    CampaignScheduled,
    CampaignScheduleMissed,
    CampaignSendRequested,
    CommandRejected,
    EmailDeferred,
    EmailFailed,
    EmailSent,
    MessageTemplate,
    RecipientExcluded,
    RecipientQueued,
    RecipientSkipped,
)
from services.common.settings import Settings
from services.common.topics import (
    CONTACTS,
    DELIVERIES,
    EVENTS,
    RECIPIENTS,
    TopicSpec,
    topic_name,
)
from tests.recording_stop import RecordingStop
from tests.service_process import ServiceProcess

pytestmark = pytest.mark.integration

TEMPLATE = MessageTemplate(subject="Spring sale", from_address="news@example.com", body_text="Hi")
T0 = datetime(2030, 3, 1, 9, 0, tzinfo=UTC)
REPO_ROOT = Path(__file__).resolve().parents[2]
# A drain that takes longer than this is stuck, not slow.
DRAIN_TIMEOUT_SECONDS = 60.0


@dataclass
class Campaign:
    """One campaign's facts, produced onto the real topics."""

    tenant: str = field(default_factory=lambda: f"tenant-{uuid.uuid4().hex[:8]}")
    id: str = field(default_factory=lambda: f"camp-{uuid.uuid4()}")

    def event(self, payload: Record, at: datetime = T0) -> tuple[TopicSpec, str, bytes]:
        value = encode(wrap(payload, tenant_id=self.tenant, aggregate_id=self.id, occurred_at=at))
        return EVENTS, self.id, value

    def created(self) -> tuple[TopicSpec, str, bytes]:
        return self.event(CampaignCreated(name="Spring sale", template=TEMPLATE), T0)

    def send_requested(self) -> tuple[TopicSpec, str, bytes]:
        payload = CampaignSendRequested(
            template=TEMPLATE, audience=Audience(list_ids=["all"]), contacts_snapshot={0: 0}
        )
        return self.event(payload, T0 + timedelta(seconds=1))

    def hydrated(self, total: int) -> tuple[TopicSpec, str, bytes]:
        return self.event(CampaignHydrated(total=total), T0 + timedelta(seconds=2))

    def queued(self, contact: str) -> tuple[TopicSpec, str, bytes]:
        payload = RecipientQueued(
            campaign_id=self.id, contact_id=contact, email=f"{contact}@example.com",
            template=TEMPLATE,
        )
        value = encode(wrap(payload, tenant_id=self.tenant, aggregate_id=contact,
                            occurred_at=T0 + timedelta(seconds=3)))
        return RECIPIENTS, f"{self.tenant}:{contact}", value

    def excluded(self, contact: str, reason: str) -> tuple[TopicSpec, str, bytes]:
        payload = RecipientExcluded(campaign_id=self.id, contact_id=contact,
                                    email=f"{contact}@example.com", reason=reason)
        value = encode(wrap(payload, tenant_id=self.tenant, aggregate_id=contact,
                            occurred_at=T0 + timedelta(seconds=3)))
        return RECIPIENTS, f"{self.tenant}:{contact}", value

    def delivery(self, payload: Record, at: datetime) -> tuple[TopicSpec, str, bytes]:
        value = encode(wrap(payload, tenant_id=self.tenant, aggregate_id=self.id, occurred_at=at))
        return DELIVERIES, self.id, value

    def deferred(self, contact: str, attempt: int, at: datetime) -> tuple[TopicSpec, str, bytes]:
        return self.delivery(EmailDeferred(
            campaign_id=self.id, contact_id=contact, email=f"{contact}@example.com",
            attempt=attempt, reason="451 greylisted", smtp_code=451,
            retry_at=at + timedelta(minutes=1)), at)

    def sent(self, contact: str, attempt: int, at: datetime, ambiguous: int = 0
             ) -> tuple[TopicSpec, str, bytes]:
        return self.delivery(EmailSent(
            campaign_id=self.id, contact_id=contact, email=f"{contact}@example.com",
            message_id=f"<{contact}@mx>", attempt=attempt, ambiguous=ambiguous), at)

    def skipped(self, contact: str, at: datetime) -> tuple[TopicSpec, str, bytes]:
        return self.delivery(RecipientSkipped(
            campaign_id=self.id, contact_id=contact, email=f"{contact}@example.com",
            reason="unsubscribed"), at)

    def delivered(self, contact: str, at: datetime, *, ok: bool) -> tuple[TopicSpec, str, bytes]:
        payload: Record
        if ok:
            payload = EmailSent(campaign_id=self.id, contact_id=contact,
                                email=f"{contact}@example.com", message_id=f"<{contact}@mx>",
                                attempt=1, smtp_reply="250 ok")
        else:
            payload = EmailFailed(campaign_id=self.id, contact_id=contact,
                                  email=f"{contact}@example.com", attempt=2,
                                  reason="550 no such user", permanent=True, smtp_code=550)
        value = encode(wrap(payload, tenant_id=self.tenant, aggregate_id=self.id, occurred_at=at))
        return DELIVERIES, self.id, value


def produce(settings: Settings, records: list[tuple[TopicSpec, str, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers,
                         "enable.idempotence": True, "linger.ms": 5})
    for spec, key, value in records:
        producer.produce(topic_name(spec, settings), key=key.encode(), value=value)
    assert producer.flush(30) == 0, "records not acknowledged"


def end_offsets(settings: Settings) -> dict[tuple[str, int], int]:
    """High watermark of every non-empty partition of the projected topics."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers,
                         "group.id": f"probe-{uuid.uuid4().hex}"})
    try:
        ends = {}
        for spec in (EVENTS, RECIPIENTS, DELIVERIES):
            name = topic_name(spec, settings)
            for partition in range(spec.partitions):
                _, high = consumer.get_watermark_offsets(TopicPartition(name, partition),
                                                         timeout=10)
                if high:
                    ends[(name, partition)] = high
        return ends
    finally:
        consumer.close()


def stored_positions(db: psycopg.Connection, settings: Settings) -> dict[tuple[str, int], int]:
    rows = db.execute(
        "SELECT topic, partition, next_offset FROM projector_positions WHERE consumer_group = %s",
        (settings.group("projector"),),
    ).fetchall()
    return {(topic, partition): offset for topic, partition, offset in rows}


def drain(settings: Settings, **kwargs: Any) -> int:
    with projector_for(settings, **kwargs) as projector:
        return projector.drain(timeout=DRAIN_TIMEOUT_SECONDS)


@pytest.fixture
def db(platform_settings: Settings) -> Iterator[psycopg.Connection]:
    with psycopg.connect(platform_settings.database_url, autocommit=True) as conn:
        yield conn


def full_scenario(campaign: Campaign, total: int) -> tuple[list, list, int, int, datetime]:
    """Facts of a campaign whose every 5th recipient fails, with duplicated deliveries.

    Returns (deliveries-first part, rest, sent, failed, last counted delivery time).
    """
    contacts = [f"contact-{i:03d}" for i in range(total)]
    first, rest = [], []
    sent = failed = 0
    last = T0
    for i, contact in enumerate(contacts):
        ok = i % 5 != 0
        sent, failed = sent + ok, failed + (not ok)
        at = T0 + timedelta(minutes=1, seconds=i)
        last = max(last, at)
        delivery = campaign.delivered(contact, at, ok=ok)
        # The sender re-publishes after a crash: same facts, a new envelope, a later time.
        redelivery = campaign.delivered(contact, at + timedelta(hours=1), ok=ok)
        if i < total // 2:
            # Delivery overtakes its RecipientQueued, and both copies come first.
            first += [delivery, delivery, redelivery]
            rest += [campaign.queued(contact)]
        else:
            rest += [campaign.queued(contact), campaign.queued(contact), delivery, redelivery]
    head = [campaign.created(), campaign.send_requested(), campaign.hydrated(total)]
    return head + first, rest, sent, failed, last


def test_counts_are_exact_under_duplicates_and_deliveries_before_queued(settings, db) -> None:
    campaign = Campaign()
    first, rest, sent, failed, last = full_scenario(campaign, 40)

    produce(settings, first)
    drain(settings)
    half = campaign_progress(db, campaign.id, campaign.tenant)
    assert half is not None
    # Each delivery that overtook its RecipientQueued created its recipient once.
    assert (half.status, half.total, half.queued) == ("sending", 40, 20)
    assert half.sent + half.failed == 20
    assert half.pending == 20

    produce(settings, rest)
    drain(settings)
    progress = campaign_progress(db, campaign.id, campaign.tenant)
    assert progress is not None
    assert (progress.status, progress.total, progress.queued, progress.sent, progress.failed,
            progress.pending) == ("completed", 40, 40, sent, failed, 0)
    assert progress.name == "Spring sale"
    assert progress.started_at == T0 + timedelta(seconds=1)
    # From the counted deliveries' event times, not from the later duplicates or the clock.
    assert progress.completed_at == last
    assert recipient_status_counts(db, campaign.id) == {"queued": 0, "sent": sent,
                                                         "failed": failed}
    failure = db.execute(
        "SELECT status, attempts, last_error FROM campaign_recipients"
        " WHERE campaign_id = %s AND contact_id = 'contact-005'", (campaign.id,)
    ).fetchone()
    assert failure == ("failed", 2, "550 no such user")
    assert stored_positions(db, settings) == end_offsets(settings)
    assert campaign_progress(db, campaign.id, "another-tenant") is None
    assert [c.campaign_id for c in list_campaigns(db, campaign.tenant)] == [campaign.id]


def test_sigkill_at_any_moment_loses_or_doubles_nothing(settings, db) -> None:
    """The service is killed with SIGKILL at random moments while it works through a backlog
    (inside transactions or between them), restarted each time, and finally left to finish:
    every counter and row is then exact."""
    campaign = Campaign()
    total = 8_000
    first, rest, sent, failed, _ = full_scenario(campaign, total)
    produce(settings, first + rest)
    rng = random.Random(5)  # noqa: S311 - kill moments, not secrets
    kills = 0
    for _ in range(3):
        service = ServiceProcess("projector", settings).start()
        try:
            before = sum(stored_positions(db, settings).values())
            deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
            # Killed once it commits, a random moment later: mostly mid-batch.
            while sum(stored_positions(db, settings).values()) == before:
                assert service.proc is not None and service.proc.poll() is None, \
                    service.log_tail()
                assert time.monotonic() < deadline, "projector made no progress"
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.5))
        finally:
            service.kill()
        kills += 1
        if stored_positions(db, settings) == end_offsets(settings):
            break  # finished before the kill
    with ServiceProcess("projector", settings) as service:
        deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
        while stored_positions(db, settings) != end_offsets(settings):
            assert service.proc is not None and service.proc.poll() is None, service.log_tail()
            assert time.monotonic() < deadline, "projector did not finish after the kills"
            time.sleep(0.2)
    assert kills >= 1
    progress = campaign_progress(db, campaign.id)
    assert progress is not None
    assert (progress.status, progress.total, progress.queued, progress.sent, progress.failed,
            progress.pending) == ("completed", total, total, sent, failed, 0)
    assert recipient_status_counts(db, campaign.id) == {"queued": 0, "sent": sent,
                                                         "failed": failed}
    settled = db.execute("SELECT sum(settled) FROM campaign_throughput WHERE campaign_id = %s",
                         (campaign.id,)).fetchone()
    daily = db.execute("SELECT sum(sent), sum(failed) FROM tenant_daily_sends"
                       " WHERE tenant_id = %s", (campaign.tenant,)).fetchone()
    assert settled == (sent + failed,)
    assert daily == (sent, failed)


def test_restart_mid_stream_resumes_from_stored_positions(settings, db) -> None:
    campaign = Campaign()
    first, rest, sent, failed, _ = full_scenario(campaign, 60)
    produce(settings, first + rest)
    total_records = len(first) + len(rest)

    # The first instance stops after a few small batches, mid-stream.
    first_instance = projector_for(settings, batch_size=10)
    try:
        deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
        while first_instance.records_applied < 40:
            assert time.monotonic() < deadline, "first instance made no progress"
            first_instance.poll_once()
    finally:
        first_instance.close()
    applied_before = first_instance.records_applied
    assert applied_before < total_records
    assert sum(stored_positions(db, settings).values()) == applied_before

    # The second one runs like the service (a thread, stopped by an event) and must start
    # exactly where the first one's transactions left off.
    second_instance = projector_for(settings)
    stop = threading.Event()
    runner = threading.Thread(target=second_instance.run, args=(stop,), daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
        while stored_positions(db, settings) != end_offsets(settings):
            assert time.monotonic() < deadline, "second instance did not catch up"
            time.sleep(0.2)
    finally:
        stop.set()
        runner.join(timeout=30)
    assert not runner.is_alive(), "run() did not return after the stop event"
    assert second_instance.records_applied == total_records - applied_before

    progress = campaign_progress(db, campaign.id)
    assert progress is not None
    assert (progress.status, progress.queued, progress.sent, progress.failed) == (
        "completed", 60, sent, failed
    )


def test_a_member_left_without_an_assignment_is_re_created_and_resumes(settings, db) -> None:
    from projections.batching import STUCK_MEMBER_SECONDS
    from services.common.membership import GroupMembership

    campaign = Campaign()
    first, rest, sent, failed, _ = full_scenario(campaign, 40)
    produce(settings, first)
    with projector_for(settings) as projector:
        projector.drain(timeout=DRAIN_TIMEOUT_SECONDS)
        applied_before = projector.records_applied
        # As after a broker outage whose rebalance never answered: revoked, then silence.
        now = [0.0]
        stuck = GroupMembership(projector.group, clock=lambda: now[0])
        stuck.revoked()
        now[0] = STUCK_MEMBER_SECONDS + 1
        feed = projector.feed
        assert isinstance(feed, RecordFeed)
        feed.membership = stuck
        old = feed.consumer
        projector._renew_if_stuck()
        assert feed.consumer is not old, "a stuck member was not re-created"
        assert not projector.caught_up()  # the new consumer has no assignment yet
        produce(settings, rest)
        now[0] += 1
        projector.drain(timeout=DRAIN_TIMEOUT_SECONDS)
        assert stuck.joined and stuck.partitions(), "the new consumer did not join"
        projector._renew_if_stuck()  # joined: left alone
        applied = projector.records_applied
    assert applied == applied_before + len(rest)
    assert stored_positions(db, settings) == end_offsets(settings)
    progress = campaign_progress(db, campaign.id)
    assert progress is not None and (progress.sent, progress.failed) == (sent, failed)


def test_a_partition_whose_log_no_longer_starts_at_zero_is_projected_from_its_start(
        settings, db) -> None:
    # A partition never stored starts at offset 0, not at the logical beginning (a faster
    # first fetch); where retention has removed the head, it must still start at the first
    # record there is, and skip nothing after it.
    campaign = Campaign()
    contacts = [f"contact-{i}" for i in range(10)]
    produce(settings, [campaign.created(), campaign.send_requested(), campaign.hydrated(10)])
    deliveries = topic_name(DELIVERIES, settings)
    partitions: set[int | None] = set()
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers,
                         "enable.idempotence": True})
    for _, key, value in [campaign.sent(c, 1, T0 + timedelta(minutes=1)) for c in contacts]:
        producer.produce(deliveries, key=key.encode(), value=value,
                         on_delivery=lambda err, msg: partitions.add(msg.partition()))
    assert producer.flush(30) == 0, "records not acknowledged"
    (partition,) = partitions  # keyed by campaign: one partition, offsets 0-9
    assert partition is not None
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    for future in admin.delete_records([TopicPartition(deliveries, partition, 4)],
                                       operation_timeout=30).values():
        assert future.result().low_watermark == 4

    applied = drain(settings)

    assert applied == 3 + 6  # the campaign facts, and the deliveries from offset 4 on
    progress = campaign_progress(db, campaign.id)
    assert progress is not None
    assert (progress.sent, progress.status) == (6, "sending")
    assert recipient_status_counts(db, campaign.id) == {"queued": 0, "sent": 6, "failed": 0}
    assert stored_positions(db, settings)[(deliveries, partition)] == 10


def test_malformed_records_are_skipped_and_projection_goes_on(settings, db) -> None:
    campaign = Campaign()
    bogus_envelope = encode(wrap(CampaignHydrated(total=1), tenant_id=campaign.tenant,
                                 aggregate_id=campaign.id)).replace(b'"total":1', b'"total":-1')
    # Same key as the campaign: the bad records sit in front of its events in one partition.
    produce(settings, [
        (EVENTS, campaign.id, b"not json"),
        (EVENTS, campaign.id, bogus_envelope),
        campaign.created(),
        campaign.send_requested(),
        campaign.hydrated(1),
        (RECIPIENTS, campaign.id, b"{}"),
        campaign.queued("only"),
        campaign.delivered("only", T0 + timedelta(minutes=1), ok=True),
    ])
    assert drain(settings) == 8
    progress = campaign_progress(db, campaign.id)
    assert progress is not None
    assert (progress.status, progress.total, progress.sent) == ("completed", 1, 1)
    assert stored_positions(db, settings) == end_offsets(settings)


def test_command_rejected_lands_in_command_rejections(settings, db) -> None:
    campaign = Campaign()
    command_id = uuid.uuid4()
    rejection = campaign.event(CommandRejected(command_id=command_id,
                                               command_type="SendCampaign",
                                               reason="campaign does not exist"))
    produce(settings, [rejection, rejection])  # a duplicate is stored once
    drain(settings)
    rows = db.execute(
        "SELECT tenant_id, command_id, command_type, reason, occurred_at FROM command_rejections"
        " WHERE campaign_id = %s", (campaign.id,)
    ).fetchall()
    assert rows == [(campaign.tenant, command_id, "SendCampaign", "campaign does not exist", T0)]
    # A rejection creates no campaign.
    assert campaign_progress(db, campaign.id) is None


def test_campaign_with_no_recipients_completes_at_hydration(settings, db) -> None:
    campaign = Campaign()
    produce(settings, [campaign.created(), campaign.send_requested(), campaign.hydrated(0)])
    drain(settings)
    progress = campaign_progress(db, campaign.id)
    assert progress is not None
    assert (progress.status, progress.total, progress.pending) == ("completed", 0, 0)
    assert progress.completed_at == T0 + timedelta(seconds=2)


def schedule_row(db: psycopg.Connection, campaign: Campaign) -> tuple[Any, ...] | None:
    return db.execute(
        "SELECT status, scheduled_for, schedule_missed_at, schedule_missed_reason"
        " FROM campaign_progress WHERE campaign_id = %s", (campaign.id,)).fetchone()


def test_a_scheduled_campaign_shows_scheduled_until_sent_or_missed(settings, db) -> None:
    send_at = T0 + timedelta(hours=2)
    schedule = CampaignScheduled(send_at=send_at, grace_seconds=60,
                                 send=SendCampaign(list_ids=["all"]))
    missed_at = send_at + timedelta(minutes=10)
    sent_one, missed_one = Campaign(), Campaign()
    produce(settings, [
        sent_one.created(), sent_one.event(schedule, T0 + timedelta(seconds=1)),
        missed_one.created(), missed_one.event(schedule, T0 + timedelta(seconds=1)),
    ])
    drain(settings)
    assert schedule_row(db, sent_one) == ("scheduled", send_at, None, None)
    assert schedule_row(db, missed_one) == ("scheduled", send_at, None, None)

    produce(settings, [
        sent_one.event(CampaignSendRequested(template=TEMPLATE, audience=Audience(
            list_ids=["all"]), contacts_snapshot={}), send_at),
        missed_one.event(CampaignScheduleMissed(send_at=send_at, noticed_at=missed_at,
                                                reason="found 600 s late, grace 60 s"),
                         missed_at),
    ])
    drain(settings)
    assert schedule_row(db, sent_one) == ("sending", send_at, None, None)
    # Back to draft, with the miss on record (the schedule stays visible too).
    assert schedule_row(db, missed_one) == (
        "draft", send_at, missed_at, "found 600 s late, grace 60 s")


def test_cancelled_campaign_stays_cancelled_when_deliveries_finish(settings, db) -> None:
    campaign = Campaign()
    cancelled_at = T0 + timedelta(seconds=30)
    produce(settings, [
        campaign.created(), campaign.send_requested(), campaign.hydrated(1),
        campaign.event(CampaignCancelled(reason="typo in subject"), cancelled_at),
        campaign.queued("late"),
        campaign.delivered("late", T0 + timedelta(minutes=1), ok=True),
    ])
    drain(settings)
    progress = campaign_progress(db, campaign.id)
    assert progress is not None
    assert (progress.status, progress.sent, progress.completed_at) == (
        "cancelled", 1, cancelled_at
    )


def test_failed_transaction_is_rolled_back_and_retried(settings, db, monkeypatch) -> None:
    campaign = Campaign()
    first, rest, sent, failed, _ = full_scenario(campaign, 10)
    produce(settings, first + rest)
    real_apply = BatchWriter.apply
    calls = []

    def apply_then_lose_connection(writer, changes):
        calls.append(changes)
        result = real_apply(writer, changes)
        if len(calls) == 1:
            # After the positions and rows were written: all of it must roll back.
            raise psycopg.OperationalError("simulated connection loss")
        return result

    monkeypatch.setattr(BatchWriter, "apply", apply_then_lose_connection)
    drain(settings)
    assert len(calls) >= 2
    progress = campaign_progress(db, campaign.id)
    assert progress is not None
    assert (progress.status, progress.queued, progress.sent, progress.failed) == (
        "completed", 10, sent, failed
    )
    assert stored_positions(db, settings) == end_offsets(settings)


def test_a_stale_owner_cannot_commit_over_a_newer_position(settings, db) -> None:
    campaign = Campaign()
    produce(settings, [campaign.created(), campaign.send_requested(), campaign.hydrated(3)]
            + [campaign.queued(c) for c in ("a", "b", "c")])
    with projector_for(settings) as projector:
        projector.drain(timeout=DRAIN_TIMEOUT_SECONDS)
        produce(settings, [campaign.delivered(c, T0 + timedelta(minutes=1), ok=True)
                           for c in ("a", "b", "c")])
        # Another instance (after a rebalance this one has not seen yet) already projected
        # the deliveries partition: its position is newer than the one we hold.
        deliveries = {k: v for k, v in end_offsets(settings).items()
                      if k[0] == topic_name(DELIVERIES, settings)}
        for (topic, partition), end in deliveries.items():
            db.execute(
                "INSERT INTO projector_positions (consumer_group, topic, partition, next_offset)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (consumer_group, topic, partition)"
                " DO UPDATE SET next_offset = EXCLUDED.next_offset",
                (settings.group("projector"), topic, partition, end),
            )
        projector.drain(timeout=DRAIN_TIMEOUT_SECONDS)
    progress = campaign_progress(db, campaign.id)
    assert progress is not None
    # This instance's batch was refused, so it did not count what the other one owns.
    assert (progress.status, progress.sent) == ("sending", 0)
    assert stored_positions(db, settings) == end_offsets(settings)


def test_projector_reconnects_after_losing_its_database_connection(settings, db) -> None:
    campaign = Campaign()
    first, rest, sent, failed, _ = full_scenario(campaign, 20)
    with projector_for(settings) as projector:
        produce(settings, first)
        projector.drain(timeout=DRAIN_TIMEOUT_SECONDS)
        killed = db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (f"{settings.group('projector')}-projector",),
        ).fetchall()
        assert killed == [(True,)]
        produce(settings, rest)
        projector.drain(timeout=DRAIN_TIMEOUT_SECONDS)
    progress = campaign_progress(db, campaign.id)
    assert progress is not None
    assert (progress.status, progress.queued, progress.sent, progress.failed) == (
        "completed", 20, sent, failed
    )


def test_service_projects_until_sigterm_then_exits_zero(settings, db, tmp_path) -> None:
    campaign = Campaign()
    produce(settings, [campaign.created(), campaign.send_requested(), campaign.hydrated(0)])
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
           "DATABASE_URL": settings.database_url, "TOPIC_PREFIX": settings.topic_prefix}
    log_path = tmp_path / "projector.log"
    with open(log_path, "wb") as log:
        service = subprocess.Popen([sys.executable, "-m", "services.projector"], env=env,
                                   cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
        while (progress := campaign_progress(db, campaign.id)) is None or (
            progress.status != "completed"
        ):
            assert service.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "service did not project the campaign"
            time.sleep(0.2)
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=30) == 0, log_path.read_text()
    finally:
        if service.poll() is None:
            service.kill()
    assert '"projector stopped"' in log_path.read_text()


def test_pause_resume_retries_skips_exclusions_and_ambiguous_sends(settings, db) -> None:
    c = Campaign()
    t1 = T0 + timedelta(minutes=1)
    paused_at = T0 + timedelta(seconds=10)
    produce(settings, [
        c.created(), c.send_requested(), c.hydrated(5),
        *[c.queued(k) for k in ("k1", "k2", "k3", "k4", "k5")], c.excluded("x1", "unsubscribed"),
        c.event(CampaignPaused(reason="failure rate 30%", automatic=True), paused_at),
        c.deferred("k1", 1, t1), c.deferred("k1", 2, t1 + timedelta(seconds=1)),
        c.sent("k1", 3, t1 + timedelta(seconds=2), ambiguous=1),
        c.delivered("k2", t1, ok=False), c.skipped("k3", t1), c.deferred("k4", 1, t1),
    ])
    drain(settings)
    p = campaign_progress(db, c.id)
    assert p is not None
    assert (p.status, p.total, p.queued, p.sent, p.failed, p.skipped, p.excluded, p.retrying,
            p.ambiguous, p.pending) == ("paused", 5, 5, 1, 1, 1, 1, 1, 1, 2)
    assert (p.paused_at, p.pause_reason, p.paused_automatically) == (
        paused_at, "failure rate 30%", True)
    history = db.execute(
        "SELECT attempt, outcome, smtp_code FROM analyst_recipient_attempts"
        " WHERE campaign_id = %s AND contact_id = 'k1' ORDER BY attempt", (c.id,)).fetchall()
    assert history == [(1, "deferred", 451), (2, "deferred", 451), (3, "sent", None)]
    k4 = db.execute("SELECT status, attempts, last_error FROM campaign_recipients"
                    " WHERE campaign_id = %s AND contact_id = 'k4'", (c.id,)).fetchone()
    assert k4 == ("retrying", 1, "451 greylisted")

    resumed_at = T0 + timedelta(minutes=2)
    end = T0 + timedelta(minutes=3)
    produce(settings, [c.event(CampaignResumed(), resumed_at),
                       c.deferred("k1", 1, t1),  # a late duplicate: no step back
                       c.sent("k4", 2, end), c.sent("k5", 1, end - timedelta(seconds=5))])
    drain(settings)
    p = campaign_progress(db, c.id)
    assert p is not None
    assert (p.status, p.sent, p.retrying, p.pending, p.resumed_at, p.completed_at) == (
        "completed", 3, 0, 0, resumed_at, end)
    assert recipient_status_counts(db, c.id) == {
        "excluded": 1, "queued": 0, "sent": 3, "failed": 1, "skipped": 1}
    daily = db.execute("SELECT day, sent, failed, skipped FROM tenant_daily_sends"
                       " WHERE tenant_id = %s", (c.tenant,)).fetchall()
    assert daily == [(T0.date(), 3, 1, 1)]
    settled = db.execute("SELECT sum(settled) FROM campaign_throughput WHERE campaign_id = %s",
                         (c.id,)).fetchone()
    assert settled == (5,)


def test_list_counts_follow_contact_events(settings, db) -> None:
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    l1, l2 = f"list-{uuid.uuid4().hex[:6]}", f"list-{uuid.uuid4().hex[:6]}"

    def contact(payload: Record) -> tuple[TopicSpec, str, bytes]:
        cid = payload.contact_id  # type: ignore[attr-defined]
        value = encode(wrap(payload, tenant_id=tenant, aggregate_id=cid, occurred_at=T0))
        return CONTACTS, contact_key(tenant, cid).decode(), value

    produce(settings, [
        contact(ContactUpserted(contact_id="p1", email="p1@example.com", lists=[l1, l2])),
        contact(ContactUpserted(contact_id="p2", email="p2@example.com", lists=[l1])),
        contact(ContactUpserted(contact_id="p3", email="p3@example.com", lists=[l1])),
        contact(ContactUpserted(contact_id="p4", email="p4@example.com", lists=[l1, l2])),
        contact(ContactUnsubscribed(contact_id="p2", list_id=l1)),
        contact(ContactDeleted(contact_id="p3")),
        contact(ContactSuppressed(contact_id="p4", reason="hard_bounce")),
        contact(ContactListMembershipRemoved(contact_id="p1", list_id=l2)),
        # Never upserted: kept as a flag on a deleted row (a later upsert must not lift it),
        # counted in no list.
        contact(ContactUnsubscribed(contact_id="nobody")),
    ])
    drain(settings)
    counts = db.execute(
        "SELECT list_id, members, mailable, unsubscribed, suppressed FROM analyst_list_counts"
        " WHERE tenant_id = %s ORDER BY list_id = %s DESC", (tenant, l1)).fetchall()
    assert counts == [(l1, 3, 1, 1, 1), (l2, 1, 0, 0, 1)]
    assert db.execute("SELECT count(*) FROM contacts WHERE tenant_id = %s AND NOT deleted",
                      (tenant,)).fetchone() == (3,)
    assert db.execute(
        "SELECT deleted, globally_unsubscribed FROM contacts WHERE tenant_id = %s"
        " AND contact_id = 'nobody'", (tenant,)).fetchone() == (True, True)


def test_delivery_lane_projects_deliveries_before_their_queued_with_exact_counts(
        settings, db) -> None:
    """The delivery lane runs ahead of the main lane (what the lanes are for): every delivery
    creates its recipient, and the RecipientQueued arriving later through the other lane
    counts nothing twice."""
    campaign = Campaign()
    first, rest, sent, failed, last = full_scenario(campaign, 60)
    produce(settings, first + rest)
    delivery_lane, main_lane = lane_projectors(settings)
    try:
        assert (delivery_lane.group, main_lane.group) == (
            settings.group(DELIVERY_LANE.group), settings.group(MAIN_LANE.group))
        delivery_lane.drain(timeout=DRAIN_TIMEOUT_SECONDS)
        early = db.execute(
            "SELECT queued, sent, failed, total FROM campaigns WHERE campaign_id = %s",
            (campaign.id,)).fetchone()
        # Created by their deliveries alone; no campaign fact is projected yet.
        assert early == (60, sent, failed, None)
        main_lane.drain(timeout=DRAIN_TIMEOUT_SECONDS)
    finally:
        delivery_lane.close()
        main_lane.close()
    progress = campaign_progress(db, campaign.id, campaign.tenant)
    assert progress is not None
    assert (progress.status, progress.total, progress.queued, progress.sent, progress.failed,
            progress.pending, progress.completed_at) == (
        "completed", 60, 60, sent, failed, 0, last)
    assert recipient_status_counts(db, campaign.id) == {"queued": 0, "sent": sent,
                                                         "failed": failed}
    # Both lanes' positions, under the one positions name, cover every topic-partition.
    assert stored_positions(db, settings) == end_offsets(settings)


def test_lanes_running_together_on_shared_campaigns_count_exactly(settings, db) -> None:
    """Both lanes at once, in small batches, on two campaigns whose facts interleave with
    pauses and resumes (campaign facts and recipients in one main-lane transaction, while the
    delivery lane writes the same campaigns): no deadlock, no failed batch, exact counters."""
    campaigns = [Campaign(), Campaign()]
    total = 600
    records: list[tuple[TopicSpec, str, bytes]] = []
    expected = {}
    for campaign in campaigns:
        first, rest, sent, failed, _ = full_scenario(campaign, total)
        expected[campaign.id] = (sent, failed)
        for i, record in enumerate(first + rest):
            records.append(record)
            if i % 97 == 0:
                records.append(campaign.event(CampaignPaused(reason="x", automatic=False),
                                              T0 + timedelta(seconds=5)))
                records.append(campaign.event(CampaignResumed(), T0 + timedelta(seconds=6)))
    produce(settings, records)
    projectors = lane_projectors(settings, batch_size=50)
    failures: list[BaseException] = []
    real_settle = Projector._settle

    def settle_watching(self, *, rewind):
        covered, ok = real_settle(self, rewind=rewind)
        if not ok:
            failures.append(RuntimeError(f"{self.group}: a batch failed"))
        return covered, ok

    stop = threading.Event()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Projector, "_settle", settle_watching)
        runner = threading.Thread(target=run_lanes, args=(projectors, stop), daemon=True)
        runner.start()
        try:
            deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
            while stored_positions(db, settings) != end_offsets(settings):
                assert runner.is_alive(), "a lane died"
                assert time.monotonic() < deadline, "the lanes did not catch up"
                time.sleep(0.2)
        finally:
            stop.set()
            runner.join(timeout=30)
    assert not runner.is_alive()
    assert failures == []
    for campaign in campaigns:
        sent, failed = expected[campaign.id]
        progress = campaign_progress(db, campaign.id)
        assert progress is not None
        assert (progress.status, progress.total, progress.queued, progress.sent,
                progress.failed, progress.pending) == (
            "completed", total, total, sent, failed, 0)
        settled = db.execute(
            "SELECT sum(settled) FROM campaign_throughput WHERE campaign_id = %s",
            (campaign.id,)).fetchone()
        assert settled == (sent + failed,)


@pytest.mark.parametrize(("error", "pauses"), [
    (psycopg.errors.UniqueViolation("simulated: inserted by another transaction"), []),
    (psycopg.OperationalError("simulated connection loss"), [1.0]),
], ids=["row-conflict-retried-at-once", "other-failure-backs-off"])
def test_a_row_conflict_is_retried_at_once_other_failures_back_off(
        settings, db, monkeypatch, error: Exception, pauses: list[float]) -> None:
    campaign = Campaign()
    first, rest, sent, failed, _ = full_scenario(campaign, 10)
    produce(settings, first + rest)
    real_apply = BatchWriter.apply
    calls = []

    def apply_failing_once(writer, changes):
        calls.append(changes)
        if len(calls) == 1:
            raise error
        return real_apply(writer, changes)

    monkeypatch.setattr(BatchWriter, "apply", apply_failing_once)
    with projector_for(settings) as projector:
        stop = RecordingStop()
        projector._stop = stop
        projector.drain(timeout=DRAIN_TIMEOUT_SECONDS)
    assert len(calls) >= 2
    assert stop.pauses == pauses
    progress = campaign_progress(db, campaign.id)
    assert progress is not None
    assert (progress.status, progress.queued, progress.sent, progress.failed) == (
        "completed", 10, sent, failed)
    assert stored_positions(db, settings) == end_offsets(settings)


def test_a_batch_in_flight_is_taken_as_soon_as_it_is_done_not_after_an_idle_poll(
        settings, db) -> None:
    """With nothing more to consume, a poll returns once the batch in flight has committed,
    with its records, not after the whole poll timeout (a drain's last batch)."""
    campaign = Campaign()
    produce(settings, [campaign.created(), campaign.send_requested(), campaign.hydrated(2),
                       campaign.queued("contact-001"), campaign.queued("contact-002")])
    poll_timeout = 60.0
    with projector_for(settings, poll_timeout=poll_timeout) as projector:
        covered = 0
        deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
        # Until everything was consumed, handed over and taken back from the writer.
        while not (covered == 5 and projector._writer.in_flight is None):
            assert time.monotonic() < deadline, f"only {covered} records covered"
            started = time.monotonic()
            covered += projector.poll_once()
            waited = time.monotonic() - started
            # Every record was there before the first poll: no poll needs its whole timeout
            # (the assignment aside, which comes within the first).
            assert covered == 0 or waited < poll_timeout / 4, (
                f"a poll waited {waited:.1f} s with a batch done")
        # Everything is projected; the end-offset look-up may still answer "not known" once
        # on a loaded machine (leadership settling, a timed-out request): asked again.
        while not projector.caught_up():
            assert time.monotonic() < deadline, "projected everything but never caught up"
            time.sleep(0.1)
