"""Steps 2-6 of a batch as the send pipeline calls them (services/sender/pipeline.py): claim in
the send ledger, mail (mailer.py), settle, publish (publisher.py), commit.

Guarantees: a claim found unsettled is logged as a possible duplicate before it is mailed
again; a recipient not mailed now publishes what the ledger holds for it (decisions.replayed),
so a redelivered copy repeats its outcome and is never mailed again; offsets are committed
only after the producer's flush returned; a commit the broker refuses (a rebalance took the
partitions) is logged, and the next owner gets the batch again, which its ledger turns into
re-published outcomes, not new mail.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

import structlog
from confluent_kafka import Consumer, KafkaException, TopicPartition

from services.common import metrics
from services.common.kafka import PartitionKey
from services.sender.decisions import replayed
from services.sender.delivery import Outcome
from services.sender.ledger import Claim, ClaimState, LedgerEntry, LedgerKey, SendLedger
from services.sender.mailer import Mailer
from services.sender.pipeline import BatchReport
from services.sender.publisher import DeliveryPublisher
from services.sender.retries import RetryPolicy
from services.sender.work import SenderStats, Work

log = structlog.get_logger("sender")


class SenderSteps:
    """The `SendSteps` of the sender: every method but `mail` runs on the consumer's thread."""

    def __init__(self, ledger: SendLedger, mailer: Mailer, publisher: DeliveryPublisher,
                 consumer: Consumer, *, stats: SenderStats, policy: RetryPolicy) -> None:
        self._ledger = ledger
        self._mailer = mailer
        self._publisher = publisher
        self._consumer = consumer
        self._stats = stats
        self._policy = policy
        self._rng = random.Random()  # noqa: S311 - backoff jitter, not security

    def claim(self, items: Sequence[Work]) -> Mapping[LedgerKey, Claim]:
        claims = self._ledger.claim([ledger_entry(item) for item in items])
        for item in items:
            if claims[item.key].state is ClaimState.UNSETTLED:
                log.warning("possible duplicate: claimed but never settled, mailing again",
                            campaign_id=item.recipient.campaign_id,
                            contact_id=item.recipient.contact_id, attempt=item.attempt)
        return claims

    def mail(self, item: Work, started: float) -> Outcome:
        return self._mailer.mail(item, started)

    def mail_many(self, items: Sequence[Work], started: float) -> list[Outcome]:
        return self._mailer.mail_many(items, started)

    def settle(self, outcomes: Mapping[LedgerKey, Outcome]) -> None:
        self._ledger.settle(outcomes)

    def publish(self, item: Work, claim: Claim, fresh: Outcome | None) -> None:
        if fresh is not None:
            self._publisher.publish(item, fresh.with_ambiguous(claim.ambiguous), fresh=True)
            return
        if claim.state is ClaimState.SETTLED:
            self._stats.replayed += 1
        outcome = replayed(claim, item.attempt, item.skip, now=datetime.now(UTC),
                           policy=self._policy, draw=self._rng.random())
        if outcome is not None:
            self._publisher.publish(item, outcome, fresh=False)

    def commit(self, positions: Mapping[PartitionKey, int]) -> None:
        self._publisher.flush()
        offsets = [TopicPartition(t, p, offset) for (t, p), offset in positions.items()]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            log.warning("offset commit failed; batch will be redelivered", error=str(exc))

    def batch_done(self, report: BatchReport) -> None:
        self._stats.batches += 1
        metrics.BATCH_SIZE.observe(report.records)
        metrics.BATCH_SECONDS.observe(report.seconds)
        log.info("batch done", records=report.records, recipients=report.recipients,
                 mailed=report.mailed, seconds=round(report.seconds, 3))


def ledger_entry(item: Work) -> LedgerEntry:
    """The send-ledger claim of a work item."""
    recipient = item.recipient
    return LedgerEntry(recipient.campaign_id, recipient.contact_id, item.envelope.tenant_id,
                       item.message_id, item.attempt, item.skip is not None)
