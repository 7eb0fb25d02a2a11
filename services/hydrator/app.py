"""Hydration stream processor (faust-streaming): scatter a send request to every contacts
partition, resolve the audience where the contacts live, gather the counts.

Guarantee: at-least-once (faust's exactly-once mode stalled on this stack; see
HYDRATOR_PROCESSING_GUARANTEE): in normal operation each contact of a campaign's audience is
on campaign.recipients once, as RecipientQueued or as RecipientExcluded with the reason
(unsubscribed, suppressed:<reason>, deleted); after a crash a partition's fan-out may be
repeated, which the sender's ledger and the projector absorb. CampaignHydrated(total,
excluded) is emitted once every partition has reported. Dedup by normalised e-mail is
structural: a contact id is derived from tenant + normalised e-mail, and each contact lives in
one partition.

Flow:
  contacts.events  --apply_contacts-->  contacts table (+ position per partition)
  campaign.events  --scatter-->  campaign.hydration.requests (one copy per partition)
  hydration.requests --hydrate_partition--> campaign.recipients + hydration.reports
  hydration.reports  --gather_reports-->  campaign.events (CampaignHydrated)
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import faust

from schemas.base import Record
from schemas.contacts import (
    ContactAttributesChanged,
    ContactDeleted,
    ContactListMembershipAdded,
    ContactListMembershipRemoved,
    ContactSuppressed,
    ContactUnsubscribed,
    ContactUpserted,
)
from schemas.envelope import SchemaViolation, decode, encode, wrap_caused_by
from schemas.events import (
    CampaignHydrated,
    CampaignSendRequested,
    HydrationPartitionReported,
    HydrationRequested,
    RecipientExcluded,
    RecipientQueued,
)
from services.common.logs import configure_logging
from services.common.settings import Settings
from services.common.topics import (
    CONTACTS,
    EVENTS,
    HYDRATION_REPORTS,
    HYDRATION_REQUESTS,
    RECIPIENTS,
    TopicSpec,
    ensure_topics,
    topic_name,
)
from services.hydrator.audience import apply_to_stored, gather, resolve_audience, sum_exclusions

log = configure_logging("hydrator")

# A SIGKILLed worker's partitions move to a live one after this long.
SESSION_TIMEOUT_SECONDS = 10.0
# How often a partition's hydration re-checks whether its contacts caught up to the snapshot.
CATCH_UP_POLL_SECONDS = 0.05


APP_NAME = "hydrator"
CONTACT_EVENTS = (
    ContactUpserted, ContactAttributesChanged, ContactListMembershipAdded,
    ContactListMembershipRemoved, ContactUnsubscribed, ContactSuppressed, ContactDeleted,
)
# faust's table changelogs: (table name, partitions). Created before the worker starts, because
# a worker that creates them itself can read stale metadata and crash its agents with
# PartitionsMismatch on a fresh broker.
TABLES = (
    ("contacts", CONTACTS.partitions),
    ("contact-positions", CONTACTS.partitions),
    ("hydration-progress", HYDRATION_REPORTS.partitions),
)


def changelog_topics(settings: Settings) -> tuple[TopicSpec, ...]:
    """The changelog topics faust names `<app id>-<table>-changelog`, compacted."""
    app_id = settings.group(APP_NAME)
    # topic_name() adds the prefix again, so name them relative to it.
    base = app_id[len(settings.topic_prefix):]
    return tuple(
        TopicSpec(f"{base}-{table}-changelog", "table key", partitions, {"cleanup.policy": "compact"})
        for table, partitions in TABLES
    )


def create_app(settings: Settings) -> faust.App:
    ensure_topics(settings, specs=changelog_topics(settings))
    datadir = settings.state_dir / "hydrator" / (settings.topic_prefix or "default")
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.group(APP_NAME),
        broker=f"kafka://{settings.kafka_bootstrap_servers}",
        store="memory://",
        processing_guarantee=os.environ.get("HYDRATOR_PROCESSING_GUARANTEE", "at_least_once"),
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

    contacts_topic = raw_topic(CONTACTS)
    events_topic = raw_topic(EVENTS)
    requests_topic = raw_topic(HYDRATION_REQUESTS)
    reports_topic = raw_topic(HYDRATION_REPORTS)
    recipients_topic = raw_topic(RECIPIENTS)

    contacts = app.Table("contacts", partitions=CONTACTS.partitions, key_type=str)
    # Last contacts.events offset applied per partition: hydration waits until its snapshot.
    positions = app.Table("contact-positions", partitions=CONTACTS.partitions, key_type=str)
    progress = app.Table("hydration-progress", partitions=HYDRATION_REPORTS.partitions, key_type=str)

    @app.agent(contacts_topic)
    async def apply_contacts(stream: faust.StreamT) -> None:
        async for event in stream.events():
            partition, offset = event.message.partition, event.message.offset
            try:
                message = decode(event.value)
            except SchemaViolation as exc:
                log.warning("contact record skipped", partition=partition, offset=offset, reason=str(exc))
            else:
                if isinstance(message.payload, CONTACT_EVENTS):
                    key = event.key.decode()
                    stored = apply_to_stored(contacts.get(key), message.payload, offset=offset,
                                             partition=partition)
                    if stored is not None:
                        contacts[key] = stored
            positions[str(partition)] = offset

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
                )
                out = wrap_caused_by(request, env)
                await requests_topic.send(key=env.aggregate_id.encode(), value=encode(out),
                                          partition=partition)
            log.info("hydration scattered", tenant=env.tenant_id, campaign=env.aggregate_id,
                     correlation_id=str(env.correlation_id), partitions=CONTACTS.partitions)

    @app.agent(requests_topic)
    async def hydrate_partition(stream: faust.StreamT) -> None:
        async for raw in stream:
            message = decode(raw)
            env, request = message.envelope, message.payload
            assert isinstance(request, HydrationRequested)
            # The contacts of this partition must be applied up to the snapshot first.
            waited = 0.0
            while positions.get(str(request.partition), -1) < request.snapshot_offset - 1:
                await asyncio.sleep(CATCH_UP_POLL_SECONDS)
                waited += CATCH_UP_POLL_SECONDS
                if waited % 5.0 < CATCH_UP_POLL_SECONDS:
                    log.warning("hydration waiting for contacts", campaign=request.campaign_id,
                                partition=request.partition, snapshot_offset=request.snapshot_offset,
                                applied=positions.get(str(request.partition), -1))
            queued = 0
            excluded: dict[str, int] = {}
            resolved = list(resolve_audience(
                contacts.items(), tenant_id=env.tenant_id, partition=request.partition,
                audience=request.audience, snapshot_offset=request.snapshot_offset,
            ))
            for key, contact, reason in resolved:
                fact: Record
                if reason is None:
                    fact = RecipientQueued(
                        campaign_id=request.campaign_id,
                        contact_id=contact["id"],
                        email=contact["email"],
                        first_name=contact["first_name"],
                        last_name=contact["last_name"],
                        attributes=contact["attributes"],
                        template=request.template,
                    )
                    queued += 1
                else:
                    fact = RecipientExcluded(campaign_id=request.campaign_id, contact_id=contact["id"],
                                             email=contact["email"], reason=reason)
                    excluded[reason] = excluded.get(reason, 0) + 1
                out = wrap_caused_by(fact, env, aggregate_id=request.campaign_id)
                await recipients_topic.send(key=key.encode(), value=encode(out))
            report = HydrationPartitionReported(
                campaign_id=request.campaign_id, partition=request.partition,
                partitions=request.partitions, queued=queued, excluded=excluded,
            )
            out = wrap_caused_by(report, env, aggregate_id=request.campaign_id)
            await reports_topic.send(key=request.campaign_id.encode(), value=encode(out))

    @app.agent(reports_topic)
    async def gather_reports(stream: faust.StreamT) -> None:
        async for raw in stream:
            message = decode(raw)
            env, report = message.envelope, message.payload
            assert isinstance(report, HydrationPartitionReported)
            state = progress.get(report.campaign_id) or {"reported": {}, "excluded": {}, "done": False}
            if state["done"]:
                continue
            reported = {**state["reported"], str(report.partition): report.queued}
            excluded = {**state.get("excluded", {}), str(report.partition): report.excluded}
            total = gather(reported, report.partitions)
            progress[report.campaign_id] = {"reported": reported, "excluded": excluded,
                                            "done": total is not None}
            if total is None:
                continue
            hydrated = CampaignHydrated(total=total, excluded=sum_exclusions(excluded.values()))
            out = wrap_caused_by(hydrated, env, aggregate_id=report.campaign_id)
            await events_topic.send(key=report.campaign_id.encode(), value=encode(out))
            log.info("campaign hydrated", tenant=env.tenant_id, campaign=report.campaign_id,
                     correlation_id=str(env.correlation_id), total=total, excluded=hydrated.excluded)

    return app
