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
5. publish the chunk: EmailSent / EmailFailed (+ ContactSuppressed on contacts.events for a
   hard bounce), EmailDeferred + RecipientRetryScheduled on the delay topic of the next
   attempt, RecipientSkipped ("cancelled", "suppressed:<reason>", ...), held records parked;
6. once every chunk of the batch (and of every batch before it) is published: flush, then
   commit the consumed offsets synchronously.
Steps 2-6 run in a `SendPipeline` (services/sender/pipeline.py) that overlaps them: the next
chunk is claimed while the current one is mailed, the SMTP threads take mails one by one (no
barrier per chunk), and the next batch is fetched and routed while the last chunks of the
previous one are still being mailed. Every guarantee above holds per recipient; at most
LOOKAHEAD_CHUNKS chunks are claimed and unsettled at once.
The routing of 1 (and when paused partitions resume) and the checks right before each SMTP
transaction are pure functions of services/sender/decisions.py; this module reads the clocks
and the control state for them and carries their decisions out.
A failure in 2, 4, 5 or 6 raises before the commit: the batches not committed are redelivered
and the ledger decides what is mailed again. A stop request ends fetching: the batches already
fetched complete (mailed, settled, published, committed). A rebalance first completes the
same way (in the revoke callback), so partitions move on with their outcomes committed.

Control (pause / resume / cancel) comes from a `ControlFeed` over all of campaign.events, and
contacts suppressed, unsubscribed or deleted after hydration from a `DoNotMailFeed` over all
of contacts.events (they end as RecipientSkipped with that reason); the sender starts
consuming recipients only once both feeds have caught up.

Outages: a PostgreSQL outage is waited out by the send ledger (claims and settlements retried
on a new connection, see ledger.py), a broker outage by the publisher (delivery events kept
until the broker takes them, see publisher.py) and the consumer (which reconnects by itself);
the sender resumes on its own. A stop request during an outage ends the sender within a few
seconds, without committing what was not published (it is redelivered; the ledger replays it).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, assert_never

import structlog
from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

