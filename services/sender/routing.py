"""Step 1 of a batch: where each fetched record of the recipient, delay and held topics goes.
decisions.read and decisions.route decide; this reads the control state and the do-not-mail
list for them and carries their decisions out.

Guarantees: a record that is not a valid recipient record is dead-lettered with the reason,
never mailed nor dropped unseen; a recipient of a paused campaign is parked on the held topic
as it came, never mailed; a record that must wait pauses its partition at itself
(waiting.py), and the records behind it in the batch are left to be fetched again after the
resume; a fatal consumer error raises. Used by the consumer's own thread only.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import assert_never

import structlog
from confluent_kafka import KafkaException, Message

from services.common.kafka import PartitionKey, is_fatal
from services.sender.control import ControlBoard
from services.sender.decisions import (
    Act,
    DeadLetter,
    Forward,
    Park,
    Recipient,
    WaitForRelease,
    WaitUntil,
    due_at,
    read,
    route,
    skip_reason,
)
from services.sender.do_not_mail import DoNotMailList
from services.sender.publisher import DeliveryPublisher
from services.sender.waiting import WaitingPartitions
from services.sender.work import SenderStats, Work

log = structlog.get_logger("sender")


class RecipientRouter:
    """Splits fetched batches into work to mail and records already dealt with."""

    def __init__(self, publisher: DeliveryPublisher, waiting: WaitingPartitions, *,
                 board: ControlBoard, do_not_mail: DoNotMailList, stats: SenderStats,
                 held_topic: str, early: float) -> None:
        self._publisher = publisher
        self._waiting = waiting
        self._board = board
        self._do_not_mail = do_not_mail
        self._stats = stats
        self._held_topic = held_topic
        self._early = early  # how long before its slot a throttled recipient is taken back

    def route(self, records: list[Message]) -> tuple[list[Work], list[Message]]:
        """The recipients to act on, and the records already dealt with (invalid, excluded,
        parked, forwarded); pauses the partitions whose head must wait."""
        work: list[Work] = []
        done: list[Message] = []
        paused: set[PartitionKey] = set()
        now = datetime.now(UTC)
        for record in records:
            error = record.error()
            if error is not None:
                if is_fatal(error):
                    raise KafkaException(error)
                log.warning("consumer error", error=str(error))
                continue
            where = (record.topic() or "", record.partition() or 0)
            if where in paused:
                continue  # behind a record that waits: fetched again after the resume
            self._stats.records += 1
            found = read(record.value(), now)
            if isinstance(found, DeadLetter):
                self._publisher.dead_letter(record, found.reason)
            if not isinstance(found, Recipient):
                done.append(record)
                continue
            recipient, payload = found.recipient, found.payload
            control = self._board.state(recipient.campaign_id)
            skip = skip_reason(control, self._do_not_mail.reason(found.envelope.tenant_id,
                                                                 recipient.contact_id))
            item = Work(record, found.envelope, payload, recipient, found.attempt,
                        found.first_attempt_at, skip, found.slot)
            offset = record.offset() or 0
            step = route(control, from_held=where[0] == self._held_topic,
                         due=due_at(payload, early=self._early), now=now, offset=offset,
                         sweep_until=self._waiting.sweep_until(where))
            match step:
                case Act():
                    work.append(item)
                case Park(again=again):
                    self._publisher.park(record)
                    if not again:
                        self._stats.held += 1
                    done.append(record)
                case Forward():
                    self._publisher.forward(record, item.attempt)
                    done.append(record)
                case WaitUntil(due=due):
                    self._waiting.until_due(where, offset, due)
                    paused.add(where)
                case WaitForRelease():
                    self._waiting.until_released(where, offset)
                    paused.add(where)
                case _:
                    assert_never(step)
        return work, done
