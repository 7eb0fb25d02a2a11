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
chunk is claimed while the current one is mailed, the SMTP threads take mails in groups of
up to MAIL_GROUP, one transaction after the other on one session (no barrier per chunk; one
by one under a rate limit), and the next batch is fetched and routed while the last chunks of the
previous one are still being mailed. Every guarantee above holds per recipient; at most
LOOKAHEAD_CHUNKS chunks are claimed and unsettled at once.
Every rule is a pure function of services/sender/decisions.py; small modules carry them out:
routing.py (1), waiting.py (paused partitions, their resume and sweeps), mailer.py (the check
right before each SMTP transaction, and the transaction), steps.py (2-6, as the pipeline calls
them). This module is the loop; its adapters (clients, ledger, SMTP transport, feeds, retry
policy, rate limiter, List-Unsubscribe signer, held gauge) are built by the one wiring point,
services/sender/__main__.py, and passed in.
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

import threading
import time

import structlog
from confluent_kafka import Consumer, Message, Producer, TopicPartition

from services.common import metrics
from services.common.kafka import CLOSE_BOUND_SECONDS, PartitionKey, Stopping, begin_close
from services.common.membership import register, unregister
from services.common.settings import Settings
from services.common.topics import HELD, RECIPIENTS, RETRY_TIERS, topic_name
from services.sender.clients import BATCH_SIZE
from services.sender.control import ControlFeed
from services.sender.decisions import Bounds, fair
from services.sender.do_not_mail import DoNotMailFeed
from services.sender.feeds import TopicFeed
from services.sender.held_gauge import HeldGauge
from services.sender.ledger import SendLedger
from services.sender.list_unsubscribe import ListUnsubscribe
from services.sender.mail_lanes import MailLanes
from services.sender.mailer import SEND_BOUNDS, Mailer
from services.sender.marks import MailMarks
from services.sender.pipeline import SendPipeline
from services.sender.publisher import FLUSH_TIMEOUT_SECONDS, STOP_FLUSH_SECONDS, DeliveryPublisher
from services.sender.retries import RetryPolicy
from services.sender.routing import RecipientRouter
from services.sender.steps import SenderSteps
from services.sender.throttle import RateLimiter
from services.sender.transport import MailTransport
from services.sender.waiting import WaitingPartitions
from services.sender.work import SenderStats, Work

log = structlog.get_logger("sender")

# How long consume() waits for a batch to fill; it also bounds how long an idle sender takes
# to notice a stop request, and how late a due delay partition is resumed.
POLL_TIMEOUT_SECONDS = 0.5
# Metadata look-ups (the topics' partitions): guards against a broker that does not answer.
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
# Recipients one SMTP thread mails together (one job, one pooled session, one transaction
# after the other): fewer thread wake-ups, GIL hand-offs and pool check-outs per mail. A chunk
# is spread over the threads first, so smaller groups when there are few mails. Not under a
# rate limit: there mails wait for their slots, and one in a group would wait behind the
# others' (a throttled recipient back for its booked slot would miss it and book again).
MAIL_GROUP = 16
# How long a fetch waits while mail is in flight: short, so finished chunks are reaped (and
# the next one claimed) promptly when no new records arrive.
BUSY_POLL_SECONDS = 0.02


