"""Gather: per-partition hydration reports -> one CampaignHydrated per campaign, exactly once.

Guarantee: CampaignHydrated(total, excluded, unknown contact ids and their count) is committed
to campaign.events exactly once per campaign, after every contacts partition's report, in the
same Kafka transaction as the consumed offsets of the reports topic. Reports are read
read_committed, so only reports of committed fan-outs count (see fanout.py), each (campaign,
partition) once.

State is rebuilt on assignment by re-reading each assigned reports partition from its start
up to the group's committed offset: a campaign whose reports are all before that offset was
emitted already (its emission was committed with that offset), one with reports missing is
still being gathered. Reports are few (one per partition per campaign), so this stays small.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from schemas.envelope import Envelope, SchemaViolation, decode, encode, wrap_caused_by
from schemas.events import MAX_UNKNOWN_CONTACT_IDS, CampaignHydrated, HydrationPartitionReported
from services.common import metrics
from services.common.kafka import (
    Stopping,
    TransactionalProducer,
    TransactionFailed,
    close_within,
    make_consumer,
    producer_config,
    read_until,
    replay_reader,
)
from services.common.logs import configure_logging
from services.common.membership import register, unregister
from services.common.settings import Settings
from services.common.topics import EVENTS, HYDRATION_REPORTS, topic_name
from services.hydrator.audience import sum_exclusions

log = configure_logging("hydrator.gather")

BATCH_SIZE = 500
POLL_SECONDS = 0.2
# A replay that receives nothing for this long fails the session (broker away): it is redone.
REPLAY_IDLE_SECONDS = 10.0


@dataclass
class _Gathering:
    partitions: int
    reported: dict[int, HydrationPartitionReported] = field(default_factory=dict)


@dataclass
class ReportGatherer:
    """Pure: which report completes which campaign."""

    gathering: dict[str, _Gathering] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)

    def add(self, report: HydrationPartitionReported) -> CampaignHydrated | None:
        """The campaign's CampaignHydrated when this report is its last missing one."""
        campaign = report.campaign_id
        if campaign in self.done:
            return None
        state = self.gathering.setdefault(campaign, _Gathering(report.partitions))
        state.reported[report.partition] = report
        if len(state.reported) < state.partitions:
            return None
        del self.gathering[campaign]
        self.done.add(campaign)
        reports = list(state.reported.values())
        # Each partition names its own unknown ids (disjoint sets): the first of all, sorted.
        unknown = sorted(i for r in reports for i in r.unknown_contact_ids)[:MAX_UNKNOWN_CONTACT_IDS]
        return CampaignHydrated(
            total=sum(r.queued for r in reports),
            excluded=sum_exclusions(r.excluded for r in reports),
            unknown_contact_ids=unknown,
            unknown_contact_count=sum(r.unknown_contact_count for r in reports),
        )


def _report(raw: bytes | None) -> tuple[Envelope, HydrationPartitionReported] | None:
    try:
        message = decode(raw)
    except SchemaViolation:
        return None
    if not isinstance(message.payload, HydrationPartitionReported):
        return None
    return message.envelope, message.payload


