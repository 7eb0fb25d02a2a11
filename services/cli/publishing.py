"""Publishing from the CLI: campaign commands onto campaign.commands, acknowledged or an error.

Guarantee: `publish_command` returns only once the broker acknowledged the command (acks=all,
idempotent producer); otherwise it raises `CommandNotAcknowledged`. An unacknowledged command
may still have reached the broker, so retrying with the same command id is the safe retry: the
command handler ignores a command id it has seen.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from schemas.base import Record
from schemas.envelope import encode, wrap
from services.common.kafka import make_producer
from services.common.settings import Settings
from services.common.topics import COMMANDS, topic_name

# How long a command may wait for its acknowledgement: covers a broker restart or leader
# election, yet a user at a terminal is not left waiting on a broker that is gone.
ACK_TIMEOUT_SECONDS = 30.0
# How long the metadata check waits for the broker before calling it unreachable.
METADATA_TIMEOUT_SECONDS = 10.0

# librdkafka reports connection trouble through this logger. The CLI turns those conditions
# into one clear error of its own, so the driver's log lines would only be noise on the terminal.
kafka_log = logging.getLogger("campaignctl.kafka")
kafka_log.addHandler(logging.NullHandler())
kafka_log.propagate = False


class PublishError(Exception):
    """Kafka could not take what the CLI publishes; the message says why."""


class TopicUnavailable(PublishError):
    """The broker is unreachable, or the topic does not exist (topics are never auto-created)."""


class CommandNotAcknowledged(PublishError):
    """The broker did not acknowledge a command in time; it may or may not have arrived."""


def cli_producer(settings: Settings, **overrides: Any) -> Producer:
    """An idempotent producer whose driver logs go to the quiet `campaignctl.kafka` logger."""
    return make_producer(settings, logger=kafka_log, **overrides)


def require_topic(producer: Producer, topic: str, settings: Settings) -> None:
    """Fail fast with a clear message when the broker is down or the topic is missing.

    Without this check a produce to an unreachable broker only fails after the delivery
    timeout, and the broker (auto-create disabled) would reject a missing topic row by row.
    """
    try:
        metadata = producer.list_topics(timeout=METADATA_TIMEOUT_SECONDS)
    except KafkaException as exc:
        reason = exc.args[0].str() if isinstance(exc.args[0], KafkaError) else str(exc)
        where = settings.kafka_bootstrap_servers
        raise TopicUnavailable(f"Kafka at {where} did not answer: {reason}") from None
    if topic not in metadata.topics:
        raise TopicUnavailable(
            f"topic {topic!r} does not exist on {settings.kafka_bootstrap_servers}"
            " (start the platform with `make up`, or check TOPIC_PREFIX)"
        )


def publish_command(
    settings: Settings,
    payload: Record,
    *,
    tenant_id: str,
    campaign_id: str,
    command_id: uuid.UUID | None = None,
) -> uuid.UUID:
    """Publish one command keyed by campaign id and wait for its acknowledgement.

    Returns the command id (the envelope id). Raises pydantic's ValidationError for a bad
    tenant or campaign id before anything is sent, `TopicUnavailable` when Kafka cannot be
    reached, and `CommandNotAcknowledged` when no acknowledgement came within
    ACK_TIMEOUT_SECONDS.
    """
    envelope = wrap(payload, tenant_id=tenant_id, aggregate_id=campaign_id, message_id=command_id)
    topic = topic_name(COMMANDS, settings)
    producer = cli_producer(settings)
    require_topic(producer, topic, settings)
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err)

    producer.produce(topic, key=campaign_id.encode(), value=encode(envelope), on_delivery=on_delivery)
    remaining = producer.flush(ACK_TIMEOUT_SECONDS)
    if remaining:
        # Withdraw what is still queued, so a command we report as failed is not sent later.
        producer.purge()
        producer.flush(0)
        raise CommandNotAcknowledged(
            f"{envelope.type} {envelope.id} was not acknowledged within {ACK_TIMEOUT_SECONDS:.0f} s"
            f" by {settings.kafka_bootstrap_servers}; it may or may not have arrived"
        )
    if errors:
        raise CommandNotAcknowledged(f"{envelope.type} {envelope.id} was refused: {errors[0].str()}")
    return envelope.id
