"""The topic catalogue: every topic's name, key, partition count and config in one place.

Services, the platform bootstrap and the tests all create and address topics through this
module, so a topic cannot drift between producers and consumers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from confluent_kafka.admin import AdminClient, NewTopic

from services.common.kafka import make_admin, serve_logs
from services.common.settings import Settings


@dataclass(frozen=True)
class TopicSpec:
    """A topic as the system expects it to exist."""

    name: str
    key: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


INFINITE = {"retention.ms": "-1", "retention.bytes": "-1"}

# Recipient fan-out and contacts are spread over many partitions: sender and hydrator
# parallelism is bounded by these counts.
RECIPIENT_PARTITIONS = 12
CONTACT_PARTITIONS = 12
# Retries and held recipients are a small share of the traffic: fewer partitions, still
# enough for a sender group of six.
RETRY_PARTITIONS = 6

COMMANDS = TopicSpec("campaign.commands", "campaign id", 6)
COMMANDS_DLQ = TopicSpec("campaign.commands.dlq", "campaign id", 1, INFINITE)
EVENTS = TopicSpec("campaign.events", "campaign id", 6, INFINITE)
CONTACTS = TopicSpec("contacts.events", "tenant + contact", CONTACT_PARTITIONS, INFINITE)
HYDRATION_REQUESTS = TopicSpec(
    "campaign.hydration.requests", "campaign id (one copy per contacts partition)",
    CONTACT_PARTITIONS, INFINITE,
)
HYDRATION_REPORTS = TopicSpec("campaign.hydration.reports", "campaign id", 6, INFINITE)
RECIPIENTS = TopicSpec("campaign.recipients", "tenant + contact", RECIPIENT_PARTITIONS, INFINITE)
DELIVERIES = TopicSpec("campaign.deliveries", "campaign id", 6, INFINITE)
# Delay topics of transient SMTP failures (RecipientRetryScheduled): tier n holds attempt n+1
# (the last tier every later attempt), so the delays within one tier are alike and a
# partition's head is about the first record due. A week of retention outlives any retry
# window; consumed records are committed, so nothing depends on the log beyond that.
RETRY_TIERS: tuple[TopicSpec, ...] = tuple(
    TopicSpec(f"campaign.recipients.retry.{tier}", "tenant + contact", RETRY_PARTITIONS,
              {"retention.ms": str(7 * 24 * 3600 * 1000)})
    for tier in range(1, 4)
)
# Recipients of paused campaigns, parked as they were (RecipientQueued or
# RecipientRetryScheduled) until the campaign resumes or is cancelled: held durably, without
# blocking other campaigns' partitions. Infinite: a pause may last as long as people want.
HELD = TopicSpec("campaign.recipients.held", "tenant + contact", RETRY_PARTITIONS, INFINITE)
# Records of the recipient topics that are not valid recipients, with the reason in a header.
RECIPIENTS_DLQ = TopicSpec("campaign.recipients.dlq", "as read", 1, INFINITE)

# Segment definitions of every tenant: small, read whole by every command handler instance
# (a send snapshots the criteria of the segments it names), so one partition.
SEGMENTS = TopicSpec("segments.events", "segment id", 1, INFINITE)
# Committed "partition fanned out" markers of the hydrator (see services/hydrator/fanout.py).
HYDRATION_FANOUTS = TopicSpec(
    "campaign.hydration.fanouts", "campaign id:contacts partition", CONTACT_PARTITIONS,
    {"cleanup.policy": "compact"},
)

# Opens and clicks (EmailOpened, LinkClicked) from the tracker: keyed by contact, so one
# recipient's hits keep their order; spread like the recipients they come from.
ENGAGEMENT = TopicSpec("campaign.engagement", "tenant + contact", RECIPIENT_PARTITIONS, INFINITE)

CATALOGUE: tuple[TopicSpec, ...] = (
    COMMANDS, COMMANDS_DLQ, EVENTS, CONTACTS, HYDRATION_REQUESTS, HYDRATION_REPORTS,
    RECIPIENTS, DELIVERIES, *RETRY_TIERS, HELD, RECIPIENTS_DLQ, SEGMENTS, HYDRATION_FANOUTS,
    ENGAGEMENT,
)


def topic_name(spec: TopicSpec, settings: Settings) -> str:
    """The physical name of a catalogue topic under the configured prefix."""
    return f"{settings.topic_prefix}{spec.name}"


def ensure_topics(
    settings: Settings, timeout: float = 30.0, specs: tuple[TopicSpec, ...] = CATALOGUE
) -> list[str]:
    """Create every topic of `specs` (default: the catalogue) that is missing; returns the
    names it created, once the broker's metadata shows them. Replicas: the cluster's
    default.replication.factor (and its min.insync.replicas), unless the settings name one."""
    admin = make_admin(settings.kafka_bootstrap_servers)
    existing = set(admin.list_topics(timeout=timeout).topics)
    wanted = [
        NewTopic(topic_name(spec, settings), spec.partitions, settings.topic_replication_factor,
                 config=dict(spec.config))
        for spec in specs
        if topic_name(spec, settings) not in existing
    ]
    serve_logs(admin)
    if not wanted:
        return []
    created = []
    for name, future in admin.create_topics(wanted, operation_timeout=timeout).items():
        try:
            future.result(timeout=timeout)
            created.append(name)
        except Exception as exc:  # an existing topic is fine: another process raced us
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    _wait_visible(admin, [t.topic for t in wanted], timeout)
    serve_logs(admin)
    return created


def _wait_visible(admin: AdminClient, names: list[str], timeout: float) -> None:
    """Block until the broker's metadata lists every new topic with its leaders: a client
    that asks earlier gets UNKNOWN_TOPIC_OR_PART."""
    deadline = time.monotonic() + timeout
    while True:
        topics = admin.list_topics(timeout=timeout).topics
        missing = [
            n for n in names
            if n not in topics or topics[n].error is not None
            or any(p.leader < 0 for p in topics[n].partitions.values())
        ]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics not visible after {timeout}s: {missing}")
        time.sleep(0.1)