class SenderWorker:
    """Consumes the recipient topics in group `sender`, mails each recipient and publishes its
    delivery on campaign.deliveries: at-least-once events, at-most-once mail per attempt
    except for ambiguous SMTP outcomes, which are counted. The worker owns the adapters passed
    in: `run` starts the feeds and closes every client when it returns."""

    def __init__(
        self,
        settings: Settings,
        *,
        consumer: Consumer,
        producer: Producer,
        ledger: SendLedger,
        transport: MailTransport,
        control: ControlFeed,
        do_not_mail: DoNotMailFeed,
        held: HeldGauge,
        policy: RetryPolicy,
        limiter: RateLimiter,
        list_unsubscribe: ListUnsubscribe | None,
        concurrency: int = 8,
        batch_size: int = BATCH_SIZE,
        bounds: Bounds = SEND_BOUNDS,
        marks: MailMarks | None = None,
    ) -> None:
        if concurrency < 1 or batch_size < 1:
            raise ValueError("concurrency and batch_size must be at least 1")
        self.settings = settings
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.limiter = limiter
        self.stats = SenderStats()
        self.board = control.board
        self._consumer, self._producer, self._ledger = consumer, producer, ledger
        self._transport, self._policy, self._bounds = transport, policy, bounds
        self._feeds: list[TopicFeed] = [control, do_not_mail]
        self._do_not_mail = do_not_mail.flags
        self._mailer = Mailer(transport, board=self.board, do_not_mail=do_not_mail.flags,
                              limiter=limiter, policy=policy, list_unsubscribe=list_unsubscribe,
                              bounds=bounds, marks=marks)
        self._waiting = WaitingPartitions(consumer, self.board, held)
        self._topics = [topic_name(RECIPIENTS, settings),
                        *(topic_name(t, settings) for t in RETRY_TIERS), topic_name(HELD, settings)]
        # Partitions of the subscribed topics this instance owns, of how many: its share of
        # the group's rate limits.
        self._assigned: set[PartitionKey] = set()
        self._partitions_total = 0
        self._group_member = register(settings.group("sender"))  # for /readyz
        # The pipeline of the running loop: a rebalance drains it before partitions move.
        self._pipeline: SendPipeline[Work] | None = None

    def run(self, stop_event: threading.Event) -> None:
        """Process batches until `stop_event` is set; the batch in flight then completes."""
        lanes = MailLanes(self.concurrency, name="sender-smtp")
        try:
            for feed in self._feeds:
                feed.start()
            if self._await_feeds(stop_event):
                self._loop(stop_event, lanes)
        except Stopping as exc:
            # Stopped while the broker or the database was away: what was not published is
            # not committed, so it is redelivered (and replayed from the ledger).
            log.warning("stopping while waiting for the broker or the database",
                        waiting_for=str(exc))
        finally:
            self._close(stop_event, lanes)

    def _await_feeds(self, stop_event: threading.Event) -> bool:
        deadline = time.monotonic() + CONTROL_CATCH_UP_SECONDS
        while not all(feed.caught_up.wait(0.1) for feed in self._feeds):
            _check(self._feeds)
            if stop_event.is_set():
                return False
            if time.monotonic() > deadline:
                raise TimeoutError("feeds did not catch up with campaign.events / contacts.events")
        self._waiting.begin()
        return True

    def _loop(self, stop_event: threading.Event, lanes: MailLanes) -> None:
        consumer = self._consumer
        publisher = DeliveryPublisher(self._producer, self.settings, self.stats, stop_event)
        router = RecipientRouter(publisher, self._waiting, board=self.board,
                                 do_not_mail=self._do_not_mail, stats=self.stats,
                                 held_topic=self._topics[-1], early=self._bounds.throttled_early)
        steps = SenderSteps(self._ledger, self._mailer, publisher, consumer, stats=self.stats,
                            policy=self._policy)
        pipeline = SendPipeline(steps, lanes, chunk_size=LEDGER_CHUNK, lookahead=LOOKAHEAD_CHUNKS,
                                group=1 if self.limiter.active else MAIL_GROUP,
                                spread=self.concurrency)
        metadata = consumer.list_topics(timeout=METADATA_TIMEOUT_SECONDS).topics
        self._partitions_total = sum(len(metadata[t].partitions)
                                     for t in self._topics if t in metadata)
        consumer.subscribe(self._topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                           on_lost=self._on_revoke)
        log.info("sender started", topics=self._topics, group=self.settings.group("sender"),
                 smtp=f"{self.settings.smtp_host}:{self.settings.smtp_port}",
                 concurrency=self.concurrency)
        self._pipeline = pipeline
        heartbeat = self.settings.heartbeat()
        lag = metrics.LagSampler()
        while not stop_event.is_set():
            heartbeat.beat()
            lag.sample(consumer)
            self._waiting.sample()
            _check(self._feeds)
            self._waiting.wake()
            if not pipeline.wants_records(self.batch_size):
                pipeline.step(block=True)  # enough queued: wait for the oldest chunk
                continue
            longest = BUSY_POLL_SECONDS if pipeline.busy else POLL_TIMEOUT_SECONDS
            records = consumer.consume(self.batch_size, self._waiting.poll_timeout(longest))
            if records:
                _count_consumed(records)
                work, done = router.route(records)
                pipeline.add(fair(work, lambda w: w.envelope.tenant_id),
                             _positions(done + [w.record for w in work]), records=len(work))
            pipeline.step(block=False)
        pipeline.drain()

    def _close(self, stop_event: threading.Event, lanes: MailLanes) -> None:
        # The feeds close while this loop's own clients do.
        for feed in self._feeds:
            feed.request_stop()
        # No draining from the revoke callback once the loop is left (after a failure the
        # batches not committed are redelivered instead).
        self._pipeline = None
        # Close the consumer first: it leaves the group now, so the partitions move to another
        # sender without waiting for a session timeout. The other clients close meanwhile, so
        # a broker outage costs one bound, not the sum of several.
        closing = begin_close(self._consumer.close, "sender consumer")
        closing_began = time.monotonic()
        # Mails queued but not started are dropped: their claims stay unsettled and count as
        # possible duplicates when redelivered (never under-counted). A group already running
        # finishes (at most MAIL_GROUP transactions per thread).
        lanes.shutdown(cancel=True)
        self._transport.close()
        # Anything parked or published after a failure (briefly when asked to stop).
        self._producer.flush(STOP_FLUSH_SECONDS if stop_event.is_set() else FLUSH_TIMEOUT_SECONDS)
        self._ledger.close()
        closing.wait(CLOSE_BOUND_SECONDS - (time.monotonic() - closing_began))
        for feed in self._feeds:  # their closes run side by side
            feed.stop()
        unregister(self._group_member)
        log.info("sender stopped", **vars(self.stats))

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned.update((tp.topic, tp.partition) for tp in partitions)
        self._group_member.assigned(partitions)
        self._reshare()

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self._pipeline is not None:
            # Finish and commit what was fetched before the partitions move: their next owner
            # then starts after it instead of racing this sender on the same recipients.
            self._pipeline.drain()
        revoked = [(tp.topic, tp.partition) for tp in partitions]
        self._assigned.difference_update(revoked)
        self._waiting.forget(revoked)
        self._group_member.revoked()
        self._reshare()

    def _reshare(self) -> None:
        if self._partitions_total:
            share = len(self._assigned) / self._partitions_total
            self.limiter.set_share(share, time.monotonic())
            log.info("partitions assigned", partitions=len(self._assigned), share=round(share, 3))


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


def _check(feeds: list[TopicFeed]) -> None:
    for feed in feeds:
        if feed.error is not None:
            raise RuntimeError("a feed failed; not mailing blind") from feed.error
