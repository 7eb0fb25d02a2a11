"""The sender: campaign.recipients (+ delay and held topics) -> SMTP -> campaign.deliveries.

Delivery guarantee: every RecipientQueued ends in exactly one terminal delivery event
(EmailSent, EmailFailed or RecipientSkipped), published at least once (copies carry the same
outcome), after any number of EmailDeferred. Each attempt mails the recipient at most once,
except when its outcome is unknown (a crash between claim and settle, or a connection lost
after the final "."): then the recipient may get a copy, and the send ledger counts it in
`ambiguous`, which EmailSent / EmailFailed carry.

One consumer (group `sender`) reads campaign.recipients, the delay topics
campaign.recipients.retry.<tier> and the held topic campaign.recipients.held. Per batch:
1. route each record: invalid ones go to campaign.recipients.dlq with the reason; a delay
   record not yet due pauses its partition until it is (the consumer never sleeps on a
   partition, and the other partitions keep flowing); a recipient of a paused campaign is
   parked on the held topic; a held record whose campaign is still paused pauses the held
   partition until some campaign is resumed or cancelled (then the blocked partitions are
   swept: records of campaigns still paused are parked again at the end, the others go on);
2-4. in chunks of LEDGER_CHUNK recipients: claim each distinct recipient in the send ledger
   with the attempt its record carries; mail the FRESH and UNSETTLED ones concurrently over
   reused SMTP connections, one SMTP transaction each, checking right before each one that
   the campaign was not paused or cancelled meanwhile (and waiting for its rate-limit slot);
   settle the chunk's outcomes in the ledger;
5. publish: EmailSent / EmailFailed (+ ContactSuppressed on contacts.events for a hard
   bounce), EmailDeferred + RecipientRetryScheduled on the delay topic of the next attempt,
   RecipientSkipped ("cancelled", "suppressed:<reason>", ...), held records parked; flush;
6. commit the consumed offsets synchronously.
A failure in 2, 4 or 5 raises before 6: the batch is redelivered and the ledger decides what
is mailed again. A stop request is honoured between batches: the in-flight batch completes.

Control (pause / resume / cancel) comes from a `ControlFeed` over all of campaign.events, and
contacts suppressed, unsubscribed or deleted after hydration from a `DoNotMailFeed` over all
of contacts.events (they end as RecipientSkipped with that reason); the sender starts
consuming recipients only once both feeds have caught up.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from schemas.contacts import ContactSuppressed, contact_key
from schemas.envelope import Envelope, SchemaViolation, decode, encode, wrap_caused_by
from schemas.events import (
    RecipientExcluded,
    RecipientQueued,
    RecipientRetryScheduled,
    RecipientSkipped,
)
from services.common.kafka import consumer_config, producer_config
from services.common.settings import Settings
from services.common.topics import (
    CONTACTS,
    DELIVERIES,
    HELD,
    RECIPIENTS,
    RECIPIENTS_DLQ,
    RETRY_TIERS,
    topic_name,
)
from services.sender.control import Control, ControlBoard, ControlFeed
from services.sender.delivery import Outcome, Status, delivery_event, judge_attempt, transient
from services.sender.do_not_mail import DoNotMailFeed, DoNotMailList
from services.sender.feeds import TopicFeed
from services.sender.ledger import Claim, ClaimState, LedgerEntry, LedgerKey, SendLedger
from services.sender.list_unsubscribe import ListUnsubscribe
from services.sender.mime import build_mail, message_id_for
from services.sender.render import render
from services.sender.retries import RetryPolicy, tier_index
from services.sender.smtp_pool import SmtpPool
from services.sender.throttle import RateLimiter
from services.sender.transport import MailTransport

log = structlog.get_logger("sender")

# Big enough that ledger round trips and the producer flush are paid once per hundreds of
# mails; small enough that a crash redelivers little.
BATCH_SIZE = 500
# How long consume() waits for a batch to fill; it also bounds how long an idle sender takes
# to notice a stop request, and how late a due delay partition is resumed.
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
# A release is followed by a second sweep of the blocked held partitions this much later: a
# sender that had not seen a resume yet may still have parked a record of that campaign
# behind a campaign that stays paused (every sender sees a change within ~1 s).
RESWEEP_SECONDS = 3.0
# Metadata look-ups (watermarks): guards against a broker that does not answer.
METADATA_TIMEOUT_SECONDS = 10.0
# Waiting for the feeds (control, do-not-mail) to catch up before the first recipient: a
# broker that cannot serve them for this long is an error, not a reason to mail blind.
CONTROL_CATCH_UP_SECONDS = 120.0
# Recipients claimed, mailed and settled together within a batch: a crash leaves at most
# this many claims unsettled (each counted as a possible duplicate when redelivered), while
# the ledger round trips stay a few per batch.
LEDGER_CHUNK = 100
# Longest a send thread waits for its rate-limit slot, and latest (into the batch) a slot may
# be: beyond either, the recipient goes to a delay topic for that slot instead, so a tight
# limit neither stretches a batch (and the partitions it holds) towards max.poll.interval.ms
# nor runs into the batch deadline, which would count as a failed attempt.
MAX_THROTTLE_WAIT_SECONDS = 2.0
THROTTLED_BATCH_SECONDS = 5.0

Where = tuple[str, int]  # (topic, partition)


class PublishFailed(RuntimeError):
    """Delivery events did not reach the broker; the batch must not be committed."""


@dataclass
class SenderStats:
    """Running totals of this worker, for logs, tests and benchmarks."""

    batches: int = 0
    records: int = 0
    invalid: int = 0
    sent: int = 0
    failed: int = 0
    deferred: int = 0
    held: int = 0
    throttled: int = 0
    skipped: int = 0
    replayed: int = 0
    ambiguous: int = 0
    suppressed: int = 0


@dataclass(frozen=True)
class Work:
    """A recipient record to act on in this batch."""

    record: Message
    envelope: Envelope
    # The record's payload: RecipientQueued, or RecipientRetryScheduled around it.
    payload: RecipientQueued | RecipientRetryScheduled
    recipient: RecipientQueued
    attempt: int
    first_attempt_at: datetime
    # Why it must not be mailed now ("cancelled", "suppressed:<reason>", ...), or None.
    skip: str | None
    # Its rate-limit slot was booked when it was throttled: it takes no other token.
    prepaid: bool = False

    @property
    def key(self) -> LedgerKey:
        return (self.recipient.campaign_id, self.recipient.contact_id)


class SenderWorker:
    """Consumes the recipient topics in group `sender`, mails each recipient and publishes its
    delivery on campaign.deliveries: at-least-once events, at-most-once mail per attempt
    except for ambiguous SMTP outcomes, which are counted."""

    def __init__(
        self,
        settings: Settings,
        concurrency: int = 8,
        batch_size: int = BATCH_SIZE,
        policy: RetryPolicy | None = None,
        limiter: RateLimiter | None = None,
        transport: Callable[[int], MailTransport] | None = None,
    ) -> None:
        if concurrency < 1 or batch_size < 1:
            raise ValueError("concurrency and batch_size must be at least 1")
        self.settings = settings
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.policy = policy or RetryPolicy.from_env()
        self.limiter = limiter or RateLimiter.from_env(os.environ)
        self.list_unsubscribe = ListUnsubscribe.from_env()
        # Builds the SMTP side for `concurrency` connections: one relay by default.
        self._transport_factory = transport or (
            lambda size: SmtpPool(settings.smtp_host, settings.smtp_port, size))
        # Partitions of the subscribed topics this instance owns, of how many: its share of
        # the group's rate limits.
        self._assigned: set[Where] = set()
        self._partitions_total = 0
        self.stats = SenderStats()
        self.board = ControlBoard()
        self.do_not_mail = DoNotMailList()
        self._recipients_topic = topic_name(RECIPIENTS, settings)
        self._retry_topics = [topic_name(t, settings) for t in RETRY_TIERS]
        self._held_topic = topic_name(HELD, settings)
        self._dlq_topic = topic_name(RECIPIENTS_DLQ, settings)
        self._deliveries_topic = topic_name(DELIVERIES, settings)
        self._contacts_topic = topic_name(CONTACTS, settings)
        self._publish_errors: list[str] = []
        self._rng = random.Random()  # noqa: S311 - backoff jitter, not security
        # Delay partitions paused until their head record is due.
        self._due_at: dict[Where, datetime] = {}
        # Held partitions paused until a campaign is released (resumed or cancelled); sweeps:
        # held partition -> end offset up to which records of still-paused campaigns are
        # parked again instead of blocking (once per release, so a long pause costs nothing).
        self._held_blocked: set[Where] = set()
        self._sweep_until: dict[Where, int] = {}
        self._control_seen = 0
        self._resweep_at: float | None = None

    # --- loop ------------------------------------------------------------------------------

    def run(self, stop_event: threading.Event) -> None:
        """Process batches until `stop_event` is set; the batch in flight then completes."""
        feeds: list[TopicFeed] = [ControlFeed(self.settings, self.board),
                                  DoNotMailFeed(self.settings, self.do_not_mail)]
        for feed in feeds:
            feed.start()
        try:
            if not self._await_feeds(feeds, stop_event):
                return
            self._run(feeds, stop_event)
        finally:
            for feed in feeds:
                feed.stop()

    def _await_feeds(self, feeds: list[TopicFeed], stop_event: threading.Event) -> bool:
        deadline = time.monotonic() + CONTROL_CATCH_UP_SECONDS
        while not all(feed.caught_up.wait(0.1) for feed in feeds):
            _check(feeds)
            if stop_event.is_set():
                return False
            if time.monotonic() > deadline:
                raise TimeoutError("feeds did not catch up with campaign.events / contacts.events")
        self._control_seen = self.board.released
        return True

    def _run(self, feeds: list[TopicFeed], stop_event: threading.Event) -> None:
        ledger = SendLedger(self.settings.database_url)
        pool = self._transport_factory(self.concurrency)
        producer = Producer(self._producer_config())
        consumer = Consumer(self._consumer_config())
        executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="sender-smtp")
        topics = [self._recipients_topic, *self._retry_topics, self._held_topic]
        metadata = consumer.list_topics(timeout=METADATA_TIMEOUT_SECONDS).topics
        self._partitions_total = sum(len(metadata[t].partitions) for t in topics if t in metadata)
        consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                           on_lost=self._on_revoke)
        log.info("sender started", topics=topics, group=self.settings.group("sender"),
                 smtp=f"{self.settings.smtp_host}:{self.settings.smtp_port}",
                 concurrency=self.concurrency)
        try:
            while not stop_event.is_set():
                _check(feeds)
                self._wake(consumer)
                records = consumer.consume(self.batch_size, self._poll_timeout())
                if records:
                    work, done = self._route(records, consumer, producer)
                    self._process(work, ledger, pool, producer, executor)
                    self._flush(producer)
                    self._commit(consumer, done + [w.record for w in work])
        finally:
            # Close the consumer first: it leaves the group now, so the partitions move to
            # another sender without waiting for a session timeout.
            consumer.close()
            executor.shutdown(wait=True)
            pool.close()
            producer.flush(FLUSH_TIMEOUT_SECONDS)
            ledger.close()
            log.info("sender stopped", **vars(self.stats))

    def _poll_timeout(self) -> float:
        if not self._due_at:
            return POLL_TIMEOUT_SECONDS
        until = (min(self._due_at.values()) - datetime.now(UTC)).total_seconds()
        return min(POLL_TIMEOUT_SECONDS, max(until, 0.01))

    def _wake(self, consumer: Consumer) -> None:
        """Resume delay partitions whose head is due, and held partitions after a campaign was
        released (with a sweep up to their current end)."""
        now = datetime.now(UTC)
        due = [where for where, at in self._due_at.items() if at <= now]
        for where in due:
            del self._due_at[where]
        resweep = self._resweep_at is not None and time.monotonic() >= self._resweep_at
        if self.board.released != self._control_seen or resweep:
            changed = self.board.released != self._control_seen
            self._control_seen = self.board.released
            self._resweep_at = time.monotonic() + RESWEEP_SECONDS if changed else None
            for where in self._held_blocked:
                _, high = consumer.get_watermark_offsets(
                    TopicPartition(*where), timeout=METADATA_TIMEOUT_SECONDS, cached=False)
                self._sweep_until[where] = high
            due.extend(self._held_blocked)
            self._held_blocked.clear()
        if due:
            consumer.resume([TopicPartition(t, p) for t, p in due])

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned.update((tp.topic, tp.partition) for tp in partitions)
        self._reshare()

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            where = (tp.topic, tp.partition)
            self._assigned.discard(where)
            self._due_at.pop(where, None)
            self._held_blocked.discard(where)
            self._sweep_until.pop(where, None)
        self._reshare()

    def _reshare(self) -> None:
        if self._partitions_total:
            share = len(self._assigned) / self._partitions_total
            self.limiter.set_share(share, time.monotonic())
            log.info("partitions assigned", partitions=len(self._assigned), share=round(share, 3))

    # --- 1. routing ------------------------------------------------------------------------

    def _route(
        self, records: list[Message], consumer: Consumer, producer: Producer
    ) -> tuple[list[Work], list[Message]]:
        """Split a batch into recipients to act on and records already dealt with (invalid,
        excluded, parked); pauses partitions whose head must wait."""
        work: list[Work] = []
        done: list[Message] = []
        waiting: set[Where] = set()
        now = datetime.now(UTC)
        for record in records:
            error = record.error()
            if error is not None:
                if error.fatal():
                    raise KafkaException(error)
                log.warning("consumer error", error=str(error))
                continue
            where = (record.topic() or "", record.partition() or 0)
            if where in waiting:
                continue  # behind a record that waits: fetched again after the resume
            self.stats.records += 1
            item = self._recipient(record, now, producer)
            if item is None:
                done.append(record)
                continue
            wait = self._must_wait(item, where, now, producer)
            if wait is None:
                done.append(record)
            elif wait:
                waiting.add(where)
                consumer.pause([TopicPartition(*where)])
                consumer.seek(TopicPartition(*where, record.offset() or 0))
            else:
                work.append(item)
        return work, done

    def _recipient(self, record: Message, now: datetime, producer: Producer) -> Work | None:
        """The recipient a record asks for, or None when there is nothing to mail (invalid
        records are dead-lettered)."""
        try:
            message = decode(record.value())
        except SchemaViolation as exc:
            self._dead_letter(producer, record, str(exc))
            return None
        payload = message.payload
        if isinstance(payload, RecipientExcluded):
            return None  # an audience member the hydrator excluded: nothing to send, by design
        if isinstance(payload, RecipientQueued):
            recipient, attempt, first, prepaid = payload, 1, now, False
        elif isinstance(payload, RecipientRetryScheduled):
            recipient, attempt = payload.recipient, payload.attempt
            first, prepaid = payload.first_attempt_at, payload.throttled
        else:
            self._dead_letter(producer, record, f"not a recipient: {message.envelope.type}")
            return None
        return Work(record, message.envelope, payload, recipient, attempt, first,
                    self._skip_reason(message.envelope.tenant_id, recipient), prepaid)

    def _skip_reason(self, tenant_id: str, recipient: RecipientQueued) -> str | None:
        if self.board.state(recipient.campaign_id) is Control.CANCELLED:
            return "cancelled"
        return self.do_not_mail.reason(tenant_id, recipient.contact_id)

    def _must_wait(self, item: Work, where: Where, now: datetime, producer: Producer) -> bool | None:
        """True: the partition must wait at this record; None: the record was parked (or sent
        on to its delay topic); False: act on it now."""
        payload = item.payload
        control = self.board.state(item.recipient.campaign_id)
        if where[0] == self._held_topic:
            if control is Control.PAUSED:
                if (item.record.offset() or 0) < self._sweep_until.get(where, -1):
                    self._park(producer, item.record)  # still paused: to the end, let others by
                    return None
                self._held_blocked.add(where)
                return True
            if isinstance(payload, RecipientRetryScheduled) and payload.retry_at > now:
                self._forward(producer, item.record, payload.attempt)
                return None
            return False
        if isinstance(payload, RecipientRetryScheduled) and payload.retry_at > now:
            self._due_at[where] = payload.retry_at
            return True
        if control is Control.PAUSED:
            self._park(producer, item.record)
            self.stats.held += 1
            return None
        return False

    # --- 2..5. one batch of recipients -------------------------------------------------------

    def _process(
        self,
        work: list[Work],
        ledger: SendLedger,
        pool: MailTransport,
        producer: Producer,
        executor: ThreadPoolExecutor,
    ) -> None:
        if not work:
            return
        started = time.monotonic()
        # One entry per recipient: the copy with the latest attempt (earlier copies are stale).
        chosen: dict[LedgerKey, Work] = {}
        for item in work:
            if item.key not in chosen or item.attempt > chosen[item.key].attempt:
                chosen[item.key] = item
        claims: dict[LedgerKey, Claim] = {}
        mailed: dict[LedgerKey, Outcome] = {}
        items = _fair(list(chosen.values()))
        for first in range(0, len(items), LEDGER_CHUNK):
            chunk = items[first:first + LEDGER_CHUNK]
            claimed = ledger.claim([_ledger_entry(item) for item in chunk])
            claims.update(claimed)
            to_mail = [item for item in chunk if claimed[item.key].must_send]
            for item in to_mail:
                if claimed[item.key].state is ClaimState.UNSETTLED:
                    log.warning("possible duplicate: claimed but never settled, mailing again",
                                campaign_id=item.recipient.campaign_id,
                                contact_id=item.recipient.contact_id, attempt=item.attempt)
            results = executor.map(lambda item: self._mail(item, pool, started), to_mail)
            outcomes = {item.key: outcome for item, outcome in zip(to_mail, results, strict=True)}
            ledger.settle(outcomes)
            mailed.update(outcomes)

        for key, item in chosen.items():
            fresh = mailed.get(key)
            outcome = (fresh.with_ambiguous(claims[key].ambiguous) if fresh is not None
                       else self._recorded(item, claims[key]))
            if outcome is not None:
                self._publish(producer, item, outcome, fresh=fresh is not None)
        self.stats.batches += 1
        log.info("batch done", records=len(work), recipients=len(chosen), mailed=len(mailed),
                 seconds=round(time.monotonic() - started, 3))

    def _recorded(self, item: Work, claim: Claim) -> Outcome | None:
        """What a recipient that is not mailed now ends as, from its ledger history."""
        if claim.state is ClaimState.SETTLED:
            self.stats.replayed += 1
            return claim.outcome
        if claim.state is ClaimState.SKIPPED:
            return Outcome(Status.SKIPPED, item.attempt, detail=item.skip or "cancelled")
        if claim.state is ClaimState.DEFERRED and claim.outcome is not None:
            # The retry record of this deferral may have been lost in a crash: publish again.
            wait = self.policy.delay(item.attempt, self._rng.random())
            return replace(claim.outcome, retry_at=datetime.now(UTC) + timedelta(seconds=wait))
        return None  # STALE: a later attempt owns the recipient

    def _mail(self, item: Work, pool: MailTransport, started: float) -> Outcome:
        """Runs on a pool thread: check control and rate limits, build the message, one SMTP
        attempt (`started`: when the batch started)."""
        recipient = item.recipient
        control = self.board.state(recipient.campaign_id)
        if control is Control.PAUSED:
            return Outcome(Status.HELD, item.attempt)
        skip = self._skip_reason(item.envelope.tenant_id, recipient)
        if skip is not None:
            return Outcome(Status.SKIPPED, item.attempt, detail=skip)
        now = datetime.now(UTC)
        if time.monotonic() >= started + BATCH_DEADLINE_SECONDS:
            return transient(item.attempt, None, "batch deadline passed before this attempt",
                             first_attempt_at=item.first_attempt_at, now=now, policy=self.policy,
                             draw=self._rng.random())
        if self.limiter.active and not item.prepaid:
            clock = time.monotonic()
            wait = self.limiter.book(item.envelope.tenant_id,
                                     pool.server_for(recipient.template.from_address), clock)
            if wait > MAX_THROTTLE_WAIT_SECONDS or clock + wait > started + THROTTLED_BATCH_SECONDS:
                return Outcome(Status.THROTTLED, item.attempt,
                               retry_at=now + timedelta(seconds=wait))
            if wait > 0:
                time.sleep(wait)  # a send thread pacing itself; the consumer loop is not held
                now = datetime.now(UTC)
        try:
            extra = (self.list_unsubscribe.headers(item.envelope.tenant_id, recipient.contact_id,
                                                   recipient.campaign_id)
                     if self.list_unsubscribe else None)
            mail = build_mail(recipient, render(recipient), now, extra)
        except Exception as exc:  # a recipient that cannot be built must not stop the batch
            log.exception("message not built", campaign_id=recipient.campaign_id,
                          contact_id=recipient.contact_id)
            return Outcome.unbuildable(item.attempt, exc)
        result = pool.transmit(mail)
        outcome = judge_attempt(result, item.attempt, first_attempt_at=item.first_attempt_at,
                                now=datetime.now(UTC), policy=self.policy,
                                draw=self._rng.random())
        if outcome.ambiguous:
            log.warning("possible duplicate: connection lost after DATA",
                        campaign_id=recipient.campaign_id, contact_id=recipient.contact_id,
                        attempt=item.attempt)
        return outcome

    # --- publishing ------------------------------------------------------------------------

    def _publish(self, producer: Producer, item: Work, outcome: Outcome, *, fresh: bool) -> None:
        recipient = item.recipient
        stats = self.stats
        if outcome.status is Status.HELD:
            stats.held += 1
            self._park(producer, item.record)
            return
        if outcome.status is Status.THROTTLED:
            assert outcome.retry_at is not None
            stats.throttled += 1
            slot = RecipientRetryScheduled(recipient=recipient, attempt=outcome.attempt,
                                           retry_at=outcome.retry_at,
                                           first_attempt_at=item.first_attempt_at, throttled=True)
            topic = self._retry_topics[tier_index(slot.attempt, len(self._retry_topics))]
            self._emit(producer, topic, item.record.key(), wrap_caused_by(slot, item.envelope))
            return
        if outcome.status is Status.SKIPPED:
            stats.skipped += 1
            skipped = RecipientSkipped(campaign_id=recipient.campaign_id,
                                       contact_id=recipient.contact_id, email=recipient.email,
                                       reason=outcome.detail or "cancelled")
            self._emit(producer, self._deliveries_topic, recipient.campaign_id.encode(),
                       wrap_caused_by(skipped, item.envelope, aggregate_id=recipient.campaign_id))
            return
        event = delivery_event(recipient, outcome, _message_id(recipient))
        self._emit(producer, self._deliveries_topic, recipient.campaign_id.encode(),
                   wrap_caused_by(event, item.envelope, aggregate_id=recipient.campaign_id))
        if fresh:
            stats.ambiguous += outcome.ambiguous
            stats.sent += outcome.status is Status.SENT
            stats.failed += outcome.status is Status.FAILED
        if outcome.status is Status.DEFERRED:
            assert outcome.retry_at is not None
            stats.deferred += 1
            retry = RecipientRetryScheduled(recipient=recipient, attempt=outcome.attempt + 1,
                                            retry_at=outcome.retry_at,
                                            first_attempt_at=item.first_attempt_at)
            topic = self._retry_topics[tier_index(retry.attempt, len(self._retry_topics))]
            self._emit(producer, topic, item.record.key(), wrap_caused_by(retry, item.envelope))
        if outcome.hard_bounce:
            stats.suppressed += 1
            tenant = item.envelope.tenant_id
            suppressed = ContactSuppressed(contact_id=recipient.contact_id, reason="hard_bounce",
                                           detail=outcome.detail[:1000])
            self._emit(producer, self._contacts_topic, contact_key(tenant, recipient.contact_id),
                       wrap_caused_by(suppressed, item.envelope, aggregate_id=recipient.contact_id))

    def _park(self, producer: Producer, record: Message) -> None:
        """Hold a record of a paused campaign, exactly as it came."""
        self._produce(producer, self._held_topic, record.key(), record.value())

    def _forward(self, producer: Producer, record: Message, attempt: int) -> None:
        """A released held retry that is not due yet goes back to its delay topic."""
        topic = self._retry_topics[tier_index(attempt, len(self._retry_topics))]
        self._produce(producer, topic, record.key(), record.value())

    def _dead_letter(self, producer: Producer, record: Message, reason: str) -> None:
        self.stats.invalid += 1
        log.warning("dead-lettering invalid record", reason=reason, topic=record.topic(),
                    partition=record.partition(), offset=record.offset())
        headers: list[tuple[str, str | bytes | None]] = [
            ("reason", reason.encode()),
            ("source", f"{record.topic()}/{record.partition()}/{record.offset()}".encode()),
        ]
        self._produce(producer, self._dlq_topic, record.key(), record.value(), headers)

    def _emit(self, producer: Producer, topic: str, key: bytes | None, envelope: Envelope) -> None:
        self._produce(producer, topic, key, encode(envelope))

    def _produce(self, producer: Producer, topic: str, key: bytes | str | None,
                 value: bytes | str | None, headers: list[Any] | None = None) -> None:
        while True:
            try:
                producer.produce(topic, value=value, key=key, headers=headers,
                                 on_delivery=self._on_delivery)
                return
            except BufferError:
                # The local queue is full: let librdkafka send some before adding more.
                producer.poll(0.1)

    def _on_delivery(self, error: KafkaError | None, _record: Any) -> None:
        if error is not None:
            self._publish_errors.append(str(error))

    def _flush(self, producer: Producer) -> None:
        remaining = producer.flush(FLUSH_TIMEOUT_SECONDS)
        if remaining or self._publish_errors:
            errors, self._publish_errors = self._publish_errors, []
            raise PublishFailed(f"{remaining} records unconfirmed; errors: {errors[:3]}")

    # --- 6. commit -------------------------------------------------------------------------

    def _commit(self, consumer: Consumer, records: list[Message]) -> None:
        positions: dict[Where, int] = {}
        for record in records:
            where = (record.topic() or "", record.partition() or 0)
            positions[where] = max(positions.get(where, -1), record.offset() or 0)
        if not positions:
            return
        offsets = [TopicPartition(t, p, offset + 1) for (t, p), offset in positions.items()]
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # Typically a rebalance took the partitions: their next owner gets the batch
            # again and the ledger turns it into re-published outcomes, not new mail.
            log.warning("offset commit failed; batch will be redelivered", error=str(exc))

    # --- client configuration --------------------------------------------------------------

    def _consumer_config(self) -> dict[str, Any]:
        return consumer_config(
            self.settings,
            "sender",
            # Round-robin deals the partitions of each topic in turn, so every member gets its
            # share of campaign.recipients (cooperative-sticky balances only the total count
            # over all five topics: with two members one could own every recipients partition
            # and the other only delay and held partitions, and two senders mail no faster
            # than one). The price is an eager rebalance, which the send ledger makes safe.
            **{
                "partition.assignment.strategy": "roundrobin",
                "max.poll.interval.ms": MAX_POLL_INTERVAL_MS,
                "session.timeout.ms": SESSION_TIMEOUT_MS,
                "heartbeat.interval.ms": SESSION_TIMEOUT_MS // 3,
            },
        )

    def _producer_config(self) -> dict[str, Any]:
        # Shared settings: idempotent (a producer retry cannot double a delivery event),
        # acks=all, and the murmur2 partitioner that keeps campaign-keyed topics co-partitioned.
        return producer_config(self.settings)


def _check(feeds: list[TopicFeed]) -> None:
    for feed in feeds:
        if feed.error is not None:
            raise RuntimeError("a feed failed; not mailing blind") from feed.error


def _fair(items: list[Work]) -> list[Work]:
    """Round-robin over tenants, so that when a rate limit of the SMTP server bites, tenants
    share its slots instead of the largest one taking them all."""
    by_tenant: dict[str, list[Work]] = {}
    for item in items:
        by_tenant.setdefault(item.envelope.tenant_id, []).append(item)
    if len(by_tenant) < 2:
        return items
    queues = list(by_tenant.values())
    longest = max(len(q) for q in queues)
    return [q[i] for i in range(longest) for q in queues if i < len(q)]


def _message_id(recipient: RecipientQueued) -> str:
    return message_id_for(recipient.campaign_id, recipient.contact_id,
                          recipient.template.from_address)


def _ledger_entry(item: Work) -> LedgerEntry:
    recipient = item.recipient
    return LedgerEntry(recipient.campaign_id, recipient.contact_id, item.envelope.tenant_id,
                       _message_id(recipient), item.attempt, item.skip is not None)

