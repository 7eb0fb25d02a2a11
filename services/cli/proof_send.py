"""`campaignctl campaign test-send`: publish SendTestEmail and follow its outcome on Kafka.

The outcome of a test send is on campaign.events (CommandRejected, or TestEmailRequested and
then one TestEmailSent / TestEmailFailed per address; see services/sender/proof_mail.py), not
in a read model, so the CLI reads it there: it notes the end of every campaign.events
partition before publishing, so nothing the command causes can be missed, then reads on from
there until every address has an outcome, the command was rejected, or the timeout passed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from schemas.commands import SendTestEmail
from schemas.envelope import SchemaViolation, decode
from schemas.events import CommandRejected, TestEmailFailed, TestEmailRequested, TestEmailSent
from services.cli.publishing import METADATA_TIMEOUT_SECONDS, TopicUnavailable, publish_command
from services.common.settings import Settings
from services.common.topics import EVENTS, topic_name

# How long the CLI waits for every address's outcome by default: the command handler and a
# sender each take well under a second; a relay timing out takes its SMTP timeout (10 s).
DEFAULT_TIMEOUT_SECONDS = 60.0
POLL_SECONDS = 0.3
# Pause between end-offset queries a broker answered with a retriable error (no leader yet).
LEADER_RETRY_SECONDS = 0.2
_LEADER_MOVING = (KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                  KafkaError.UNKNOWN_TOPIC_OR_PART)


class TestSendRejected(Exception):
    """The command handler refused the test send; the message is its reason."""

    __test__ = False


@dataclass
class TestSendReport:
    """What became of a test send, address by address."""

    __test__ = False

    command_id: uuid.UUID
    test_id: uuid.UUID
    addresses: list[str]
    outcomes: dict[str, TestEmailSent | TestEmailFailed] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return all(address in self.outcomes for address in self.addresses)

    @property
    def all_sent(self) -> bool:
        return self.complete and all(isinstance(o, TestEmailSent) for o in self.outcomes.values())


def send_test_email(
    settings: Settings,
    command: SendTestEmail,
    *,
    tenant_id: str,
    campaign_id: str,
    wait: bool = True,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    on_outcome: Callable[[TestEmailSent | TestEmailFailed], None] | None = None,
) -> TestSendReport:
    """Publish the test send and, with `wait`, follow it until every address has an outcome
    or `timeout` passed (the report then lacks some). Raises TestSendRejected with the
    handler's reason, PublishError when Kafka cannot take the command."""
    topic = topic_name(EVENTS, settings)
    reader = _reader_at_end(settings, topic) if wait else None
    try:
        command_id = publish_command(settings, command, tenant_id=tenant_id,
                                     campaign_id=campaign_id)
        report = TestSendReport(command_id, command.test_id, list(command.addresses))
        if reader is not None:
            _follow(reader, report, campaign_id, timeout, on_outcome)
        return report
    finally:
        if reader is not None:
            reader.close()


def _reader_at_end(settings: Settings, topic: str) -> Consumer:
    consumer = Consumer({
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "group.id": f"campaignctl-test-send-{uuid.uuid4()}",  # never joins or commits
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
    })
    try:
        metadata = consumer.list_topics(topic, timeout=METADATA_TIMEOUT_SECONDS)
        partitions = metadata.topics[topic].partitions
        if metadata.topics[topic].error is not None or not partitions:
            raise TopicUnavailable(f"topic {topic!r} does not exist on "
                                   f"{settings.kafka_bootstrap_servers}")
        starts = [TopicPartition(topic, partition, _end_offset(consumer, topic, partition))
                  for partition in sorted(partitions)]
        consumer.assign(starts)
    except KafkaException as exc:
        consumer.close()
        raise TopicUnavailable(f"Kafka at {settings.kafka_bootstrap_servers} did not answer: "
                               f"{exc}") from None
    except BaseException:
        consumer.close()
        raise
    return consumer


def _end_offset(consumer: Consumer, topic: str, partition: int) -> int:
    """The partition's end offset, asking again while the broker gives a retriable answer
    (a leader being elected, e.g. just after the topic was created) for up to
    METADATA_TIMEOUT_SECONDS."""
    deadline = time.monotonic() + METADATA_TIMEOUT_SECONDS
    while True:
        try:
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition),
                                                     timeout=METADATA_TIMEOUT_SECONDS, cached=False)
            return int(high)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            retriable = isinstance(error, KafkaError) and (
                error.retriable() or error.code() in _LEADER_MOVING)
            if not retriable or time.monotonic() > deadline:
                raise
            time.sleep(LEADER_RETRY_SECONDS)


def _follow(reader: Consumer, report: TestSendReport, campaign_id: str, timeout: float,
            on_outcome: Callable[[TestEmailSent | TestEmailFailed], None] | None) -> None:
    deadline = time.monotonic() + timeout
    while not report.complete and time.monotonic() < deadline:
        for record in reader.consume(100, POLL_SECONDS):
            error = record.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF and error.fatal():
                    raise KafkaException(error)
                continue
            try:
                message = decode(record.value())
            except SchemaViolation:
                continue  # not ours: campaign.events has other writers
            envelope, payload = message.envelope, message.payload
            if envelope.aggregate_id != campaign_id:
                continue
            if isinstance(payload, CommandRejected) and payload.command_id == report.command_id:
                raise TestSendRejected(payload.reason)
            if isinstance(payload, TestEmailRequested) and envelope.causation_id == report.command_id:
                # Addresses as the handler normalised them (the domain lower-cased).
                report.addresses = list(payload.addresses)
            if (isinstance(payload, TestEmailSent | TestEmailFailed)
                    and payload.test_id == report.test_id and payload.email not in report.outcomes):
                report.outcomes[payload.email] = payload
                if on_outcome is not None:
                    on_outcome(payload)