class GatherLoop:
    """Consume reports, emit CampaignHydrated, commit both in one transaction."""

    def __init__(self, settings: Settings, app_id: str, instance: str) -> None:
        self.settings = settings
        self.group = f"{app_id}-gather"
        self.reports_topic = topic_name(HYDRATION_REPORTS, settings)
        self.events_topic = topic_name(EVENTS, settings)
        self.gatherer = ReportGatherer()
        self.stopping = threading.Event()
        self._group_member = register(self.group)  # for /readyz
        self.instance = instance
        self.consumer = self._new_consumer()
        # Stable per instance: a restarted instance aborts what its predecessor left open.
        # Every transactional call is bounded; one that hangs re-creates the producer.
        self._txn = TransactionalProducer(
            producer_config(settings, **{"transactional.id": f"{self.group}-{instance}"}),
            self.stopping, logger=log)
        self._in_transaction = False

    @property
    def producer(self) -> Producer:
        """The transactional producer of the moment (re-created after a fatal error)."""
        return self._txn.producer

    def _new_consumer(self) -> Consumer:
        return make_consumer(
            self.settings, "hydrator-gather", **{"group.id": self.group, "session.timeout.ms": 10_000},
        )

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._replay(consumer.committed(partitions, timeout=30))
        self._group_member.assigned(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._group_member.revoked()

    def _replay(self, committed: list[TopicPartition]) -> None:
        """Re-read reports before the committed offsets: state only, nothing is emitted. A
        silent broker or a stop request raises (KafkaException, Stopping: see `run`), so no
        session starts from a partial state."""
        ends = {(tp.topic, tp.partition): tp.offset for tp in committed if tp.offset > 0}
        if not ends:
            return

        def add(msg: Message) -> None:
            parsed = _report(msg.value())
            if parsed is not None:
                self.gatherer.add(parsed[1])

        with replay_reader(self.settings, f"{self.group}-replay") as reader:
            read_until(reader, ends, add, idle_timeout=REPLAY_IDLE_SECONDS, stop=self.stopping)

    def run(self) -> None:
        """Until stop(): on any Kafka failure the open transaction is aborted, the state is
        dropped and rebuilt from the committed offsets, and consumption starts over."""
        while not self.stopping.is_set():
            try:
                self._session()
            except Stopping as exc:
                log.warning("gather stopping while the broker did not answer", waiting_for=str(exc))
                break
            except (KafkaException, TransactionFailed) as exc:
                log.warning("gather restarting", reason=str(exc))
                self._reset()
        unregister(self._group_member)

    def _session(self) -> None:
        self._txn.init()
        self.consumer.subscribe([self.reports_topic], on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_revoke)
        while not self.stopping.is_set():
            batch = self.consumer.consume(BATCH_SIZE, POLL_SECONDS)
            if batch:
                self._handle(batch)
        close_within(self.consumer.close, "gather consumer")

    def _reset(self) -> None:
        if self._in_transaction:  # (a failed commit has settled its transaction already)
            self._in_transaction = False
            try:
                self._txn.abort()
            except Stopping:
                return
        close_within(self.consumer.close, "gather consumer")
        self.stopping.wait(1.0)
        self.gatherer = ReportGatherer()
        self.consumer = self._new_consumer()

    def _handle(self, batch: list[Message]) -> None:
        self._txn.begin()
        self._in_transaction = True
        for msg in batch:
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(error)
            parsed = _report(msg.value())
            if parsed is None:
                continue
            env, report = parsed
            hydrated = self.gatherer.add(report)
            if hydrated is None:
                continue
            out = wrap_caused_by(hydrated, env, aggregate_id=report.campaign_id)
            self.producer.produce(self.events_topic, key=report.campaign_id.encode(), value=encode(out))
            metrics.count_produced(self.events_topic)
            log.info("campaign hydrated", tenant=env.tenant_id, campaign=report.campaign_id,
                     correlation_id=str(env.correlation_id), total=hydrated.total,
                     excluded=hydrated.excluded, unknown_contacts=hydrated.unknown_contact_count)
        positions = self.consumer.position(self.consumer.assignment())
        self._in_transaction = False  # commit() aborts or re-creates on failure
        self._txn.commit(positions, self.consumer.consumer_group_metadata())

    def stop(self) -> None:
        self.stopping.set()


def start_gather(settings: Settings, app_id: str, instance: str) -> tuple[GatherLoop, threading.Thread]:
    """Run the gather loop in a daemon thread of the hydrator process."""
    loop = GatherLoop(settings, app_id, instance)
    thread = threading.Thread(target=loop.run, name="hydration-gather", daemon=True)
    thread.start()
    return loop, thread
