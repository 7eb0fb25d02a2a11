"""The held-recipients gauge (metrics.HELD_RECIPIENTS): records waiting at the paused head of
this sender's held partitions (campaigns paused) and delay partitions (retries not yet due),
up to each partition's log end.

A paused partition is not fetched, so the consumer's cached log end goes stale while records
keep being parked behind it; the log ends are therefore asked of the broker, asynchronously
(an admin ListOffsets whose answer is taken on a later sample): the sender's loop never waits
for it, and a broker away only leaves the gauge at its last value.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any

from confluent_kafka import IsolationLevel, KafkaException, TopicPartition
from confluent_kafka.admin import OffsetSpec

from services.common.kafka import PartitionKey, make_admin, serve_logs
from services.common.metrics import HELD_RECIPIENTS

# How often the log ends are asked for; the answer waits at most this long.
SAMPLE_SECONDS = 1.0



class HeldGauge:
    """Tell it where each waiting partition was paused (`paused_at`), and call `sample` from
    the sender's loop with the partitions that wait right now."""

    def __init__(self, bootstrap_servers: str, interval: float = SAMPLE_SECONDS) -> None:
        self._admin = make_admin(bootstrap_servers)
        self.interval = interval
        self._asked_at = float("-inf")
        self._pending: dict[TopicPartition, Future[Any]] | None = None
        # The offset each waiting partition was paused at (the consumer's own position is
        # unset after the seek back to it).
        self._heads: dict[PartitionKey, int] = {}

    def paused_at(self, where: PartitionKey, offset: int) -> None:
        self._heads[where] = offset

    def sample(self, waiting: Iterable[PartitionKey]) -> None:
        pending = self._pending
        if pending is not None:
            if not all(f.done() for f in pending.values()):
                return
            self._pending = None
            self._set(pending)
        now = time.monotonic()
        if now - self._asked_at < self.interval:
            return
        self._asked_at = now
        serve_logs(self._admin)
        waiting = set(waiting)
        self._heads = {where: at for where, at in self._heads.items() if where in waiting}
        partitions = [TopicPartition(*where) for where in self._heads]
        if not partitions:
            HELD_RECIPIENTS.set(0)
            return
        try:
            self._pending = self._admin.list_offsets(
                {tp: OffsetSpec.latest() for tp in partitions},
                isolation_level=IsolationLevel.READ_COMMITTED, request_timeout=self.interval)
        except KafkaException:
            self._pending = None  # asked again at the next interval

    def _set(self, answers: dict[TopicPartition, Future[Any]]) -> None:
        try:
            ends = {(tp.topic, tp.partition): f.result().offset for tp, f in answers.items()}
        except KafkaException:
            return  # the broker did not answer: the gauge keeps its last value
        HELD_RECIPIENTS.set(sum(max(0, end - self._heads[where])
                                for where, end in ends.items() if where in self._heads))
