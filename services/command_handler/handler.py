"""Command handler service: campaign.commands -> campaign.events, exactly once.

Also the campaign clock: once a second, scheduled campaigns of the assigned partitions whose
time has come are fired (or reported missed beyond their grace), in a transaction of their
own.

Guarantee: exactly-once — each command's events (or its CommandRejected) and the consumed
offset are committed in one Kafka transaction; a command id seen before is ignored, so a
command published twice causes its events once. Bad records never stop the loop: malformed
JSON and schema violations go to campaign.commands.dlq with the reason and are answered with
CommandRejected. "command accepted" / "command rejected" are logged only once their
transaction committed.

Faults: every Kafka call is bounded (services/common/kafka.py, `TransactionalProducer`). A
transaction that cannot commit (broker gone mid-call, fenced, timed out) is aborted (or its
producer re-created) and its batch redone from the committed offsets, with the aggregates of
its partitions rebuilt from campaign.events: a broker outage of any length is waited out and
the loop resumes by itself, nothing accepted is lost, and no command is decided twice. A stop
request is honoured within a few seconds in every state (a transaction left unfinished then
is aborted by the successor's init_transactions).

Fail-over: one instance runs at a time, as a static member of its group
(`group.instance.id`, COMMAND_HANDLER_INSTANCE, default "0") with a 10 s session, under the
transactional id of that instance: a replacement takes the partitions over at once and
aborts its predecessor's open transaction instead of waiting for it to time out.

State: campaign aggregates live in memory, rebuilt on partition assignment by replaying the
same-numbered partition of campaign.events (both topics are keyed by campaign id with the
murmur2 partitioner, so a campaign's commands and events share a partition number).
"""

from __future__ import annotations

import functools
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import OffsetSpec

from schemas.base import Record
from schemas.commands import DuplicateCampaign, ForceScheduledSend, SendCampaign
from schemas.envelope import Envelope, SchemaViolation, decode, encode, wrap, wrap_caused_by
from schemas.events import AudienceSegment, CampaignScheduled, CommandRejected
from schemas.lists import CreateList, DeleteList, ListCommand, ListRejected, RenameList
from schemas.segments import (
    ChangeSegment,
    DefineSegment,
    DeleteSegment,
    SegmentCommand,
    SegmentRejected,
)
from services.command_handler.campaign import (
    Campaign,
    Rejected,
    ScheduleDue,
    Status,
    decide,
    evolve,
    send_order,
)
from services.command_handler.segments import SegmentDirectory, UnknownSegments
from services.common import metrics
from services.common.kafka import (
    SINGLE_INSTANCE_SESSION_TIMEOUT_MS,
    Stopping,
    TransactionalProducer,
    TransactionFailed,
    close_within,
    fatal_error,
    is_fatal,
    make_admin,
    make_consumer,
    producer_config,
    read_until,
    replace_consumer,
    replay_reader,
    retry_until_stopped,
    serve_logs,
    static_member_config,
)
from services.common.logs import configure_logging
from services.common.membership import register, unregister
from services.common.settings import Settings
from services.common.topics import COMMANDS, COMMANDS_DLQ, CONTACTS, EVENTS, SEGMENTS, topic_name

log = configure_logging("command-handler")

SEGMENT_COMMANDS = (DefineSegment, ChangeSegment, DeleteSegment)
LIST_COMMANDS = (CreateList, RenameList, DeleteList)
# Segment and list commands (both decided against segments.events) go first in a batch.
SEGMENT_COMMAND_TYPE = re.compile(
    rb'"type"\s*:\s*"(?:(?:Define|Change|Delete)Segment|(?:Create|Rename|Delete)List)"')

# Commands per transaction: larger batches amortise the commit round trip.
BATCH_SIZE = 500
# How long one poll waits for commands before checking the stop flag.
POLL_SECONDS = 0.5
# How often due schedules are looked for: a scheduled send starts at most this late.
SCHEDULE_TICK_SECONDS = 1.0
# Bounds a replay read that sees no record: guards against a stuck partition at start-up.
REPLAY_IDLE_SECONDS = 10.0
# Committed-offset look-ups and the contacts snapshot (metadata, end offsets): guards against a
# coordinator or broker that does not answer; the batch is then aborted and redone.
LOOKUP_TIMEOUT_SECONDS = 5.0
# Tenant and aggregate used when a record is too broken to name its own.
UNKNOWN = "unknown"


