"""The sender's routing and paused partitions carried out against fakes (no broker): what a
batch's records turn into, where partitions pause, and when they resume."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, cast

from confluent_kafka import Consumer, Message, TopicPartition

from schemas.base import Record
from schemas.envelope import encode, wrap
from schemas.events import (
    CampaignPaused,
    CampaignResumed,
    MessageTemplate,
    RecipientExcluded,
    RecipientQueued,
    RecipientRetryScheduled,
)
from services.sender.control import ControlBoard
from services.sender.do_not_mail import DoNotMailList
from services.sender.held_gauge import HeldGauge
from services.sender.publisher import DeliveryPublisher
from services.sender.routing import RecipientRouter
from services.sender.waiting import WaitingPartitions
from services.sender.work import SenderStats

RECIPIENTS, RETRY, HELD = "campaign.recipients", "campaign.recipients.retry.1", \
    "campaign.recipients.held"
TEMPLATE = MessageTemplate(subject="s", from_address="n@example.com", body_text="hi")


def queued(campaign_id: str, contact_id: str) -> RecipientQueued:
    return RecipientQueued(campaign_id=campaign_id, contact_id=contact_id,
                           email=f"{contact_id}@example.com", template=TEMPLATE)


class FakeRecord:
    def __init__(self, topic: str, partition: int, offset: int, payload: Record | bytes) -> None:
        self._where = (topic, partition, offset)
        self._value = payload if isinstance(payload, bytes) else encode(
            wrap(payload, tenant_id="acme", aggregate_id="c"))

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self._where[0]

    def partition(self) -> int:
        return self._where[1]

    def offset(self) -> int:
        return self._where[2]

    def value(self) -> bytes:
        return self._value

    def key(self) -> bytes:
        return b"acme:k"


class FakeConsumer:
    def __init__(self, ends: dict[tuple[str, int], int] | None = None) -> None:
        self.ends = ends or {}
        self.paused: list[tuple[str, int]] = []
        self.sought: list[tuple[str, int, int]] = []
        self.resumed: list[tuple[str, int]] = []

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused += [(tp.topic, tp.partition) for tp in partitions]

    def seek(self, tp: TopicPartition) -> None:
        self.sought.append((tp.topic, tp.partition, tp.offset))

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.resumed += [(tp.topic, tp.partition) for tp in partitions]

    def get_watermark_offsets(self, tp: TopicPartition, **_: Any) -> tuple[int, int]:
        return 0, self.ends[(tp.topic, tp.partition)]


class FakeGauge:
    def __init__(self) -> None:
        self.heads: dict[tuple[str, int], int] = {}

    def paused_at(self, where: tuple[str, int], offset: int) -> None:
        self.heads[where] = offset


class FakePublisher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, int, Any]] = []

    def dead_letter(self, record: FakeRecord, reason: str) -> None:
        self.sent.append(("dlq", record.offset(), reason.split(":")[0]))

    def park(self, record: FakeRecord) -> None:
        self.sent.append(("held", record.offset(), None))

    def forward(self, record: FakeRecord, attempt: int) -> None:
        self.sent.append(("retry", record.offset(), attempt))


def router(board: ControlBoard, consumer: FakeConsumer,
           publisher: FakePublisher) -> tuple[RecipientRouter, WaitingPartitions, SenderStats]:
    waiting = WaitingPartitions(cast(Consumer, consumer), board, cast(HeldGauge, FakeGauge()))
    stats = SenderStats()
    return RecipientRouter(cast(DeliveryPublisher, publisher), waiting, board=board,
                           do_not_mail=DoNotMailList(), stats=stats, held_topic=HELD,
                           early=1.0), waiting, stats


def test_a_batch_splits_into_work_parked_dead_lettered_and_waiting_records() -> None:
    board = ControlBoard()
    board.apply("paused", CampaignPaused(reason="x"))
    consumer, publisher = FakeConsumer(), FakePublisher()
    route, _, stats = router(board, consumer, publisher)
    later = datetime.now(UTC) + timedelta(minutes=5)
    not_due = RecipientRetryScheduled(recipient=queued("sending", "k3"), attempt=2,
                                      retry_at=later, first_attempt_at=later)
    records = [
        FakeRecord(RECIPIENTS, 0, 10, b"junk"),
        FakeRecord(RECIPIENTS, 0, 11, RecipientExcluded(campaign_id="sending", contact_id="k0",
                                                        email="k0@example.com", reason="deleted")),
        FakeRecord(RECIPIENTS, 0, 12, queued("sending", "k1")),
        FakeRecord(RECIPIENTS, 1, 40, queued("paused", "k2")),
        FakeRecord(RETRY, 3, 7, not_due),
        FakeRecord(RETRY, 3, 8, queued("sending", "k4")),  # behind the waiting head
        FakeRecord(HELD, 2, 5, queued("paused", "k5")),
    ]
    work, done = route.route(cast(list[Message], records))
    assert [item.recipient.contact_id for item in work] == ["k1"]
    assert [record.offset() for record in done] == [10, 11, 40]
    assert publisher.sent == [("dlq", 10, "malformed JSON"), ("held", 40, None)]
    assert consumer.paused == [(RETRY, 3), (HELD, 2)]
    assert consumer.sought == [(RETRY, 3, 7), (HELD, 2, 5)]
    assert (stats.records, stats.held) == (6, 1)


def test_a_release_sweeps_the_blocked_held_partition_and_parks_the_still_paused_again() -> None:
    board = ControlBoard()
    board.apply("one", CampaignPaused(reason="x"))
    board.apply("two", CampaignPaused(reason="x"))
    consumer, publisher = FakeConsumer(ends={(HELD, 0): 9}), FakePublisher()
    route, waiting, stats = router(board, consumer, publisher)
    waiting.begin()
    route.route(cast(list[Message], [FakeRecord(HELD, 0, 3, queued("two", "k1"))]))
    waiting.wake()
    assert consumer.resumed == []  # nothing released yet
    board.apply("one", CampaignResumed())
    waiting.wake()
    assert consumer.resumed == [(HELD, 0)]
    # Fetched again: "two" is still paused, but below the sweep's end it goes to the end of
    # the held topic (not counted again) instead of blocking the partition.
    work, done = route.route(cast(list[Message], [FakeRecord(HELD, 0, 3, queued("two", "k1")),
                                                   FakeRecord(HELD, 0, 4, queued("one", "k2"))]))
    assert publisher.sent == [("held", 3, None)] and stats.held == 0
    assert [item.recipient.contact_id for item in work] == ["k2"]
    assert [record.offset() for record in done] == [3]


def test_a_delay_partition_resumes_once_its_head_is_due() -> None:
    consumer = FakeConsumer()
    waiting = WaitingPartitions(cast(Consumer, consumer), ControlBoard(),
                                cast(HeldGauge, FakeGauge()))
    now = datetime.now(UTC)
    waiting.until_due((RETRY, 0), 5, now - timedelta(seconds=1))
    waiting.until_due((RETRY, 1), 6, now + timedelta(minutes=5))
    assert waiting.poll_timeout(0.5) == 0.01  # a head is overdue: resumed at the next turn
    waiting.wake()
    assert consumer.resumed == [(RETRY, 0)]
    assert waiting.poll_timeout(0.5) == 0.5
    waiting.forget([(RETRY, 1)])
    waiting.wake()
    assert consumer.resumed == [(RETRY, 0)]