from schemas.events import (
    RecipientQueued,
    RecipientRetryScheduled,
)
from services.common import metrics
from services.common.kafka import (
    CLOSE_BOUND_SECONDS,
    Stopping,
    begin_close,
    consumer_config,
    is_fatal,
    producer_config,
)
from services.common.membership import register, unregister
from services.common.settings import Settings
from services.common.topics import (
    HELD,
    RECIPIENTS,
    RETRY_TIERS,
    topic_name,
)
from services.sender.control import Control, ControlBoard, ControlFeed
from services.sender.decisions import (
    Act,
    Book,
    Bounds,
    DeadLetter,
    Defer,
    Forward,
    Hold,
    Park,
    Recipient,
    Send,
    Skip,
    Sweeps,
    Throttle,
    WaitForRelease,
    WaitUntil,
    booked,
    poll_timeout,
    pre_send,
    read,
    route,
    skip_reason,
    swept,
    wake,
)
from services.sender.delivery import Outcome, Status, judge_attempt, transient
from services.sender.do_not_mail import DoNotMailFeed, DoNotMailList
from services.sender.feeds import TopicFeed
from services.sender.held_gauge import HeldGauge
from services.sender.ledger import Claim, ClaimState, LedgerEntry, LedgerKey, SendLedger
from services.sender.list_unsubscribe import ListUnsubscribe
from services.sender.mail_lanes import MailLanes
from services.sender.mime import build_mail
from services.sender.pipeline import BatchReport, PartitionKey, SendPipeline
from services.sender.publisher import FLUSH_TIMEOUT_SECONDS, STOP_FLUSH_SECONDS, DeliveryPublisher
from services.sender.render import render
from services.sender.retries import RetryPolicy
from services.sender.smtp_pool import SmtpPool
from services.sender.throttle import RateLimiter
from services.sender.transport import MailTransport
from services.sender.work import SenderStats, Work

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
# The consumer's local prefetch queue (see _consumer_config): records per partition and an
# overall size cap. Bounds memory whatever the backlog; ~4 MiB is several batches of
# recipients, so a fetch round trip never leaves the SMTP threads without work.
PREFETCH_RECORDS_PER_PARTITION = BATCH_SIZE
PREFETCH_KBYTES = 4096
# Per fetch response: per partition and overall (librdkafka wants the overall size at least
# its message.max.bytes, 1 MB by default).
FETCH_PARTITION_BYTES = 256 * 1024
FETCH_MAX_BYTES = 2 * 1024 * 1024
# A fetch is answered once this much is ready, or after FETCH_WAIT_MS: while the hydrator
# streams recipients in, the broker otherwise answers each fetch as soon as a single record
# arrives (hundreds of small fetch round trips a second, CPU in the broker and in this
# process); ~64 KiB is a few hundred recipients, and 100 ms is nothing next to a batch.
FETCH_MIN_BYTES = 64 * 1024
FETCH_WAIT_MS = 100
# A crashed sender's partitions wait this long before another sender takes them over: short,
# so a SIGKILLed instance stalls its recipients for seconds, not the broker's default 45 s.
SESSION_TIMEOUT_MS = 10_000
# A release is followed by a second sweep of the blocked held partitions this much later: a
# sender that had not seen a resume yet may still have parked a record of that campaign
# behind a campaign that stays paused (every sender sees a change within ~1 s).
RESWEEP_SECONDS = 3.0
# Metadata look-ups (watermarks): guards against a broker that does not answer.
METADATA_TIMEOUT_SECONDS = 10.0
# Waiting for the feeds (control, do-not-mail) to catch up before the first recipient: a
# broker that cannot serve them for this long is an error, not a reason to mail blind.
CONTROL_CATCH_UP_SECONDS = 120.0
# Recipients claimed, mailed and settled together within a batch: the ledger round trips stay
# a few per batch, while a crash leaves at most LOOKAHEAD_CHUNKS x this many claims unsettled
# (each counted as a possible duplicate when redelivered).
LEDGER_CHUNK = 100
# Chunks claimed ahead: the one being mailed and the next one queued behind it, so the SMTP
# threads never wait for a ledger round trip, a settlement or a flush.
LOOKAHEAD_CHUNKS = 2
# How long a fetch waits while mail is in flight: short, so finished chunks are reaped (and
# the next one claimed) promptly when no new records arrive.
BUSY_POLL_SECONDS = 0.02
# Longest a send thread waits for its rate-limit slot, and latest (into the batch) a slot may
# be: beyond either, the recipient goes to a delay topic for that slot instead, so a tight
# limit neither stretches a batch (and the partitions it holds) towards max.poll.interval.ms
# nor runs into the batch deadline, which would count as a failed attempt.
MAX_THROTTLE_WAIT_SECONDS = 2.0
THROTTLED_BATCH_SECONDS = 5.0
# A throttled recipient is taken back from its delay topic this long before its slot and its
# send thread waits for the slot there: the way back (pause, resume, fetch) takes some tenths
# of a second, and a paid slot is only good at its time. One that comes back after its slot
# anyway (a later slot of another batch or instance at the head of its delay partition holds
# it up: median 1.6 s late in test_sender_limits' extreme setting) books a new one: spent
# late, on top of the messages booked for that moment, the old one would go over the limit
# (two instances at 40/s went 9.9 messages over the group's bucket that way).
THROTTLED_EARLY_SECONDS = 1.0