@dataclass
class PartitionState:
    """Aggregates and seen command ids of one campaign.events partition."""

    campaigns: dict[str, Campaign] = field(default_factory=dict)
    seen_commands: set[uuid.UUID] = field(default_factory=set)
    # campaign id -> its CampaignScheduled envelope: what a fired schedule's events cite.
    schedules: dict[str, Envelope] = field(default_factory=dict)


class CommandHandler:
    """Consumes commands, decides, and produces events transactionally.

    `instance` names a static group member and its transactional id (see the module
    docstring); None (tests running several at once) joins as a dynamic member under a fresh
    transactional id.
    """

    def __init__(self, settings: Settings, *, instance: str | None = None) -> None:
        self.settings = settings
        self.commands_topic = topic_name(COMMANDS, settings)
        self.events_topic = topic_name(EVENTS, settings)
        self.dlq_topic = topic_name(COMMANDS_DLQ, settings)
        self.contacts_topic = topic_name(CONTACTS, settings)
        self.segments_topic = topic_name(SEGMENTS, settings)
        # Set by run(): every wait on the broker looks at it.
        self.stop = threading.Event()
        self.segments = SegmentDirectory(settings, stop=self.stop)
        self.partitions: dict[int, PartitionState] = {}
        group = settings.group("command-handler")
        self._membership: dict[str, Any] = (
            static_member_config(settings, "command-handler", instance) if instance is not None
            else {"session.timeout.ms": SINGLE_INSTANCE_SESSION_TIMEOUT_MS,
                  "heartbeat.interval.ms": SINGLE_INSTANCE_SESSION_TIMEOUT_MS // 4})
        self._group_member = register(group)  # for /readyz
        self.consumer: Consumer = self._new_consumer()
        self.admin = make_admin(settings.kafka_bootstrap_servers)
        transactional_id = f"{group}-{instance if instance is not None else uuid.uuid4()}"
        self.txn = TransactionalProducer(
            producer_config(settings, **{"transactional.id": transactional_id}), self.stop,
            logger=log)
        # What the open transaction decided, logged once it committed.
        self._decided: list[Callable[[], None]] = []
        self._next_tick = 0.0

    def _new_consumer(self) -> Consumer:
        return make_consumer(self.settings, "command-handler", **self._membership)

    def _subscribe(self) -> None:
        self.consumer.subscribe([self.commands_topic], on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_revoke)

    def _renew_consumer(self, error: KafkaError) -> None:
        """Replace a consumer that failed for good (a static member fenced after its session
        timed out during a broker outage): the new one joins, and its assignment replays the
        partitions from the committed offsets. Nothing uncommitted is lost: the batch in hand
        was not committed and is read again."""
        self.consumer = replace_consumer(self.consumer, self._new_consumer, error, logger=log)
        self.partitions.clear()
        self._subscribe()

    @property
    def producer(self) -> Producer:
        """The transactional producer of the moment (re-created after a fatal error)."""
        return self.txn.producer

    # --- state ----------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        numbers = sorted(tp.partition for tp in partitions)
        self.partitions.update(retry_until_stopped(
            self.stop, f"replay of {self.events_topic}{numbers}",
            functools.partial(self._replay, numbers), logger=log))
        self._group_member.assigned(partitions)
        log.info("partitions assigned", partitions=[tp.partition for tp in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.partitions.pop(tp.partition, None)
        self._group_member.revoked()

    def _replay(self, partitions: list[int]) -> dict[int, PartitionState]:
        """Rebuild the partitions' aggregates from campaign.events (committed records only),
        all with one reader: a (re)assignment costs one fetch session, not one per partition."""
        states = {p: PartitionState() for p in partitions}
        if not partitions:
            return states
        # A long replay runs inside the assignment callback, away from the main loop: it beats
        # while records arrive, or the watchdog would take it for stuck and restart it into
        # the same replay. A silent replay is bounded by REPLAY_IDLE_SECONDS instead.
        with replay_reader(self.settings, f"{self.settings.group('command-handler')}-replay") as reader:
            read_until(reader, {(self.events_topic, p): OFFSET_END for p in partitions},
                       lambda msg: self._apply_stored(states[msg.partition() or 0], msg.value()),
                       idle_timeout=REPLAY_IDLE_SECONDS, stop=self.stop,
                       on_progress=self.settings.heartbeat().beat)
        return states

    @staticmethod
    def _apply_stored(state: PartitionState, raw: bytes | None) -> None:
        try:
            message = decode(raw)
        except SchemaViolation:
            return  # not ours to judge: the events topic has other writers
        env = message.envelope
        if env.causation_id is not None:
            state.seen_commands.add(env.causation_id)
        if isinstance(message.payload, CommandRejected) and message.payload.command_id:
            state.seen_commands.add(message.payload.command_id)
        if isinstance(message.payload, CampaignScheduled):
            state.schedules[env.aggregate_id] = env
        current = state.campaigns.get(env.aggregate_id)
        after = evolve(current, message.payload, campaign_id=env.aggregate_id, tenant_id=env.tenant_id)
        if after is not None:
            state.campaigns[env.aggregate_id] = after

    # --- handling -------------------------------------------------------------------------

    def _contacts_snapshot(self) -> dict[int, int]:
        """contacts.events end offsets now: the audience of a send starting now."""
        meta = self.admin.list_topics(self.contacts_topic, timeout=LOOKUP_TIMEOUT_SECONDS)
        request = {
            TopicPartition(self.contacts_topic, p): OffsetSpec.latest()
            for p in meta.topics[self.contacts_topic].partitions
        }
        serve_logs(self.admin)
        futures = self.admin.list_offsets(request, request_timeout=LOOKUP_TIMEOUT_SECONDS)
        return {tp.partition: future.result(timeout=2 * LOOKUP_TIMEOUT_SECONDS).offset
                for tp, future in futures.items()}

    def handle(self, msg: Message) -> None:
        """Produce (inside the open transaction) what one command record causes."""
        state = self.partitions.setdefault(msg.partition() or 0, PartitionState())
        try:
            command = decode(msg.value())
        except SchemaViolation as exc:
            self._dead_letter(msg, str(exc))
            return
        env = command.envelope
        if env.id in state.seen_commands:
            log.info("duplicate command ignored", command_id=str(env.id), campaign=env.aggregate_id)
            return
        state.seen_commands.add(env.id)
        bound = log.bind(
            tenant=env.tenant_id, campaign=env.aggregate_id, correlation_id=str(env.correlation_id)
        )
        if isinstance(command.payload, SEGMENT_COMMANDS):
            self._handle_segment(env, command.payload)
            return
        if isinstance(command.payload, LIST_COMMANDS):
            self._handle_list(env, command.payload)
            return
        sends_now = isinstance(command.payload, SendCampaign | ForceScheduledSend)
        snapshot = self._contacts_snapshot() if sends_now else None
        current = state.campaigns.get(env.aggregate_id)
        try:
            send = send_order(current, command.payload)
            segments = self._named_segments(env.tenant_id, send) if send else {}
            events = decide(
                current,
                command.payload,
                campaign_id=env.aggregate_id,
                tenant_id=env.tenant_id,
                contacts_snapshot=snapshot,
                segments=segments,
                deleted_lists=self.segments.deleted_lists(env.tenant_id) if send else (),
                source=self._source_of(command.payload),
            )
        except Rejected as exc:
            reason = str(exc)
            self._decided.append(lambda: bound.info("command rejected", command=env.type,
                                                    reason=reason))
            self._reject(env, reason)
            return
        for event in events:
            out = self._emit(env, event)
            if isinstance(event, CampaignScheduled):
                state.schedules[env.aggregate_id] = out
            current = evolve(current, event, campaign_id=env.aggregate_id, tenant_id=env.tenant_id)
        if current is not None:
            state.campaigns[env.aggregate_id] = current
        names = [type(e).__name__ for e in events]
        self._decided.append(lambda: bound.info("command accepted", command=env.type, events=names))

    def _source_of(self, command: Record) -> Campaign | None:
        """The campaign a DuplicateCampaign copies, from any assigned partition (every one
        while a single instance runs, as deployed; one this instance does not hold reads as
        unknown, and the command is rejected rather than guessed)."""
        if not isinstance(command, DuplicateCampaign):
            return None
        for state in self.partitions.values():
            if (found := state.campaigns.get(command.source_campaign_id)) is not None:
                return found
        return None

    def _named_segments(self, tenant_id: str, command: Record) -> dict[str, AudienceSegment]:
        """The criteria of the segments a send names, as defined now; Rejected if unknown."""
        if not isinstance(command, SendCampaign):
            return {}
        named = [*command.segment_ids, *command.exclude_segment_ids]
        if not named:
            return {}
        try:
            return {s.segment_id: s for s in self.segments.snapshot(tenant_id, named)}
        except UnknownSegments as exc:
            raise Rejected(f"unknown segment(s) for tenant {tenant_id!r}: {exc}") from None

    def _handle_segment(self, env: Envelope, command: SegmentCommand) -> None:
        """Segment commands: events onto segments.events (keyed by segment id), or a rejection
        onto campaign.events, in the open transaction."""
        self._handle_definition(
            env, command.segment_id, lambda: self.segments.decide(env.tenant_id, command),
            lambda event: self.segments.apply(env.tenant_id, event),  # type: ignore[arg-type]
            {"segment": command.segment_id})

    def _handle_list(self, env: Envelope, command: ListCommand) -> None:
        """List commands: events onto segments.events (keyed by list id), or a rejection onto
        campaign.events, in the open transaction."""
        self._handle_definition(
            env, command.list_id, lambda: self.segments.decide_list(env.tenant_id, command),
            lambda event: self.segments.apply_list(env.tenant_id, event),  # type: ignore[arg-type]
            {"list": command.list_id})

    def _handle_definition(self, env: Envelope, subject_id: str,
                           decide: Callable[[], Sequence[Record]],
                           record: Callable[[Record], None], fields: dict[str, str]) -> None:
        """Produce what a segment or list command decides onto segments.events (each event
        `record`ed for the transaction's later decisions), or its CommandRejected onto
        campaign.events."""
        bound = log.bind(tenant=env.tenant_id, correlation_id=str(env.correlation_id), **fields)
        try:
            events = decide()
        except (SegmentRejected, ListRejected) as exc:
            reason = str(exc)
            self._decided.append(lambda: bound.info("command rejected", command=env.type,
                                                    reason=reason))
            self._reject(env, reason)
            return
        for event in events:
            out = wrap_caused_by(event, env, aggregate_id=subject_id)
            self.producer.produce(self.segments_topic, key=subject_id.encode(), value=encode(out))
            metrics.count_produced(self.segments_topic)
            record(event)
        names = [type(e).__name__ for e in events]
        self._decided.append(lambda: bound.info("command accepted", command=env.type, events=names))

    def _emit(self, cause: Envelope, event: Record) -> Envelope:
        out = wrap_caused_by(event, cause)
        self.producer.produce(self.events_topic, key=cause.aggregate_id.encode(), value=encode(out))
        metrics.count_produced(self.events_topic)
        return out

    def _reject(self, cause: Envelope, reason: str) -> None:
        self._emit(cause, CommandRejected(command_id=cause.id, command_type=cause.type, reason=reason))

    def _dead_letter(self, msg: Message, reason: str) -> None:
        """Park an unreadable record with its reason and answer it with CommandRejected."""
        partition, offset = msg.partition(), msg.offset()
        self._decided.append(lambda: log.warning("command dead-lettered", partition=partition,
                                                 offset=offset, reason=reason))
        headers: list[tuple[str, str | bytes | None]] = [
            ("reason", reason.encode()),
            ("source.offset", str(msg.offset()).encode()),
        ]
        self.producer.produce(self.dlq_topic, key=msg.key(), value=msg.value(), headers=headers)
        metrics.count_produced(self.dlq_topic)
        tenant, aggregate, command_id, command_type = _salvage(msg)
        rejected = wrap(
            CommandRejected(command_id=command_id, command_type=command_type, reason=reason),
            tenant_id=tenant,
            aggregate_id=aggregate,
        )
        self.producer.produce(self.events_topic, key=aggregate.encode(), value=encode(rejected))
        metrics.count_produced(self.events_topic)

    # --- loop -----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Consume until `stop` is set; each batch is one transaction."""
        self.stop = self.txn.stop = self.segments.stop = stop
        heartbeat = self.settings.heartbeat()
        try:
            # Fences a predecessor with this transactional id and aborts its open transaction.
            self.txn.init()
            self._subscribe()
            log.info("command handler started", topic=self.commands_topic,
                     transactional_id=self.txn.transactional_id)
            self._next_tick = time.monotonic()
            while not stop.is_set():
                heartbeat.beat()
                try:
                    self._step()
                except KafkaException as exc:
                    if (error := fatal_error(exc)) is None:
                        raise
                    self._renew_consumer(error)  # producer failures never get here
        except Stopping as exc:
            # Nothing unfinished is lost: offsets were not committed, so the next start
            # decides it again (a transaction left open is aborted by its init_transactions).
            log.warning("stopping while the broker did not answer", waiting_for=str(exc))
        finally:
            close_within(self.consumer.close, "command consumer")
            unregister(self._group_member)
            self.txn.close()
            self.segments.close()
            log.info("command handler stopped")

    def _step(self) -> None:
        """One batch (one transaction), then the clock when it is due."""
        batch = self.consumer.consume(BATCH_SIZE, POLL_SECONDS)
        records = [m for m in batch if not m.error()]
        for m in batch:
            error = m.error()
            if error is not None:
                if is_fatal(error):
                    raise KafkaException(error)
                log.warning("consumer error", error=str(error))
        if records:
            self._transact(records)
        if time.monotonic() >= self._next_tick:
            self._next_tick = time.monotonic() + SCHEDULE_TICK_SECONDS
            self._fire_due_schedules(datetime.now(UTC))

    def _fire_due_schedules(self, now: datetime) -> None:
        """Offer the clock to the scheduled campaigns of the assigned partitions: what fires
        (CampaignSendRequested, or CampaignScheduleMissed when found too late) commits in one
        transaction, fenced like a command batch (with the partitions' consumer positions), so
        an instance that lost the partition cannot fire it too."""
        due = [
            (partition, campaign_id)
            for partition, state in self.partitions.items()
            for campaign_id, campaign in state.campaigns.items()
            if campaign.status is Status.SCHEDULED and campaign.schedule is not None
            and not campaign.schedule.missed and campaign.schedule.send_at <= now
        ]
        if not due:
            return
        touched = sorted({p for p, _ in due})
        try:
            snapshot = self._contacts_snapshot()
        except KafkaException as exc:
            log.warning("contacts snapshot failed; schedules fire at a later tick", error=str(exc))
            return
        self._decided = []
        try:
            self.txn.begin()
            for partition, campaign_id in due:
                self._fire(self.partitions[partition], campaign_id, now, snapshot)
            positions = self.consumer.position(
                [TopicPartition(self.commands_topic, p) for p in touched])
            fenced = [tp for tp in positions if tp.offset >= 0]
            self.txn.commit(fenced, self.consumer.consumer_group_metadata())
        except (TransactionFailed, KafkaException) as exc:
            if not isinstance(exc, TransactionFailed):
                self.txn.abort()
            log.warning("schedule transaction not committed; rebuilding", error=str(exc))
            self._rebuild(touched)
            return
        for entry in self._decided:
            entry()

    def _fire(self, state: PartitionState, campaign_id: str, now: datetime,
              snapshot: dict[int, int]) -> None:
        current = state.campaigns[campaign_id]
        cause = state.schedules.get(campaign_id)
        if cause is None:
            return  # cannot happen: a scheduled campaign was scheduled by an event we read
        tick = ScheduleDue(now)
        send = send_order(current, tick)
        try:
            segments = self._named_segments(current.tenant_id, send) if send else {}
        except Rejected:
            segments = {}  # a segment is gone: decide reports the schedule missed, and why
        events = decide(current, tick, campaign_id=campaign_id, tenant_id=current.tenant_id,
                        contacts_snapshot=snapshot, segments=segments,
                        deleted_lists=self.segments.deleted_lists(current.tenant_id))
        for event in events:
            self._emit(cause, event)
            after = evolve(current, event, campaign_id=campaign_id, tenant_id=current.tenant_id)
            current = after or current
        state.campaigns[campaign_id] = current
        tenant, names = current.tenant_id, [type(e).__name__ for e in events]
        self._decided.append(lambda: log.info("schedule due", campaign=campaign_id, tenant=tenant,
                                              events=names))

    def _transact(self, records: list[Message]) -> None:
        """One batch in one transaction; when it cannot commit, the batch is redone from the
        committed offsets (its decisions are forgotten and rebuilt from the log)."""
        self._decided = []
        try:
            self.txn.begin()
            try:
                for msg in _segment_commands_first(records):
                    self.handle(msg)
            except KafkaException as exc:  # a look-up inside the batch failed (broker away)
                log.warning("batch failed; aborting it", error=str(exc), commands=len(records))
                self.txn.abort()
                raise TransactionFailed(str(exc)) from exc
            self.txn.commit(_next_offsets(records), self.consumer.consumer_group_metadata())
        except TransactionFailed as exc:
            log.warning("transaction not committed; redoing its commands from the committed "
                        "offsets", error=str(exc), commands=len(records))
            self._rewind(records)
            return
        finally:
            self.segments.end_transaction()
        for entry in self._decided:
            entry()

    def _rewind(self, records: list[Message]) -> None:
        """After a transaction that did not commit: forget its in-memory effects and re-read
        from the committed offsets (retried until it succeeds or a stop is requested)."""
        self._rebuild(sorted({m.partition() or 0 for m in records}), seek=True)

    def _rebuild(self, touched: list[int], *, seek: bool = False) -> None:
        """Replay the aggregates of the `touched` partitions still assigned (and with `seek`,
        move the consumer back to their committed offsets)."""
        def attempt() -> None:
            assigned = {tp.partition for tp in self.consumer.assignment()
                        if tp.topic == self.commands_topic}
            wanted = [TopicPartition(self.commands_topic, p) for p in touched if p in assigned]
            if not wanted:
                return  # moved to another member: its assignment replays them
            committed = self.consumer.committed(wanted, timeout=LOOKUP_TIMEOUT_SECONDS)
            for tp in committed:
                if tp.error is not None:
                    raise KafkaException(tp.error)
            self.partitions.update(self._replay([tp.partition for tp in committed]))
            for tp in committed:
                if seek:
                    offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
                    self.consumer.seek(TopicPartition(tp.topic, tp.partition, offset))

        retry_until_stopped(self.stop, "rewind to the committed offsets", attempt, logger=log)


def _segment_commands_first(records: list[Message]) -> list[Message]:
    """The batch with segment commands moved ahead (each partition keeps its order): a
    segment defined and a send naming it that arrive in one batch from two partitions are
    decided in the order their caller meant. (A send that still comes first is rejected
    with "unknown segment", never sent to a wrong audience.)"""
    # A cheap look at the raw record (ordering only; handle() decodes and validates it).
    def is_segment_command(msg: Message) -> bool:
        return SEGMENT_COMMAND_TYPE.search(msg.value() or b"") is not None

    first = [m for m in records if is_segment_command(m)]
    return first + [m for m in records if not is_segment_command(m)] if first else records


def _next_offsets(records: list[Message]) -> list[TopicPartition]:
    last: dict[tuple[str, int], int] = {}
    for m in records:
        where = (m.topic() or "", m.partition() or 0)
        last[where] = max(last.get(where, -1), m.offset() or 0)
    return [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]


def _salvage(msg: Message) -> tuple[str, str, uuid.UUID | None, str | None]:
    """Best-effort tenant, aggregate, command id and type of a record that failed validation."""
    import json

    from pydantic import TypeAdapter, ValidationError

    from schemas.base import EntityId, TenantId

    tenant, aggregate, command_id, command_type = UNKNOWN, UNKNOWN, None, None
    key = (msg.key() or b"").decode(errors="replace")
    try:
        aggregate = TypeAdapter(EntityId).validate_python(key)
    except ValidationError:
        pass
    try:
        data = json.loads(msg.value() or b"")
    except ValueError:
        return tenant, aggregate, command_id, command_type
    if not isinstance(data, dict):
        return tenant, aggregate, command_id, command_type
    for name, adapter in (("tenant_id", TypeAdapter(TenantId)), ("aggregate_id", TypeAdapter(EntityId))):
        try:
            value = adapter.validate_python(data.get(name))
        except ValidationError:
            continue
        if name == "tenant_id":
            tenant = value
        else:
            aggregate = value
    try:
        command_id = uuid.UUID(str(data.get("id")))
    except ValueError:
        pass
    if isinstance(data.get("type"), str):
        command_type = data["type"][:100]
    return tenant, aggregate, command_id, command_type
