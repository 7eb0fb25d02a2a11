"""Test sends ("proofs"): TestEmailRequested (campaign.events) -> SMTP -> TestEmailSent / TestEmailFailed.

A campaign's content mailed to a few given addresses (its authors, a review team) before or
while it is sent, with "[TEST] " before the subject, personalised with the sample contact
fields of the request. It never touches the campaign's audience: nothing goes to
campaign.recipients or campaign.deliveries, so read-model counters and completion see nothing.

Outcomes go to campaign.events, next to the request (keyed by campaign id, caused by it): they
are campaign-level facts, not recipient deliveries. campaign.deliveries is the hot per-recipient
stream the completion tracker and the projector's counters fold; keeping test outcomes off it
means no consumer of deliveries can ever count one as an audience delivery, and whoever asked
for the test (the CLI) finds its outcome on the one partition the request is on.

Delivery guarantee: at most one mail per address and test send. Each address is claimed in the
send ledger (key `test/<test id>`, address: the "/" cannot occur in a campaign id, so no row of
a real send is ever touched) before its SMTP transaction and settled after it; a request read
again (crash, rebalance) re-publishes the recorded outcome instead of mailing, and an address
claimed but never settled (a sender that died mid-send) is not mailed again but reported failed
and ambiguous. Each mail is tried once (no retries: a person is waiting for it; a failure is
reported at once and the test can be sent again). Outcome events are published at least once
(copies alike), then the consumed offsets are committed.

Runs in the sender process on its own thread, consumer group `sender-test-sends` over
campaign.events, so a sender group of N replicas mails each test once. A group without
committed offsets (the first start) reads campaign.events from the beginning: requests handled
before are answered from the ledger (outcomes re-published), never mailed again. Test mails book no rate
limit: a request holds at most 25 addresses.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from schemas.envelope import Envelope, SchemaViolation, decode, encode, wrap_caused_by
from schemas.events import RecipientQueued, TestEmailFailed, TestEmailRequested, TestEmailSent
from services.common import metrics
from services.common.kafka import close_within, consumer_config, is_fatal, producer_config
from services.common.settings import Settings
from services.common.topics import EVENTS, topic_name
from services.sender.delivery import Outcome, Status
from services.sender.ledger import Claim, ClaimState, LedgerEntry, LedgerKey, SendLedger
from services.sender.mime import OutgoingMail, build_mail
from services.sender.render import render
from services.sender.replies import Attempt, Verdict
from services.sender.transport import MailTransport

log = structlog.get_logger("sender.proof_mail")

GROUP = "sender-test-sends"
SUBJECT_PREFIX = "[TEST] "
# Most campaign.events records are not test requests: a look at the raw bytes skips them
# without a full decode (a CampaignSendRequested may hold 100,000 contact ids).
_REQUEST_TYPE = re.compile(rb'"type"\s*:\s*"TestEmailRequested"')
# How long one consume() waits: bounds how late a stop request is noticed.
POLL_SECONDS = 0.5
# Guards against a broker that cannot take the outcome events: the batch is then not
# committed and the worker stops (a restart reads it again; the ledger prevents re-mailing).
FLUSH_TIMEOUT_SECONDS = 30.0
# SMTP connections of test sends: a request has at most 25 addresses, a few in parallel
# keep a slow relay from making the tester wait for 25 round trips in a row.
CONNECTIONS = 4


def ledger_campaign(test_id: object) -> str:
    """The send ledger's campaign key of a test send (never a real campaign id)."""
    return f"test/{test_id}"


def message_id_of_test(test_id: object, address: str, from_address: str) -> str:
    """The deterministic Message-ID of a test mail: `<test+{test id}.{address hash}@{domain}>`.
    A real send's id is `<{campaign id}.{contact id}@{domain}>`, and neither id can contain a
    "+", so a test mail's id never equals a real one."""
    digest = hashlib.blake2b(address.encode(), digest_size=6).hexdigest()
    domain = from_address.rpartition("@")[2]
    return f"<test+{str(test_id).replace('-', '')}.{digest}@{domain}>"