def due_at(payload: RecipientRetryScheduled) -> datetime:
    """When a delay-topic record is taken back: its retry time, or for a throttled one
    THROTTLED_EARLY_SECONDS before its slot."""
    if payload.throttled:
        return payload.retry_at - timedelta(seconds=THROTTLED_EARLY_SECONDS)
    return payload.retry_at


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
        list_unsubscribe: ListUnsubscribe | None = None,
    ) -> None:
        if concurrency < 1 or batch_size < 1:
            raise ValueError("concurrency and batch_size must be at least 1")
        self.settings = settings
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.policy = policy or RetryPolicy()
        self.limiter = limiter or RateLimiter()
        self.list_unsubscribe = list_unsubscribe
        # Builds the SMTP side for `concurrency` connections: one relay by default.
        self._transport_factory = transport or (
            lambda size: SmtpPool(settings.smtp_host, settings.smtp_port, size))
        # Partitions of the subscribed topics this instance owns, of how many: its share of
        # the group's rate limits.
        self._assigned: set[PartitionKey] = set()
        self._group_member = register(settings.group("sender"))  # for /readyz
        self._partitions_total = 0
        self.stats = SenderStats()
        self.board = ControlBoard()
        self.do_not_mail = DoNotMailList()
        self._recipients_topic = topic_name(RECIPIENTS, settings)
        self._retry_topics = [topic_name(t, settings) for t in RETRY_TIERS]
        self._held_topic = topic_name(HELD, settings)
        self._rng = random.Random()  # noqa: S311 - backoff jitter, not security
        # Delay partitions paused until their head record is due.
        self._due_at: dict[PartitionKey, datetime] = {}
        # Held partitions paused until a campaign is released (resumed or cancelled); sweeps:
        # held partition -> end offset up to which records of still-paused campaigns are
        # parked again instead of blocking (once per release, so a long pause costs nothing).
        self._held_blocked: set[PartitionKey] = set()
        self._sweep_until: dict[PartitionKey, int] = {}
        self._sweeps = Sweeps(seen=0)
        # The pipeline of the running loop: a rebalance drains it before partitions move.
        self._pipeline: SendPipeline[Work] | None = None

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
        except Stopping as exc:
            # Stopped while the broker or the database was away: what was not published is
            # not committed, so it is redelivered (and replayed from the ledger).
            log.warning("stopping while waiting for the broker or the database",
                        waiting_for=str(exc))
        finally:
            for feed in feeds:
                feed.request_stop()
            for feed in feeds:  # their closes run side by side
                feed.stop()

    def _await_feeds(self, feeds: list[TopicFeed], stop_event: threading.Event) -> bool:
        deadline = time.monotonic() + CONTROL_CATCH_UP_SECONDS
        while not all(feed.caught_up.wait(0.1) for feed in feeds):
            _check(feeds)
            if stop_event.is_set():
                return False
            if time.monotonic() > deadline:
                raise TimeoutError("feeds did not catch up with campaign.events / contacts.events")
        self._sweeps = Sweeps(seen=self.board.released)
        return True

    def _run(self, feeds: list[TopicFeed], stop_event: threading.Event) -> None:
        ledger = SendLedger(self.settings.database_url, stop=stop_event)
        pool = self._transport_factory(self.concurrency)
        producer = Producer(self._producer_config())
        publisher = DeliveryPublisher(producer, self.settings, self.stats, stop_event)
        consumer = Consumer(self._consumer_config())
        lanes = MailLanes(self.concurrency, name="sender-smtp")
        topics = [self._recipients_topic, *self._retry_topics, self._held_topic]
        metadata = consumer.list_topics(timeout=METADATA_TIMEOUT_SECONDS).topics
        self._partitions_total = sum(len(metadata[t].partitions) for t in topics if t in metadata)
        consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                           on_lost=self._on_revoke)
        log.info("sender started", topics=topics, group=self.settings.group("sender"),
                 smtp=f"{self.settings.smtp_host}:{self.settings.smtp_port}",
                 concurrency=self.concurrency)
        pipeline = SendPipeline(_SenderSteps(self, ledger, pool, publisher, consumer), lanes,
                                chunk_size=LEDGER_CHUNK, lookahead=LOOKAHEAD_CHUNKS)
        self._pipeline = pipeline
        heartbeat = self.settings.heartbeat()
        lag = metrics.LagSampler()
        held = HeldGauge(self.settings.kafka_bootstrap_servers)
        try:
            while not stop_event.is_set():
                heartbeat.beat()
                lag.sample(consumer)
                held.sample(self._held_blocked | self._due_at.keys())
                _check(feeds)
                self._wake(consumer)
                if not pipeline.wants_records(self.batch_size):
                    pipeline.step(block=True)  # enough queued: wait for the oldest chunk
                    continue
                timeout = self._poll_timeout()
                if pipeline.busy:
                    timeout = min(timeout, BUSY_POLL_SECONDS)
                records = consumer.consume(self.batch_size, timeout)
                if records:
                    _count_consumed(records)
                    work, done = self._route(records, consumer, publisher, held)
                    pipeline.add(_fair(work), _positions(done + [w.record for w in work]),
                                 records=len(work))
                pipeline.step(block=False)
            pipeline.drain()
        finally:
            # The feeds close while this loop's own clients do.
            for feed in feeds:
                feed.request_stop()
            # No draining from the revoke callback once the loop is left (after a failure the
            # batches not committed are redelivered instead).
            self._pipeline = None
            # Close the consumer first: it leaves the group now, so the partitions move to
            # another sender without waiting for a session timeout. The other clients close
            # meanwhile, so a broker outage costs one bound, not the sum of several.
            closing = begin_close(consumer.close, "sender consumer")
            closing_began = time.monotonic()
            # Mails queued but not started are dropped: their claims stay unsettled and count
            # as possible duplicates when redelivered (never under-counted).
            lanes.shutdown(cancel=True)
            pool.close()
            # Anything parked or published after a failure (briefly when asked to stop).
            producer.flush(STOP_FLUSH_SECONDS if stop_event.is_set() else FLUSH_TIMEOUT_SECONDS)
            ledger.close()
            closing.wait(CLOSE_BOUND_SECONDS - (time.monotonic() - closing_began))
            unregister(self._group_member)
            log.info("sender stopped", **vars(self.stats))

    def _poll_timeout(self) -> float:
        return poll_timeout(self._due_at.values(), now=datetime.now(UTC),
                            longest=POLL_TIMEOUT_SECONDS)

    def _wake(self, consumer: Consumer) -> None:
        """Resume delay partitions whose head is due, and held partitions after a campaign was
        released (with a sweep up to their current end)."""
        woken = wake(self._due_at, self._sweeps, now=datetime.now(UTC),
                     released=self.board.released, clock=time.monotonic())
        due = list(woken.due)
        for where in due:
            del self._due_at[where]
        if woken.sweep:
            try:
                highs = {where: consumer.get_watermark_offsets(
                    TopicPartition(*where), timeout=METADATA_TIMEOUT_SECONDS, cached=False)[1]
                    for where in self._held_blocked}
            except KafkaException as exc:  # broker away: sweep at a later turn of the loop
                log.warning("held partitions not swept yet", error=str(exc))
                highs = None
            if highs is not None:
                self._sweeps = swept(self._sweeps, released=self.board.released,
                                     clock=time.monotonic(), resweep_seconds=RESWEEP_SECONDS)
                self._sweep_until.update(highs)
                due.extend(self._held_blocked)
                self._held_blocked.clear()
        if due:
            consumer.resume([TopicPartition(t, p) for t, p in due])

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned.update((tp.topic, tp.partition) for tp in partitions)
        self._group_member.assigned(partitions)
        self._reshare()

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self._pipeline is not None:
            # Finish and commit what was fetched before the partitions move: their next owner
            # then starts after it instead of racing this sender on the same recipients.
            self._pipeline.drain()
        for tp in partitions:
            where = (tp.topic, tp.partition)
            self._assigned.discard(where)
            self._due_at.pop(where, None)
            self._held_blocked.discard(where)
            self._sweep_until.pop(where, None)
        self._group_member.revoked()
        self._reshare()

    def _reshare(self) -> None:
        if self._partitions_total:
            share = len(self._assigned) / self._partitions_total
            self.limiter.set_share(share, time.monotonic())
            log.info("partitions assigned", partitions=len(self._assigned), share=round(share, 3))

    # --- 1. routing ------------------------------------------------------------------------

    def _route(
        self, records: list[Message], consumer: Consumer, publisher: DeliveryPublisher,
        held: HeldGauge,
    ) -> tuple[list[Work], list[Message]]:
        """Split a batch into recipients to act on and records already dealt with (invalid,
        excluded, parked); pauses partitions whose head must wait."""
        work: list[Work] = []
        done: list[Message] = []
        waiting: set[PartitionKey] = set()
        now = datetime.now(UTC)
        for record in records:
            error = record.error()
            if error is not None:
                if is_fatal(error):
                    raise KafkaException(error)
                log.warning("consumer error", error=str(error))
                continue
            where = (record.topic() or "", record.partition() or 0)
            if where in waiting:
                continue  # behind a record that waits: fetched again after the resume
            self.stats.records += 1
            found = read(record.value(), now)
            if isinstance(found, DeadLetter):
                publisher.dead_letter(record, found.reason)
            if not isinstance(found, Recipient):
                done.append(record)
                continue
            recipient, payload = found.recipient, found.payload
            control = self.board.state(recipient.campaign_id)
            item = Work(record, found.envelope, payload, recipient, found.attempt,
                        found.first_attempt_at,
                        self._skip_reason(control, found.envelope.tenant_id, recipient), found.slot)
            offset = record.offset() or 0
            step = route(control, from_held=where[0] == self._held_topic,
                         due=due_at(payload) if isinstance(payload, RecipientRetryScheduled) else None,
                         now=now, offset=offset, sweep_until=self._sweep_until.get(where, -1))
            match step:
                case Act():
                    work.append(item)
                case Park(again=again):
                    publisher.park(record)
                    if not again:
                        self.stats.held += 1
                    done.append(record)
                case Forward():
                    publisher.forward(record, item.attempt)
                    done.append(record)
                case WaitUntil(due=due):
                    self._due_at[where] = due
                    waiting.add(where)
                    _pause_at(consumer, held, where, offset)
                case WaitForRelease():
                    self._held_blocked.add(where)
                    waiting.add(where)
                    _pause_at(consumer, held, where, offset)
                case _:
                    assert_never(step)
        return work, done

    def _skip_reason(self, control: Control, tenant_id: str,
                     recipient: RecipientQueued) -> str | None:
        return skip_reason(control, self.do_not_mail.reason(tenant_id, recipient.contact_id))

    # --- 2..5. one recipient (the pipeline's steps call these) ---------------------------

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
        tenant = item.envelope.tenant_id
        control = self.board.state(recipient.campaign_id)
        now = datetime.now(UTC)
        # Read when called: a test narrows the in-thread wait by patching the module constant.
        bounds = Bounds(BATCH_DEADLINE_SECONDS, MAX_THROTTLE_WAIT_SECONDS, THROTTLED_BATCH_SECONDS,
                        THROTTLED_EARLY_SECONDS)
        check = pre_send(control, self._skip_reason(control, tenant, recipient), now=now,
                         clock=time.monotonic(), started=started, slot=item.slot,
                         limited=self.limiter.active, bounds=bounds)
        if isinstance(check, Book):
            clock = time.monotonic()
            wait = self.limiter.book(tenant, pool.server_for(recipient.template.from_address), clock)
            check = booked(wait, clock=clock, started=started, now=now, bounds=bounds)
        match check:
            case Hold():
                return Outcome(Status.HELD, item.attempt)
            case Skip(reason=reason):
                return Outcome(Status.SKIPPED, item.attempt, detail=reason)
            case Defer(reason=reason):
                return transient(item.attempt, None, reason, first_attempt_at=item.first_attempt_at,
                                 now=now, policy=self.policy, draw=self._rng.random())
            case Throttle(retry_at=retry_at):
                return Outcome(Status.THROTTLED, item.attempt, retry_at=retry_at)
            case Send(wait=wait):
                if wait > 0:
                    time.sleep(wait)  # a send thread pacing itself; the consumer loop is free
                    now = datetime.now(UTC)
            case _:
                assert_never(check)
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

    # --- 6. commit -------------------------------------------------------------------------

    def _commit(self, consumer: Consumer, positions: Mapping[PartitionKey, int]) -> None:
        offsets = [TopicPartition(t, p, offset) for (t, p), offset in positions.items()]
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
                # Prefetch a few batches, not librdkafka's default of 100,000 records per
                # partition up to 64 MiB: behind a large backlog that queue alone made the
                # sender's memory grow with the campaign (94 MiB at 20,000 recipients, 247 MiB
                # at 200,000). A few MiB still hold seconds of mail at full speed.
                "queued.min.messages": PREFETCH_RECORDS_PER_PARTITION,
                "queued.max.messages.kbytes": PREFETCH_KBYTES,
                # One fetch response is up to 1 MiB of compressed records per partition (12 MiB
                # over campaign.recipients, several times that decompressed), which the queue
                # cap above does not bound: keep responses small too.
                "max.partition.fetch.bytes": FETCH_PARTITION_BYTES,
                "fetch.max.bytes": FETCH_MAX_BYTES,
                "fetch.min.bytes": FETCH_MIN_BYTES,
                "fetch.wait.max.ms": FETCH_WAIT_MS,
            },
        )

    def _producer_config(self) -> dict[str, Any]:
        # Shared settings: idempotent (a producer retry cannot double a delivery event),
        # acks=all, and the murmur2 partitioner that keeps campaign-keyed topics co-partitioned.
        # No record is ever given up for time (0: no local timeout): a delivery event waits
        # out a broker outage of any length in the producer, and the flush before each commit
        # waits for it (publisher.py).
        return producer_config(self.settings, **{"message.timeout.ms": 0})


