"""Hydration stream processor (faust-streaming): scatter a send request to every contacts
partition, resolve the audience where the contacts live, gather the counts.

Guarantee: each contact of a campaign's audience is on campaign.recipients exactly once for
read_committed readers, as RecipientQueued or as RecipientExcluded with the reason
(unsubscribed, suppressed:<reason>, deleted), also after a SIGKILL, a restart or a rebalance
mid fan-out: each (campaign, partition) is written in one Kafka transaction with a fenced,
per-partition transactional id and a committed marker checked before writing (fanout.py).
CampaignHydrated(total, excluded, unknown contact ids) is emitted exactly once, when every
partition has reported (gather.py); each partition reports the hand-picked ids whose record
key (tenant + id) it holds and that name no contact of the tenant before the snapshot, so an
id is reported unknown by exactly one partition, the same whether another tenant has it or
not. faust itself runs at-least-once (its exactly-once mode stalled on this stack); what it
may repeat — a scatter, a request — is absorbed by those two checks. Dedup by
normalised e-mail is structural: a contact id is derived from tenant + normalised e-mail,
and each contact lives in one partition.

Where the contacts live: each instance keeps a local RocksDB replica of every contacts.events
partition whose hydration requests it holds (replica.py; faust assigns the requests topic, and
the replicas follow that assignment), caught up in the background and, before a fan-out, up
to the send's snapshot. contacts.events is their changelog, so faust keeps no tables: a
restarted instance resumes its replicas where they stopped, a new one builds them from the log.

Flow:
  contacts.events  --replicas (confluent-kafka, background + on demand)-->  local RocksDB
  campaign.events  --scatter (faust agent)-->  campaign.hydration.requests (one per partition)
  hydration.requests --hydrate_partition (faust agent)--> campaign.recipients + reports (+ marker)
  hydration.reports  --gather (confluent-kafka, transactional)-->  campaign.events
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import faust
from confluent_kafka import KafkaException

from schemas.envelope import Envelope, SchemaViolation, decode, encode, wrap_caused_by
from schemas.events import CampaignSendRequested, HydrationRequested
from services.common.logs import configure_logging
from services.common.membership import register
from services.common.settings import HydratorSettings
from services.common.topics import CONTACTS, EVENTS, HYDRATION_REQUESTS, topic_name
from services.hydrator.audience import resolve_audience, unknown_picks
from services.hydrator.fanout import FanoutAborted, PartitionFanout
from services.hydrator.replica import CatchUpStalled, Replicas

log = configure_logging("hydrator")

APP_NAME = "hydrator"
# A SIGKILLed worker's partitions move to a live one after this long.
SESSION_TIMEOUT_SECONDS = 10.0
# How often the replicas of held partitions are caught up with contacts.events.
REPLICA_REFRESH_SECONDS = 0.5
# Partitions fanned out at once by one instance (see hydrate_partition).
FANOUT_CONCURRENCY = 2
# A fan-out that could not commit is retried after this long (unless the partition moved).
FANOUT_RETRY_SECONDS = 1.0


@dataclass(frozen=True)
class Hydrator:
    """The faust app and `start_head_start`, which starts the replicas' head start (see
    `build`) in a thread and returns it."""

    app: faust.App
    start_head_start: Callable[[], threading.Thread]


def create_app(settings: HydratorSettings) -> faust.App:
    """The faust app of `build` (no head start)."""
    return build(settings).app


def build(settings: HydratorSettings) -> Hydrator:
    """The faust app; settings.hydrator_instance names this hydrator among those of its group
    (its replicas' folder and its gather producer's transactional id).

    Head start: faust's first assignment comes seconds after start (interpreter, app start,
    group join), and the background refresh follows that assignment. Until it comes, the
    head start catches up every partition's replica (what a lone instance will hold); once
    faust assigned, it starts no replica outside the assignment (one already being read
    finishes: a catch-up is bounded by where its partition ended), and none once the
    interpreter is shutting down. A replica is only a local fold of contacts.events: one
    caught up in vain costs disk and CPU, never correctness."""
    datadir = (settings.state_dir / "hydrator" / (settings.topic_prefix or "default")
               / settings.hydrator_instance)
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.group(APP_NAME),
        broker=f"kafka://{settings.kafka_bootstrap_servers}",
        store="memory://",  # no faust tables: see the module docstring
        processing_guarantee=settings.hydrator_processing_guarantee,
        web_enabled=False,
        datadir=str(datadir),
        topic_disable_leader=True,
        stream_wait_empty=False,
        # faust's default of 60 s would stall a campaign's hydration for a minute after a crash.
        broker_session_timeout=SESSION_TIMEOUT_SECONDS,
        broker_heartbeat_interval=SESSION_TIMEOUT_SECONDS / 3,
    )

    def raw_topic(spec: Any) -> faust.TopicT:
        return app.topic(
            topic_name(spec, settings), key_serializer="raw", value_serializer="raw",
            partitions=spec.partitions,
        )

    events_topic = raw_topic(EVENTS)
    requests_topic = raw_topic(HYDRATION_REQUESTS)
    replicas = Replicas(settings, topic_name(CONTACTS, settings), datadir / "replicas")
    # Closed at exit, after the refresh and fan-out threads were joined: a close flushes the
    # memtables (the replicas keep no write-ahead log), so a restart resumes where it stopped.
    atexit.register(replicas.close)
    fanout = PartitionFanout(settings, settings.group(APP_NAME))

    # /readyz: faust's own consumer (the agents') counts as joined once its group answered.
    agents = register(f"{settings.group(APP_NAME)} agents")

    # The requests partitions faust assigned last (None before its first assignment), as
    # the head start sees them: app.consumer is faust's, not to be touched from a thread.
    assigned: list[set[int] | None] = [None]

    def on_assigned(_sender: Any, *args: Any, signal: Any, **_: Any) -> None:
        agents.assigned(args[0])  # the whole new assignment (a set of TPs)
        name = requests_topic.get_topic_name()
        assigned[0] = {tp.partition for tp in args[0] if tp.topic == name}

    def on_revoked(_sender: Any, *_args: Any, signal: Any, **_: Any) -> None:
        agents.revoked()
        assigned[0] = set()

    def head_start_wanted(partition: int) -> bool:
        held_now = assigned[0]
        return threading.main_thread().is_alive() and (held_now is None or partition in held_now)

    def head_start() -> None:
        try:
            replicas.catch_up_all(set(range(CONTACTS.partitions)), wanted=head_start_wanted)
        except (CatchUpStalled, KafkaException) as exc:
            # Only a head start: the background refresh catches up the held ones anyway.
            log.warning("replica head start failed", reason=str(exc))

    def start_head_start() -> threading.Thread:
        # Not a daemon: the interpreter joins it before the atexit close of the replicas.
        thread = threading.Thread(target=head_start, name="replica-head-start")
        thread.start()
        return thread

    # mode's handler type is narrower than the keyword-tolerant functions above.
    app.on_partitions_assigned.connect(cast(Any, on_assigned))
    app.on_partitions_revoked.connect(cast(Any, on_revoked))

    def held() -> set[int]:
        """The requests partitions (= contacts partitions) faust assigned to this instance."""
        name = requests_topic.get_topic_name()
        return {tp.partition for tp in app.consumer.assignment() if tp.topic == name}

    @app.timer(REPLICA_REFRESH_SECONDS)
    async def refresh_replicas() -> None:
        partitions = held()
        if partitions:
            try:
                await asyncio.to_thread(replicas.catch_up_all, partitions)
            except (CatchUpStalled, KafkaException) as exc:
                # Only a head start for fan-outs (each catches up to its snapshot anyway):
                # the next round tries again.
                log.warning("replica refresh failed", reason=str(exc))

    @app.agent(events_topic)
    async def scatter(stream: faust.StreamT) -> None:
        async for raw in stream:
            try:
                message = decode(raw)
            except SchemaViolation:
                continue  # the command handler dead-letters bad input; events are trusted
            if not isinstance(message.payload, CampaignSendRequested):
                continue
            env, send = message.envelope, message.payload
            for partition in range(CONTACTS.partitions):
                request = HydrationRequested(
                    campaign_id=env.aggregate_id,
                    partition=partition,
                    partitions=CONTACTS.partitions,
                    snapshot_offset=send.contacts_snapshot.get(partition, 0),
                    template=send.template,
                    audience=send.audience,
                    requested_at=env.occurred_at,
                )
                out = wrap_caused_by(request, env)
                await requests_topic.send(key=env.aggregate_id.encode(), value=encode(out),
                                          partition=partition)
            log.info("hydration scattered", tenant=env.tenant_id, campaign=env.aggregate_id,
                     correlation_id=str(env.correlation_id), partitions=CONTACTS.partitions)

    # Two fan-outs at a time: one encodes while the other waits for its commit's acks.
    @app.agent(requests_topic, concurrency=FANOUT_CONCURRENCY)
    async def hydrate_partition(stream: faust.StreamT) -> None:
        async for raw in stream:
            message = decode(raw)
            env, request = message.envelope, message.payload
            assert isinstance(request, HydrationRequested)
            await fan_out(request, env)

    async def fan_out(request: HydrationRequested, env: Envelope) -> None:
        """Catch the partition's replica up to the snapshot, then write its share, in a
        worker thread (CPU-bound for large audiences; the event loop keeps heartbeating)."""
        def write() -> None:
            replica = replicas.get(request.partition)
            replica.catch_up(request.snapshot_offset)
            # Before the fan-out reads the partition: the picks that name nobody of the tenant.
            unknown = unknown_picks(
                request.audience.contact_ids, tenant_id=env.tenant_id, partition=request.partition,
                partitions=request.partitions, snapshot_offset=request.snapshot_offset,
                stored=replica.contact,
            )
            resolved = resolve_audience(
                replica.tenant_contacts(env.tenant_id),
                tenant_id=env.tenant_id, partition=request.partition,
                audience=request.audience, snapshot_offset=request.snapshot_offset,
                now=request.requested_at or env.occurred_at,
            )
            report = fanout.fan_out(request, env, resolved, unknown)
            if report is not None:
                log.info("partition fanned out", tenant=env.tenant_id, campaign=request.campaign_id,
                         partition=request.partition, queued=report.queued, excluded=report.excluded,
                         unknown_contacts=report.unknown_contact_count)

        while True:
            try:
                await asyncio.to_thread(write)
                return
            except (FanoutAborted, CatchUpStalled) as exc:
                if isinstance(exc, CatchUpStalled):
                    log.warning("replica catch-up stalled", campaign=request.campaign_id,
                                partition=request.partition, reason=str(exc))
                if request.partition not in held():
                    return  # its new owner redoes it (faust did not commit the request)
                await asyncio.sleep(FANOUT_RETRY_SECONDS)

    return Hydrator(app, start_head_start)
