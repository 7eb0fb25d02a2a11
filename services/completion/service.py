"""Completion tracker service: campaign.events + campaign.deliveries -> CampaignCompleted
(and, from its failure-rate guard, AutoPauseCampaign commands on campaign.commands).

Guarantee: exactly-once — each hydrated, uncancelled campaign whose recipients all reach a
terminal delivery gets exactly one CampaignCompleted on campaign.events, whatever duplicates,
crashes, restarts or rebalances happen: the decision, the event it produces and the consumed
offsets of both topics commit in one Kafka transaction (fenced by the consumer group's
generation, so a stale owner cannot commit), and on every assignment the in-memory state is
rebuilt by replaying both topics from the beginning up to the group's committed offsets,
so it always matches exactly what committed transactions have already decided.

Why the replay suffices: completion depends only on the set of facts read (a cancel anywhere
before it prevents it; a CampaignCompleted already on the log marks the campaign done), and
every fact below the committed offsets was processed by a committed transaction. If the
replayed facts make a campaign complete, the transaction that read the last of them published
its CampaignCompleted; if they do not, nothing was published and the live loop will decide.

Co-partitioning: both topics have the same partition count and are keyed by campaign id with
the murmur2 partitioner, so partition N of either topic holds the same campaigns. The group
uses the range assignor, which assigns topic by topic in partition order, so one member owns
the same partition numbers of both topics; state is kept per partition number.

Faults: every Kafka call is bounded (services/common/kafka.py, `TransactionalProducer`). A
transaction that cannot commit (broker gone mid-call, fenced, timed out) is aborted, or its
producer re-created, and the state rebuilt and the consumer rewound to the committed offsets:
a broker outage of any length is waited out and the tracker resumes by itself. A stop request
is honoured within a few seconds in every state.

Fail-over: run as a service (`python -m services.completion`), the tracker is a static member
of its group (`group.instance.id`, COMPLETION_TRACKER_INSTANCE, default "0") with a 10 s
session, under that instance's transactional id: a replacement takes the partitions over at
once and aborts its predecessor's open transaction, instead of waiting out its session (45 s)
and its transaction (TRANSACTION_TIMEOUT_MS).

Limits: the replay reads both topics from offset zero (infinite retention), so a (re)assignment
costs time proportional to the partitions' history. A transaction left open by a crashed
instance holds back read_committed readers of campaign.events until the broker aborts it
(TRANSACTION_TIMEOUT_MS), or at once when an instance with the same transactional id restarts.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition

from schemas.commands import AutoPauseCampaign
from schemas.envelope import SchemaViolation, decode, encode, wrap
from services.common import metrics
from services.common.kafka import (
    SINGLE_INSTANCE_SESSION_TIMEOUT_MS,
    Stopping,
    TransactionalProducer,
    TransactionFailed,
    close_within,
    fatal_error,
    is_fatal,
    make_consumer,
    producer_config,
    read_until,
    replace_consumer,
    replay_reader,
    retry_until_stopped,
    static_member_config,
)
from services.common.membership import register, unregister
from services.common.settings import Settings
from services.common.topics import COMMANDS, DELIVERIES, EVENTS, topic_name
from services.completion.tracker import (
    AutoPause,
    Completion,
    CompletionTracker,
    Decision,
    FailureGuard,
)

SERVICE = "completion-tracker"

# Records per transaction: larger batches amortise the commit round trip; the state a failed
# batch forces us to rebuild does not grow with it (the rebuild replays from the log anyway).
BATCH_SIZE = 1_000
# How long one consume() waits on quiet topics: bounds how late a stop request is noticed.
POLL_SECONDS = 0.5
# A replay that receives nothing for this long is stuck (broker unreachable, partition without
# leader): it fails (KafkaException, retried) instead of deciding on partial state.
REPLAY_IDLE_SECONDS = 30.0
# Committed-offset look-ups: a coordinator that does not answer within this fails the call
# (retried with back-off; short, so a stop request is not held up by one).
COMMITTED_TIMEOUT_SECONDS = 5.0
# A transaction of a crashed instance is aborted by the broker after this; until then it holds
# back read_committed readers of campaign.events. Far above a batch's duration (no I/O besides
# Kafka), far below the broker's 15-minute maximum.
TRANSACTION_TIMEOUT_MS = 30_000

TRACKED_TOPICS = (EVENTS, DELIVERIES)


class CompletionService:
    """Consumes campaign facts and deliveries, publishes CampaignCompleted transactionally.

    Drive it with `run(stop_event)`, or step by step with `poll_once()` in tests. One thread
    drives one instance. `instance` names a static group member and its transactional id (a
    restarted instance with the same name takes over at once); without it the instance joins
    as a dynamic member. `transactional_id` (default: from `instance`, else a fresh one) can be
    given on its own: a restarted instance with its predecessor's id aborts the predecessor's
    open transaction at once.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        transactional_id: str | None = None,
        batch_size: int = BATCH_SIZE,
        poll_timeout: float = POLL_SECONDS,
        logger: Any = None,
        guard: FailureGuard | None = None,
        instance: str | None = None,
    ) -> None:
        self.settings = settings
        self.guard = guard or FailureGuard()
        self.commands_topic = topic_name(COMMANDS, settings)
        self.pauses_requested = 0
        self.group = settings.group(SERVICE)
        self.events_topic = topic_name(EVENTS, settings)
        self.deliveries_topic = topic_name(DELIVERIES, settings)
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        self.transactional_id = transactional_id or (
            f"{self.group}-{instance}" if instance is not None else f"{self.group}-{uuid.uuid4()}")
        # Replaced by run()'s: every wait on the broker looks at it.
        self._stop = threading.Event()
        self._log = logger or structlog.get_logger().bind(component=SERVICE)
        # Partition number -> state of the campaigns on that partition of both topics.
        self.trackers: dict[int, CompletionTracker] = {}
        self.completions_published = 0
        self._started = False
        self._closed = False
        self._consumer_config: dict[str, Any] = {
            "client.id": f"{self.group}-consumer",
            # Per-topic ranges: the same partition numbers of both topics to one member.
            "partition.assignment.strategy": "range",
            # Offsets are committed only inside our transactions.
            "enable.auto.offset.store": False,
            **(static_member_config(settings, SERVICE, instance) if instance is not None
               else {"session.timeout.ms": SINGLE_INSTANCE_SESSION_TIMEOUT_MS,
                     "heartbeat.interval.ms": SINGLE_INSTANCE_SESSION_TIMEOUT_MS // 4}),
        }
        self._group_member = register(self.group)  # for /readyz
        self.consumer: Consumer = self._new_consumer()
        self._txn = TransactionalProducer(
            producer_config(settings, **{"transactional.id": self.transactional_id,
                                         "transaction.timeout.ms": TRANSACTION_TIMEOUT_MS}),
            self._stop, logger=self._log)

    @property
    def producer(self) -> Any:
        """The transactional producer of the moment (re-created after a fatal error)."""
        return self._txn.producer

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Fence any predecessor with our transactional id, then join the group."""
        if self._started:
            return
        self._started = True
        self._txn.init()
        self._subscribe()

    def _new_consumer(self) -> Consumer:
        return make_consumer(self.settings, SERVICE, **self._consumer_config)

    def _subscribe(self) -> None:
        self.consumer.subscribe(
            [self.events_topic, self.deliveries_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )

    def _renew_consumer(self, error: KafkaError) -> None:
        """Replace a consumer that failed for good (a static member fenced after its session
        timed out during a broker outage): the new one joins, and its assignment rebuilds the
        state from the committed offsets; the batch in hand was not committed and is read
        again."""
        self.consumer = replace_consumer(self.consumer, self._new_consumer, error,
                                         logger=self._log)
        self.trackers = {}
        self._subscribe()

    def run(self, stop: threading.Event) -> None:
        """Track until `stop` is set; the batch in flight commits, then it closes."""
        self._stop = self._txn.stop = stop
        heartbeat = self.settings.heartbeat()
        try:
            self.start()
            self._log.info("completion tracker started", group=self.group,
                           topics=[self.events_topic, self.deliveries_topic],
                           transactional_id=self.transactional_id)
            while not stop.is_set():
                heartbeat.beat()
                try:
                    self.poll_once()
                except KafkaException as exc:
                    if (error := fatal_error(exc)) is None:
                        raise
                    self._renew_consumer(error)  # producer failures never get here
        except Stopping as exc:
            # Nothing is lost: offsets were not committed, the next start decides again (and
            # its init_transactions aborts a transaction left open).
            self._log.warning("stopping while the broker did not answer", waiting_for=str(exc))
        finally:
            self.close()
        self._log.info("completion tracker stopped", published=self.completions_published)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        unregister(self._group_member)
        try:
            close_within(self.consumer.close, "completion consumer")
        finally:
            self._txn.close()

    def __enter__(self) -> CompletionService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- assignment and state rebuild ------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        by_topic: dict[str, set[int]] = {}
        for tp in partitions:
            by_topic.setdefault(tp.topic, set()).add(tp.partition)
        events = by_topic.get(self.events_topic, set())
        deliveries = by_topic.get(self.deliveries_topic, set())
        if events != deliveries:
            # Campaigns on a partition number owned half by another member never complete
            # here; the range assignor over equal partition counts never does this.
            self._log.warning("assignment is not co-partitioned", events=sorted(events),
                              deliveries=sorted(deliveries))
        def rebuild() -> dict[int, CompletionTracker]:
            committed = _committed(consumer, [TopicPartition(tp.topic, tp.partition)
                                              for tp in partitions])
            return self._replay(committed)

        self.trackers.update(retry_until_stopped(
            self._stop, "state rebuild on assignment", rebuild, logger=self._log))
        self._group_member.assigned(partitions)
        self._log.info(
            "partitions assigned", partitions=sorted(events | deliveries),
            campaigns=sum(len(t.campaigns) for t in self.trackers.values()),
        )
        # Not calling assign(): the client assigns after this callback, from committed offsets.

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Called from inside consume(), between batches: no transaction is open.
        for tp in partitions:
            self.trackers.pop(tp.partition, None)
        self._group_member.revoked()
        self._log.info("partitions revoked", count=len(partitions))

    def _replay(self, committed: list[TopicPartition]) -> dict[int, CompletionTracker]:
        """Fold both topics from offset zero up to the committed offsets into fresh trackers."""
        trackers = {tp.partition: CompletionTracker(self.guard) for tp in committed}
        ends = {(tp.topic, tp.partition): tp.offset for tp in committed if tp.offset > 0}
        if not ends:
            return trackers
        folded = 0

        def fold(record: Message) -> None:
            nonlocal folded
            self._fold(trackers[record.partition() or 0], record)
            folded += 1

        # Beats while records arrive (see the command handler's replay): a long rebuild is not
        # a stuck loop; a silent one is bounded by REPLAY_IDLE_SECONDS.
        with replay_reader(self.settings, f"{self.group}-replay") as reader:
            read_until(reader, ends, fold, idle_timeout=REPLAY_IDLE_SECONDS, stop=self._stop,
                       on_progress=self.settings.heartbeat().beat)
        self._log.info("state rebuilt", records=folded,
                       until={f"{t}[{p}]": o for (t, p), o in sorted(ends.items())})
        return trackers

    def _fold(self, tracker: CompletionTracker, record: Message) -> None:
        """Apply a record already processed by a committed transaction: decide nothing."""
        try:
            tracker.apply(decode(record.value()))
        except SchemaViolation:
            pass  # skipped live too

    # --- one batch -------------------------------------------------------------------------

    def poll_once(self) -> int:
        """Consume one batch and commit it in one transaction; returns the records covered."""
        self.start()
        records: list[Message] = []
        for record in self.consumer.consume(self.batch_size, self.poll_timeout):
            error = record.error()
            if error is not None:
                if is_fatal(error):
                    raise KafkaException(error)
                self._log.warning("consumer error", error=str(error))
                continue
            if (record.partition() or 0) not in self.trackers:
                continue  # revoked during this consume(): the new owner handles it
            records.append(record)
        if not records:
            return 0
        decided = self._transact(records)
        if decided is None:
            return 0
        for pause in decided:
            if isinstance(pause, AutoPause):
                self.pauses_requested += 1
                self._log.warning("failure rate too high: pause requested",
                                  tenant_id=pause.tenant_id, campaign_id=pause.campaign_id,
                                  reason=pause.reason)
        published = [c for c in decided if isinstance(c, Completion)]
        for completion in published:
            self._log.info(
                "campaign completed", tenant_id=completion.tenant_id,
                campaign_id=completion.campaign_id, total=completion.event.total,
                sent=completion.event.sent, failed=completion.event.failed,
                skipped=completion.event.skipped,
            )
        self.completions_published += len(published)
        return len(records)

    def _transact(self, records: list[Message]) -> list[Decision] | None:
        """Decide and publish in one transaction; None when it was aborted (state rebuilt)."""
        published: list[Decision] = []
        try:
            self._txn.begin()
            try:
                for record in records:
                    decision = self._decide(record)
                    if isinstance(decision, Completion):
                        self._emit(decision)
                    elif isinstance(decision, AutoPause):
                        self._request_pause(decision)
                    if decision is not None:
                        published.append(decision)
            except KafkaException as exc:  # a produce refused (broker away, queue full)
                self._log.warning("batch failed; aborting it", error=str(exc))
                self._txn.abort()
                raise TransactionFailed(str(exc)) from exc
            self._txn.send_offsets(_next_offsets(records), self.consumer.consumer_group_metadata())
            self._commit_transaction()
        except TransactionFailed as exc:
            self._log.warning("transaction not committed; rebuilding from the committed offsets",
                              error=str(exc), records=len(records))
            self._rebuild()
            return None
        return published

    def _decide(self, record: Message) -> Decision | None:
        try:
            message = decode(record.value())
        except SchemaViolation as exc:
            self._log.warning("undecodable record skipped", topic=record.topic(),
                              partition=record.partition(), offset=record.offset(),
                              reason=str(exc))
            return None
        return self.trackers[record.partition() or 0].apply(message)

    def _emit(self, completion: Completion) -> None:
        envelope = wrap(
            completion.event,
            tenant_id=completion.tenant_id,
            aggregate_id=completion.campaign_id,
            correlation_id=completion.correlation_id,
            causation_id=completion.causation_id,
        )
        self.producer.produce(
            self.events_topic, key=completion.campaign_id.encode(), value=encode(envelope)
        )
        metrics.count_produced(self.events_topic)

    def _request_pause(self, pause: AutoPause) -> None:
        """A command, not an event: the campaign aggregate decides (it may be paused already)."""
        envelope = wrap(
            AutoPauseCampaign(reason=pause.reason),
            tenant_id=pause.tenant_id,
            aggregate_id=pause.campaign_id,
            correlation_id=pause.correlation_id,
            causation_id=pause.causation_id,
        )
        self.producer.produce(
            self.commands_topic, key=pause.campaign_id.encode(), value=encode(envelope)
        )
        metrics.count_produced(self.commands_topic)

    def _commit_transaction(self) -> None:
        self._txn.commit_transaction()

    def _rebuild(self) -> None:
        """After a transaction that did not commit: its in-memory effects are void; rebuild and
        rewind to the committed offsets (retried until done or a stop is requested)."""
        def attempt() -> None:
            assignment = self.consumer.assignment()
            committed = _committed(self.consumer, assignment)
            trackers = self._replay(committed)
            for tp in committed:
                offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
                self.consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
            self.trackers = trackers

        retry_until_stopped(self._stop, "rewind to the committed offsets", attempt,
                            logger=self._log)


def _committed(consumer: Consumer, partitions: list[TopicPartition]) -> list[TopicPartition]:
    """The group's committed offsets of `partitions`; raises KafkaException when the
    coordinator does not answer or reports an error for one of them."""
    committed = consumer.committed(partitions, timeout=COMMITTED_TIMEOUT_SECONDS)
    for tp in committed:
        if tp.error is not None:
            raise KafkaException(tp.error)
    return committed


def _next_offsets(records: list[Message]) -> list[TopicPartition]:
    last: dict[tuple[str, int], int] = {}
    for record in records:
        where = (record.topic() or "", record.partition() or 0)
        last[where] = max(last.get(where, -1), record.offset() or 0)
    return [TopicPartition(t, p, o + 1) for (t, p), o in sorted(last.items())]
