"""The sender: campaign.recipients -> SMTP -> campaign.deliveries, one batch at a time.

Delivery guarantee: every RecipientQueued record yields a delivery event (EmailSent or
EmailFailed) at least once, and each recipient is mailed at most once, except when an SMTP
outcome is unknown (a crash between claim and settle, or a connection lost after DATA); then
it may be mailed twice, and the send ledger counts that in its `ambiguous` column.

Per batch, in this order:
1. consume up to BATCH_SIZE records; records that are not valid RecipientQueued messages are
   logged and skipped (their offsets are committed with the rest, they never block a partition);
2. claim every distinct recipient in the send ledger (one statement, one transaction);
3. mail the FRESH and UNSETTLED ones concurrently over a pool of reused SMTP connections,
   with short in-process retries for transient failures;
4. settle every outcome in the ledger (one statement, one transaction);
5. produce one delivery event per input record (SETTLED recipients get their recorded
   outcome again) and flush the producer;
6. commit the consumer offsets synchronously.
A failure in 2, 4 or 5 raises before 6: the batch is redelivered and the ledger decides what
is mailed again. A stop request is honoured between batches: the in-flight batch completes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from schemas.envelope import Envelope, Message, SchemaViolation, decode, encode, wrap_caused_by
from schemas.events import RecipientExcluded, RecipientQueued
from services.common.kafka import consumer_config, producer_config
from services.common.settings import Settings
from services.common.topics import DELIVERIES, RECIPIENTS, topic_name
from services.sender.delivery import Outcome, deliver, delivery_event
from services.sender.ledger import ClaimState, LedgerEntry, LedgerKey, SendLedger
from services.sender.mime import build_mail, message_id_for
from services.sender.render import render
from services.sender.smtp_pool import SmtpPool

log = structlog.get_logger("sender")

# Big enough that ledger round trips and the producer flush are paid once per hundreds of
# mails; small enough that a crash redelivers little.
BATCH_SIZE = 500
# How long consume() waits for a batch to fill; it also bounds how long an idle sender takes
# to notice a stop request.
POLL_TIMEOUT_SECONDS = 0.5
# No SMTP attempt starts later than this into a batch: guards against a relay that hangs or
# crawls, which would otherwise keep the batch going past max.poll.interval.ms, get this
# sender evicted from the group and its recipients handed to another sender mid-send.
BATCH_DEADLINE_SECONDS = 120.0
# Above the batch deadline plus one attempt's SMTP timeouts (see smtp_pool): the broker only
# evicts a sender that is really stuck.
MAX_POLL_INTERVAL_MS = 300_000
# A crashed sender's partitions wait this long before another sender takes them over: short,
# so a SIGKILLed instance stalls its recipients for seconds, not the broker's default 45 s.
SESSION_TIMEOUT_MS = 10_000
# Guards against a broker that cannot take the delivery events: the batch is then not
# committed and the worker stops (a restart redelivers it; the ledger prevents re-mailing).
FLUSH_TIMEOUT_SECONDS = 30.0


class PublishFailed(RuntimeError):
    """Delivery events did not reach the broker; the batch must not be committed."""


@dataclass
class SenderStats:
    """Running totals of this worker, for logs, tests and benchmarks."""

    batches: int = 0
    records: int = 0
    skipped: int = 0
    sent: int = 0
    failed: int = 0
    replayed: int = 0
    ambiguous: int = 0
    events: int = 0


class SenderWorker:
    """Consumes campaign.recipients in group `sender`, mails each recipient and publishes its
    delivery on campaign.deliveries: at-least-once events, at-most-once mail except for
    ambiguous SMTP outcomes, which are counted in the send ledger."""

    def __init__(self, settings: Settings, concurrency: int = 8, batch_size: int = BATCH_SIZE) -> None:
        if concurrency < 1 or batch_size < 1:
            raise ValueError("concurrency and batch_size must be at least 1")
        self.settings = settings
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.stats = SenderStats()
        self._recipients_topic = topic_name(RECIPIENTS, settings)
        self._deliveries_topic = topic_name(DELIVERIES, settings)
        self._publish_errors: list[str] = []

    def run(self, stop_event: threading.Event) -> None:
        """Process batches until `stop_event` is set; the batch in flight then completes."""
        ledger = SendLedger(self.settings.database_url)
        pool = SmtpPool(self.settings.smtp_host, self.settings.smtp_port, self.concurrency)
        producer = Producer(self._producer_config())
        consumer = Consumer(self._consumer_config())
        executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="sender-smtp")
        consumer.subscribe([self._recipients_topic])
        log.info("sender started", topic=self._recipients_topic, group=self.settings.group("sender"),
                 smtp=f"{self.settings.smtp_host}:{self.settings.smtp_port}",
                 concurrency=self.concurrency)
        try:
            while not stop_event.is_set():
                records = consumer.consume(self.batch_size, POLL_TIMEOUT_SECONDS)
                if records:
                    self._process(records, ledger, pool, producer, executor)
                    self._commit(consumer, records)
        finally:
            # Close the consumer first: it leaves the group now, so the partitions move to
            # another sender without waiting for a session timeout.
            consumer.close()
            executor.shutdown(wait=True)
            pool.close()
            producer.flush(FLUSH_TIMEOUT_SECONDS)
            ledger.close()
            log.info("sender stopped", **vars(self.stats))

    # --- one batch -------------------------------------------------------------------------

    def _process(
        self,
        records: list[Any],
        ledger: SendLedger,
        pool: SmtpPool,
        producer: Producer,
        executor: ThreadPoolExecutor,
    ) -> None:
        started = time.monotonic()
        messages = list(self._recipients(records))
        distinct: dict[LedgerKey, Message[RecipientQueued]] = {}
        for message in messages:
            distinct.setdefault(_key(message.payload), message)
        claims = ledger.claim([_ledger_entry(m) for m in distinct.values()])

        to_send = [m for key, m in distinct.items() if claims[key].must_send]
        for message in to_send:
            if claims[_key(message.payload)].state is ClaimState.UNSETTLED:
                log.warning("possible duplicate: claimed before but never settled, mailing again",
                            campaign_id=message.payload.campaign_id,
                            contact_id=message.payload.contact_id)
        deadline = started + BATCH_DEADLINE_SECONDS
        sent_outcomes = executor.map(lambda m: self._mail(m.payload, pool, deadline), to_send)
        outcomes: dict[LedgerKey, Outcome] = {
            _key(m.payload): o for m, o in zip(to_send, sent_outcomes, strict=True)
        }
        ledger.settle(outcomes)

        for message in messages:
            key = _key(message.payload)
            outcome = outcomes.get(key) or claims[key].outcome
            assert outcome is not None  # every key is either mailed now or SETTLED before
            self._publish(producer, message, outcome)
        remaining = producer.flush(FLUSH_TIMEOUT_SECONDS)
        if remaining or self._publish_errors:
            errors, self._publish_errors = self._publish_errors, []
            raise PublishFailed(f"{remaining} delivery events unconfirmed; errors: {errors[:3]}")

        self._count(messages, claims, outcomes)
        log.info("batch done", records=len(records), recipients=len(distinct),
                 mailed=len(outcomes), replayed=len(distinct) - len(outcomes),
                 seconds=round(time.monotonic() - started, 3))

    def _recipients(self, records: Iterable[Any]) -> Iterable[Message[RecipientQueued]]:
        for record in records:
            error = record.error()
            if error is not None:
                if error.fatal():
                    raise KafkaException(error)
                log.warning("consumer error", error=str(error))
                continue
            try:
                message = decode(record.value())
            except SchemaViolation as exc:
                self.stats.skipped += 1
                log.warning("skipping invalid record", reason=str(exc), topic=record.topic(),
                            partition=record.partition(), offset=record.offset())
                continue
            if isinstance(message.payload, RecipientExcluded):
                continue  # an audience member the hydrator excluded: nothing to send, by design
            if not isinstance(message.payload, RecipientQueued):
                self.stats.skipped += 1
                log.warning("skipping unexpected message type", type=message.envelope.type,
                            partition=record.partition(), offset=record.offset())
                continue
            yield Message(message.envelope, message.payload)

    def _mail(self, recipient: RecipientQueued, pool: SmtpPool, deadline: float) -> Outcome:
        """Runs on a pool thread: build the message, then deliver it."""
        try:
            mail = build_mail(recipient, render(recipient), datetime.now(UTC))
        except Exception as exc:  # a recipient that cannot be built must not stop the batch
            log.exception("message not built", campaign_id=recipient.campaign_id,
                          contact_id=recipient.contact_id)
            return Outcome.unbuildable(exc)
        outcome = deliver(mail, pool.transmit, deadline=deadline)
        if outcome.ambiguous:
            log.warning("possible duplicate: connection lost after DATA",
                        campaign_id=recipient.campaign_id, contact_id=recipient.contact_id,
                        ambiguous=outcome.ambiguous, sent=outcome.sent)
        return outcome

    def _publish(self, producer: Producer, message: Message[RecipientQueued], outcome: Outcome) -> None:
        recipient = message.payload
        event = delivery_event(recipient, outcome, _message_id(recipient))
        envelope: Envelope = wrap_caused_by(event, message.envelope, aggregate_id=recipient.campaign_id)
        value = encode(envelope)
        key = recipient.campaign_id.encode()
        while True:
            try:
                producer.produce(self._deliveries_topic, value=value, key=key,
                                 on_delivery=self._on_delivery)
                return
            except BufferError:
                # The local queue is full: let librdkafka send some before adding more.
                producer.poll(0.1)

    def _on_delivery(self, error: KafkaError | None, _record: Any) -> None:
        if error is not None:
            self._publish_errors.append(str(error))

    def _commit(self, consumer: Consumer, records: list[Any]) -> None:
        positions: dict[tuple[str, int], int] = {}
        for record in records:
            if record.error() is None:
                where = (record.topic(), record.partition())
                positions[where] = max(positions.get(where, -1), record.offset())
        if not positions:
            return
        offsets = [TopicPartition(t, p, offset + 1) for (t, p), offset in positions.items()]
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # Typically a rebalance took the partitions: their next owner gets the batch
            # again and the ledger turns it into re-published outcomes, not new mail.
            log.warning("offset commit failed; batch will be redelivered", error=str(exc))

    def _count(self, messages: list[Message[RecipientQueued]], claims: dict[LedgerKey, Any],
               outcomes: dict[LedgerKey, Outcome]) -> None:
        stats = self.stats
        stats.batches += 1
        stats.records += len(messages)
        stats.events += len(messages)
        stats.sent += sum(o.sent for o in outcomes.values())
        stats.failed += sum(not o.sent for o in outcomes.values())
        stats.replayed += sum(not c.must_send for c in claims.values())
        stats.ambiguous += sum(o.ambiguous for o in outcomes.values()) + sum(
            c.state is ClaimState.UNSETTLED for c in claims.values()
        )

    # --- client configuration --------------------------------------------------------------

    def _consumer_config(self) -> dict[str, Any]:
        return consumer_config(
            self.settings,
            "sender",
            # Scaling the group moves only the partitions that change owner.
            **{
                "partition.assignment.strategy": "cooperative-sticky",
                "max.poll.interval.ms": MAX_POLL_INTERVAL_MS,
                "session.timeout.ms": SESSION_TIMEOUT_MS,
                "heartbeat.interval.ms": SESSION_TIMEOUT_MS // 3,
            },
        )

    def _producer_config(self) -> dict[str, Any]:
        # Shared settings: idempotent (a producer retry cannot double a delivery event),
        # acks=all, and the murmur2 partitioner that keeps campaign-keyed topics co-partitioned.
        return producer_config(self.settings)


def _key(recipient: RecipientQueued) -> LedgerKey:
    return (recipient.campaign_id, recipient.contact_id)


def _message_id(recipient: RecipientQueued) -> str:
    return message_id_for(recipient.campaign_id, recipient.contact_id,
                          recipient.template.from_address)


def _ledger_entry(message: Message[RecipientQueued]) -> LedgerEntry:
    recipient = message.payload
    return LedgerEntry(recipient.campaign_id, recipient.contact_id,
                       message.envelope.tenant_id, _message_id(recipient))

