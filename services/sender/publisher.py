"""The sender's output: delivery events, retry and throttle slots, parked and dead-lettered
records, suppressions, all through one idempotent producer.

Guarantees: `produce` never drops a record for a full local queue (it waits for room);
`flush` returns only when every record produced so far is acknowledged by the broker and
raises `PublishFailed` otherwise, so the caller commits offsets only after their outcomes are
durable. A broker outage is waited out: the producer never gives a record up for time
(`message.timeout.ms` 0, see clients.py) and `flush` waits in short steps until the broker
is back, or raises `Stopping` STOP_FLUSH_SECONDS after a stop request.
Copies (after a redelivery) carry the same outcome and Message-ID.
"""

from __future__ import annotations

import functools
import threading
import time
import uuid
from typing import Any

import structlog
from confluent_kafka import KafkaError, Message, Producer

from schemas.contacts import ContactSuppressed, contact_key
from schemas.envelope import Envelope, encode, wrap_caused_by
from schemas.events import RecipientRetryScheduled, RecipientSkipped
from services.common import metrics
from services.common.kafka import Stopping
from services.common.settings import Settings
from services.common.topics import (
    CONTACTS,
    DELIVERIES,
    HELD,
    RECIPIENTS_DLQ,
    RETRY_TIERS,
    topic_name,
)
from services.sender.delivery import Outcome, Status, delivery_event, delivery_event_id
from services.sender.retries import tier_index
from services.sender.sent_event import sent_record
from services.sender.work import SenderStats, Work

log = structlog.get_logger("sender")

# Guards against a broker that cannot take the delivery events: the batch is then not
# committed and the worker stops (a restart redelivers it; the ledger prevents re-mailing).
# (Only for the final flush when the worker stops after a failure: a running worker waits.)
FLUSH_TIMEOUT_SECONDS = 30.0
# One wait of a flush: how often a flush that waits for an absent broker looks at the stop flag.
FLUSH_STEP_SECONDS = 0.5
# After a stop request, a flush still waits this long for the broker, then gives up: the
# batch is not committed and is redelivered to the next sender (the ledger replays it).
STOP_FLUSH_SECONDS = 3.0
# A flush waiting for the broker says so this often.
FLUSH_WAIT_LOG_SECONDS = 10.0


class PublishFailed(RuntimeError):
    """Delivery events did not reach the broker; the batch must not be committed."""