class _SenderSteps:
    """The worker's steps as the send pipeline calls them (see services/sender/pipeline.py)."""

    def __init__(self, worker: SenderWorker, ledger: SendLedger, pool: MailTransport,
                 publisher: DeliveryPublisher, consumer: Consumer) -> None:
        self._worker = worker
        self._ledger = ledger
        self._pool = pool
        self._publisher = publisher
        self._consumer = consumer

    def claim(self, items: Sequence[Work]) -> Mapping[LedgerKey, Claim]:
        claims = self._ledger.claim([_ledger_entry(item) for item in items])
        for item in items:
            if claims[item.key].state is ClaimState.UNSETTLED:
                log.warning("possible duplicate: claimed but never settled, mailing again",
                            campaign_id=item.recipient.campaign_id,
                            contact_id=item.recipient.contact_id, attempt=item.attempt)
        return claims

    def mail(self, item: Work, started: float) -> Outcome:
        return self._worker._mail(item, self._pool, started)

    def settle(self, outcomes: Mapping[LedgerKey, Outcome]) -> None:
        self._ledger.settle(outcomes)

    def publish(self, item: Work, claim: Claim, fresh: Outcome | None) -> None:
        worker = self._worker
        outcome = (fresh.with_ambiguous(claim.ambiguous) if fresh is not None
                   else worker._recorded(item, claim))
        if outcome is not None:
            self._publisher.publish(item, outcome, fresh=fresh is not None)

    def commit(self, positions: Mapping[PartitionKey, int]) -> None:
        self._publisher.flush()
        self._worker._commit(self._consumer, positions)

    def batch_done(self, report: BatchReport) -> None:
        self._worker.stats.batches += 1
        metrics.BATCH_SIZE.observe(report.records)
        metrics.BATCH_SECONDS.observe(report.seconds)
        log.info("batch done", records=report.records, recipients=report.recipients,
                 mailed=report.mailed, seconds=round(report.seconds, 3))


def _positions(records: list[Message]) -> dict[PartitionKey, int]:
    """The next offset to commit per partition once `records` are dealt with."""
    positions: dict[PartitionKey, int] = {}
    for record in records:
        where = (record.topic() or "", record.partition() or 0)
        positions[where] = max(positions.get(where, 0), (record.offset() or 0) + 1)
    return positions


def _count_consumed(records: list[Message]) -> None:
    counts: dict[str, int] = {}
    for record in records:
        topic = record.topic() or ""
        counts[topic] = counts.get(topic, 0) + 1
    for topic, count in counts.items():
        metrics.RECORDS_CONSUMED.labels(topic=topic).inc(count)


def _pause_at(consumer: Consumer, held: HeldGauge, where: PartitionKey, offset: int) -> None:
    """Pause a partition at the record that waits: it is fetched again after the resume."""
    consumer.pause([TopicPartition(*where)])
    consumer.seek(TopicPartition(*where, offset))
    held.paused_at(where, offset)


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


def _ledger_entry(item: Work) -> LedgerEntry:
    recipient = item.recipient
    return LedgerEntry(recipient.campaign_id, recipient.contact_id, item.envelope.tenant_id,
                       item.message_id, item.attempt, item.skip is not None)