def build_test_mail(request: TestEmailRequested, campaign_id: str, address: str,
                    now: datetime) -> OutgoingMail:
    """The test mail of one address: the campaign's template, "[TEST] " before the subject,
    personalised with the sample contact, with its own Message-ID and an X-Test-Send header."""
    template = request.template.model_copy(
        update={"subject": SUBJECT_PREFIX + request.template.subject})
    recipient = RecipientQueued.model_construct(
        campaign_id=campaign_id, contact_id="test", email=address,
        first_name=request.sample.first_name, last_name=request.sample.last_name,
        attributes=dict(request.sample.attributes), template=template)
    mail = build_mail(recipient, render(recipient), now, [("X-Test-Send", str(request.test_id))])
    message_id = message_id_of_test(request.test_id, address, template.from_address)
    old = f"\r\nMessage-ID: {mail.message_id}\r\n".encode()
    if old not in mail.content:
        raise RuntimeError("Message-ID header not found in the built message")
    content = mail.content.replace(old, f"\r\nMessage-ID: {message_id}\r\n".encode(), 1)
    return replace(mail, message_id=message_id, content=content)


def outcome_event(request: TestEmailRequested, address: str, outcome: Outcome,
                  message_id: str) -> TestEmailSent | TestEmailFailed:
    """The event reporting one address's outcome (pure: a re-published outcome is alike)."""
    if outcome.status is Status.SENT:
        return TestEmailSent(test_id=request.test_id, email=address, message_id=message_id,
                             smtp_reply=outcome.detail)
    return TestEmailFailed(test_id=request.test_id, email=address,
                           reason=outcome.detail or "unknown", permanent=outcome.permanent,
                           smtp_code=outcome.smtp_code, ambiguous=outcome.ambiguous > 0)


def judge(attempt: Attempt) -> Outcome:
    """A test mail's single attempt: sent, or failed (permanent for a 5xx)."""
    if attempt.verdict is Verdict.SENT:
        return Outcome(Status.SENT, 1, attempt.code, attempt.reply)
    return Outcome(Status.FAILED, 1, attempt.code, attempt.reply or "unknown",
                   permanent=attempt.verdict is Verdict.PERMANENT,
                   ambiguous=int(attempt.ambiguous))


# Claimed, never settled: the sender stopped mid-send. Not mailed again (at most once); the
# claim itself counted the possible copy in the ledger.
_UNKNOWN = Outcome(Status.FAILED, 1, None,
                   "outcome unknown: a sender stopped while mailing it; not mailed again")