class DeliveryPublisher:
    """Produces the sender's records; one per worker, used by the thread that drives it."""

    def __init__(self, producer: Producer, settings: Settings, stats: SenderStats,
                 stop: threading.Event | None = None) -> None:
        self._producer = producer
        self._stop = stop or threading.Event()
        self.stats = stats
        self.retry_topics = [topic_name(t, settings) for t in RETRY_TIERS]
        self.held_topic = topic_name(HELD, settings)
        self._dlq_topic = topic_name(RECIPIENTS_DLQ, settings)
        self._deliveries_topic = topic_name(DELIVERIES, settings)
        self._contacts_topic = topic_name(CONTACTS, settings)
        self._publish_errors: list[str] = []

    def retry_topic(self, attempt: int) -> str:
        """The delay topic that holds `attempt`."""
        return self.retry_topics[tier_index(attempt, len(self.retry_topics))]

    def publish(self, item: Work, outcome: Outcome, *, fresh: bool) -> None:
        """Produce what an outcome means: its delivery event, a retry or throttle slot on a
        delay topic, a parked record, a suppression; counts it in the stats."""
        recipient = item.recipient
        stats = self.stats
        if outcome.status is Status.HELD:
            stats.held += 1
            self.park(item.record)
            return
        if outcome.status is Status.THROTTLED:
            assert outcome.retry_at is not None
            stats.throttled += 1
            slot = RecipientRetryScheduled(recipient=recipient, attempt=outcome.attempt,
                                           retry_at=outcome.retry_at,
                                           first_attempt_at=item.first_attempt_at, throttled=True)
            topic = self.retry_topic(slot.attempt)
            self._emit(topic, item.record.key(), wrap_caused_by(slot, item.envelope))
            return
        if outcome.status is Status.SKIPPED:
            stats.skipped += 1
            skipped = RecipientSkipped(campaign_id=recipient.campaign_id,
                                       contact_id=recipient.contact_id, email=recipient.email,
                                       reason=outcome.detail or "cancelled")
            skipped_id = uuid.UUID(delivery_event_id(recipient.campaign_id, recipient.contact_id))
            self._emit(self._deliveries_topic, recipient.campaign_id.encode(),
                       wrap_caused_by(skipped, item.envelope, aggregate_id=recipient.campaign_id,
                                      message_id=skipped_id))
            return
        mail_id = item.message_id
        # The common case (a mail sent) is written directly; the same bytes as the schema path.
        # A copy re-published after a redelivery carries the first one's id (see README).
        event_id = delivery_event_id(recipient.campaign_id, recipient.contact_id,
                                     outcome.attempt if outcome.status is Status.DEFERRED else None)
        sent = sent_record(recipient, outcome, mail_id, item.envelope, event_id=event_id)
        if sent is not None:
            self._produce(self._deliveries_topic, recipient.campaign_id.encode(), sent)
        else:
            event = delivery_event(recipient, outcome, mail_id)
            self._emit(self._deliveries_topic, recipient.campaign_id.encode(),
                       wrap_caused_by(event, item.envelope, aggregate_id=recipient.campaign_id,
                                      message_id=uuid.UUID(event_id)))
        if fresh:
            stats.ambiguous += outcome.ambiguous
            stats.sent += outcome.status is Status.SENT
            stats.failed += outcome.status is Status.FAILED
            # Fresh: settled in the ledger just now, so a redelivered copy is not counted again.
            count_outcome(outcome)
        if outcome.status is Status.DEFERRED:
            assert outcome.retry_at is not None
            stats.deferred += 1
            retry = RecipientRetryScheduled(recipient=recipient, attempt=outcome.attempt + 1,
                                            retry_at=outcome.retry_at,
                                            first_attempt_at=item.first_attempt_at)
            topic = self.retry_topic(retry.attempt)
            self._emit(topic, item.record.key(), wrap_caused_by(retry, item.envelope))
        if outcome.hard_bounce:
            stats.suppressed += 1
            tenant = item.envelope.tenant_id
            suppressed = ContactSuppressed(contact_id=recipient.contact_id, reason="hard_bounce",
                                           detail=outcome.detail[:1000])
            self._emit(self._contacts_topic, contact_key(tenant, recipient.contact_id),
                       wrap_caused_by(suppressed, item.envelope, aggregate_id=recipient.contact_id))

    def park(self, record: Message) -> None:
        """Hold a record of a paused campaign, exactly as it came."""
        self._produce(self.held_topic, record.key(), record.value())

    def forward(self, record: Message, attempt: int) -> None:
        """A released held retry that is not due yet goes back to its delay topic."""
        topic = self.retry_topic(attempt)
        self._produce(topic, record.key(), record.value())

    def dead_letter(self, record: Message, reason: str) -> None:
        self.stats.invalid += 1
        log.warning("dead-lettering invalid record", reason=reason, topic=record.topic(),
                    partition=record.partition(), offset=record.offset())
        headers: list[tuple[str, str | bytes | None]] = [
            ("reason", reason.encode()),
            ("source", f"{record.topic()}/{record.partition()}/{record.offset()}".encode()),
        ]
        self._produce(self._dlq_topic, record.key(), record.value(), headers)

    def _emit(self, topic: str, key: bytes | None, envelope: Envelope) -> None:
        self._produce(topic, key, encode(envelope))

    def _produce(self, topic: str, key: bytes | str | None,
                 value: bytes | str | None, headers: list[Any] | None = None) -> None:
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, headers=headers,
                                 on_delivery=self._on_delivery)
                metrics.count_produced(topic)
                return
            except BufferError:
                # The local queue is full: let librdkafka send some before adding more.
                self._producer.poll(0.1)

    def _on_delivery(self, error: KafkaError | None, _record: Any) -> None:
        if error is not None:
            self._publish_errors.append(str(error))

    def flush(self) -> None:
        """Wait until every record produced so far is acknowledged, however long the broker
        is away; raise PublishFailed if one failed for good, Stopping if a stop request came
        and the broker still did not take them STOP_FLUSH_SECONDS later (the caller must then
        not commit)."""
        began = time.monotonic()
        give_up_at: float | None = None
        said_at = began
        while True:
            remaining = self._producer.flush(FLUSH_STEP_SECONDS)
            if self._publish_errors:
                errors, self._publish_errors = self._publish_errors, []
                raise PublishFailed(f"{remaining} records unconfirmed; errors: {errors[:3]}")
            if not remaining:
                if time.monotonic() - began > FLUSH_WAIT_LOG_SECONDS:
                    log.info("broker took the delivery events again",
                             waited_seconds=round(time.monotonic() - began, 1))
                return
            now = time.monotonic()
            if self._stop.is_set():
                give_up_at = give_up_at or now + STOP_FLUSH_SECONDS
                if now >= give_up_at:
                    raise Stopping(f"{remaining} delivery records not acknowledged")
            if now - said_at >= FLUSH_WAIT_LOG_SECONDS:
                said_at = now
                log.warning("waiting for the broker to take the delivery events",
                            records=remaining, waited_seconds=round(now - began, 1))



def count_outcome(outcome: Outcome) -> None:
    """The deliveries metrics of one settled outcome (sent, failed or deferred)."""
    code = outcome.smtp_code
    _deliveries(outcome.status, code // 100 if code is not None and 200 <= code < 600 else None
                ).inc()
    if outcome.ambiguous:
        metrics.AMBIGUOUS.inc(outcome.ambiguous)
    if outcome.status is Status.DEFERRED:
        metrics.RETRIES_SCHEDULED.inc()


# Looked up once per (outcome, reply class): `labels` costs a few microseconds per mail.
@functools.cache
def _deliveries(status: Status, reply_hundreds: int | None) -> Any:
    reply_class = f"{reply_hundreds}xx" if reply_hundreds is not None else "none"
    return metrics.DELIVERIES.labels(outcome=status.value, reply_class=reply_class)
