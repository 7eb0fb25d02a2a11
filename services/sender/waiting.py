"""The sender's partitions that wait: a delay partition paused at its head until that record
is due, a held partition paused at a record of a still-paused campaign until some campaign is
released (resumed or cancelled).

Guarantees: a partition is paused at the record that waits and sought back to it, so that
record and every one behind it are fetched again after the resume (nothing skipped); a delay
partition resumes at the first turn of the loop after its head is due, and a fetch never
waits past that (decisions.wake, poll_timeout); after every release the blocked held
partitions are swept up to their current ends, and once more RESWEEP_SECONDS later
(decisions.swept); a broker that does not answer the sweep's look-up only puts the sweep off
to a later turn. Partitions revoked are forgotten. Used by the consumer's own thread only.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import UTC, datetime

import structlog
from confluent_kafka import Consumer, KafkaException, TopicPartition

from services.common.kafka import PartitionKey
from services.sender.control import ControlBoard
from services.sender.decisions import Sweeps, poll_timeout, swept, wake
from services.sender.held_gauge import HeldGauge

log = structlog.get_logger("sender")

# A release is followed by a second sweep of the blocked held partitions this much later: a
# sender that had not seen a resume yet may still have parked a record of that campaign
# behind a campaign that stays paused (every sender sees a change within ~1 s).
RESWEEP_SECONDS = 3.0
# Metadata look-ups (watermarks): guards against a broker that does not answer.
METADATA_TIMEOUT_SECONDS = 10.0


class WaitingPartitions:
    """Pauses, resumes and sweeps the partitions of one consumer; feeds the held gauge."""

    def __init__(self, consumer: Consumer, board: ControlBoard, held: HeldGauge) -> None:
        self._consumer = consumer
        self._board = board
        self._held = held
        # Delay partitions paused until their head record is due.
        self._due_at: dict[PartitionKey, datetime] = {}
        # Held partitions paused until a campaign is released; sweeps: held partition -> end
        # offset up to which records of still-paused campaigns are parked again instead of
        # blocking (once per release, so a long pause costs nothing).
        self._blocked: set[PartitionKey] = set()
        self._sweep_until: dict[PartitionKey, int] = {}
        self._sweeps = Sweeps(seen=0)

    def begin(self) -> None:
        """The releases seen so far need no sweep (call once the control feed caught up)."""
        self._sweeps = Sweeps(seen=self._board.released)

    def until_due(self, where: PartitionKey, offset: int, due: datetime) -> None:
        self._due_at[where] = due
        self._pause_at(where, offset)

    def until_released(self, where: PartitionKey, offset: int) -> None:
        self._blocked.add(where)
        self._pause_at(where, offset)

    def sweep_until(self, where: PartitionKey) -> int:
        """The end offset of the last sweep of a held partition (-1: none)."""
        return self._sweep_until.get(where, -1)

    def poll_timeout(self, longest: float) -> float:
        return poll_timeout(self._due_at.values(), now=datetime.now(UTC), longest=longest)

    def sample(self) -> None:
        """The held gauge, for the partitions that wait now."""
        self._held.sample(self._blocked | self._due_at.keys())

    def wake(self) -> None:
        """Resume delay partitions whose head is due, and held partitions after a campaign was
        released (with a sweep up to their current end)."""
        woken = wake(self._due_at, self._sweeps, now=datetime.now(UTC),
                     released=self._board.released, clock=time.monotonic())
        due = list(woken.due)
        for where in due:
            del self._due_at[where]
        if woken.sweep:
            try:
                ends = {where: self._consumer.get_watermark_offsets(
                    TopicPartition(*where), timeout=METADATA_TIMEOUT_SECONDS, cached=False)[1]
                    for where in self._blocked}
            except KafkaException as exc:  # broker away: sweep at a later turn of the loop
                log.warning("held partitions not swept yet", error=str(exc))
                ends = None
            if ends is not None:
                self._sweeps = swept(self._sweeps, released=self._board.released,
                                     clock=time.monotonic(), resweep_seconds=RESWEEP_SECONDS)
                self._sweep_until.update(ends)
                due.extend(self._blocked)
                self._blocked.clear()
        if due:
            self._consumer.resume([TopicPartition(t, p) for t, p in due])

    def forget(self, partitions: Iterable[PartitionKey]) -> None:
        """Partitions revoked: whoever owns them next starts from the committed offsets."""
        for where in partitions:
            self._due_at.pop(where, None)
            self._blocked.discard(where)
            self._sweep_until.pop(where, None)

    def _pause_at(self, where: PartitionKey, offset: int) -> None:
        """Pause a partition at the record that waits: it is fetched again after the resume."""
        self._consumer.pause([TopicPartition(*where)])
        self._consumer.seek(TopicPartition(*where, offset))
        self._held.paused_at(where, offset)