class TestSendWorker:
    """Consumes TestEmailRequested from campaign.events (group `sender-test-sends`), mails each
    address once and publishes TestEmailSent / TestEmailFailed on campaign.events."""

    __test__ = False  # not a pytest test class

    def __init__(self, settings: Settings, transport: Callable[[int], MailTransport],
                 connections: int = CONNECTIONS) -> None:
        self.settings = settings
        self._transport_factory = transport
        self._connections = connections
        self._topic = topic_name(EVENTS, settings)
        self._publish_errors: list[str] = []
        self.mailed = 0
        self.requests = 0

    def run(self, stop: threading.Event) -> None:
        """Handle requests until `stop` is set; the batch in flight completes."""
        ledger = SendLedger(self.settings.database_url, stop=stop)
        transport = self._transport_factory(self._connections)
        producer = Producer(producer_config(self.settings))
        consumer = Consumer(consumer_config(self.settings, GROUP))
        executor = ThreadPoolExecutor(self._connections, thread_name_prefix="sender-test-smtp")
        consumer.subscribe([self._topic])
        log.info("test sends started", topic=self._topic, group=self.settings.group(GROUP))
        try:
            while not stop.is_set():
                records = consumer.consume(100, POLL_SECONDS)
                wanted = [r for r in records if self._is_request(r)]
                for record in wanted:
                    self._handle(record, ledger, transport, producer, executor)
                if records:
                    self._flush(producer)
                    self._commit(consumer, records)
        finally:
            close_within(consumer.close, "test-send consumer")
            executor.shutdown(wait=True)
            transport.close()
            producer.flush(FLUSH_TIMEOUT_SECONDS)
            ledger.close()
            log.info("test sends stopped", requests=self.requests, mailed=self.mailed)

    @staticmethod
    def _is_request(record: Message) -> bool:
        error = record.error()
        if error is not None:
            if is_fatal(error):
                raise KafkaException(error)
            log.warning("consumer error", error=str(error))
            return False
        return _REQUEST_TYPE.search(record.value() or b"") is not None

    def _handle(self, record: Message, ledger: SendLedger, transport: MailTransport,
                producer: Producer, executor: ThreadPoolExecutor) -> None:
        try:
            message = decode(record.value())
        except SchemaViolation as exc:
            log.warning("undecodable test request skipped", partition=record.partition(),
                        offset=record.offset(), reason=str(exc))
            return
        request = message.payload
        if not isinstance(request, TestEmailRequested):
            return
        cause = message.envelope
        campaign_id = cause.aggregate_id
        self.requests += 1
        now = datetime.now(UTC)
        mails: dict[str, OutgoingMail] = {}
        outcomes: dict[str, Outcome] = {}
        for address in request.addresses:
            try:
                mails[address] = build_test_mail(request, campaign_id, address, now)
            except Exception as exc:  # one address that cannot be built must not stop the rest
                log.exception("test mail not built", campaign_id=campaign_id, email=address)
                outcomes[address] = Outcome.unbuildable(1, exc)
        entries = [LedgerEntry(ledger_campaign(request.test_id), address, cause.tenant_id,
                               mail.message_id) for address, mail in mails.items()]
        claims = ledger.claim(entries)
        fresh = [a for a in mails if claims[_key(request, a)].state is ClaimState.FRESH]
        unknown = [a for a in mails if claims[_key(request, a)].state is ClaimState.UNSETTLED]
        attempts = dict(zip(fresh, executor.map(lambda a: transport.transmit(mails[a]), fresh),
                            strict=True))
        settled = {a: judge(attempt) for a, attempt in attempts.items()} | dict.fromkeys(unknown, _UNKNOWN)
        ledger.settle({_key(request, a): outcome for a, outcome in settled.items()})
        self.mailed += len(attempts)
        for address in mails:
            claim = claims[_key(request, address)]
            outcome = settled.get(address) or _recorded(claim)
            # Possible copies counted by the ledger (a claim that was never settled).
            outcomes[address] = outcome.with_ambiguous(claim.ambiguous)
        for address in request.addresses:
            message_id = mails[address].message_id if address in mails else ""
            event = outcome_event(request, address, outcomes[address], message_id)
            self._emit(producer, campaign_id, wrap_caused_by(event, cause))
        log.info("test send done", campaign_id=campaign_id, tenant=cause.tenant_id,
                 test_id=str(request.test_id), addresses=len(outcomes), mailed=len(attempts),
                 sent=sum(o.status is Status.SENT for o in outcomes.values()))

    def _emit(self, producer: Producer, campaign_id: str, envelope: Envelope) -> None:
        while True:
            try:
                producer.produce(self._topic, key=campaign_id.encode(), value=encode(envelope),
                                 on_delivery=self._on_delivery)
                metrics.count_produced(self._topic)
                return
            except BufferError:
                producer.poll(0.1)  # the local queue is full: let some records go first

    def _on_delivery(self, error: KafkaError | None, _record: Any) -> None:
        if error is not None:
            self._publish_errors.append(str(error))

    def _flush(self, producer: Producer) -> None:
        remaining = producer.flush(FLUSH_TIMEOUT_SECONDS)
        if remaining or self._publish_errors:
            errors, self._publish_errors = self._publish_errors, []
            raise RuntimeError(f"test send outcomes not published: {remaining} unconfirmed; "
                               f"errors: {errors[:3]}")

    @staticmethod
    def _commit(consumer: Consumer, records: list[Message]) -> None:
        last: dict[tuple[str, int], int] = {}
        for record in records:
            if record.error() is None:
                where = (record.topic() or "", record.partition() or 0)
                last[where] = max(last.get(where, -1), record.offset() or 0)
        if not last:
            return
        try:
            # Asynchronous: a synchronous commit waits for ever while the broker is away, and
            # the ledger makes a request read again harmless (its outcome is re-published).
            consumer.commit(offsets=[TopicPartition(t, p, o + 1) for (t, p), o in last.items()],
                            asynchronous=True)
        except KafkaException as exc:
            # A rebalance took the partitions: their next owner reads the requests again and
            # the ledger turns them into re-published outcomes, not new mail.
            log.warning("offset commit failed; requests will be read again", error=str(exc))


def _key(request: TestEmailRequested, address: str) -> LedgerKey:
    return (ledger_campaign(request.test_id), address)


def _recorded(claim: Claim) -> Outcome:
    """What an address not mailed now ends as: its recorded outcome, or unknown."""
    if claim.state is ClaimState.SETTLED and claim.outcome is not None:
        return claim.outcome
    return _UNKNOWN

