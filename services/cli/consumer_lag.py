"""Consumer lag of the engine's groups, as an operator reads it: per group and partition,
the committed offset, the log end (the last stable offset, what a read_committed consumer can
reach), the lag, the consumption rate between two snapshots and the time to drain.

`take_snapshot` reads offsets from the cluster with bounded calls (an unreachable broker
raises KafkaException within `timeout`); `lag_rows` is the pure arithmetic over two snapshots.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from confluent_kafka import ConsumerGroupTopicPartitions, IsolationLevel, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

# (group, topic, partition)
GroupPartition = tuple[str, str, int]
# A partition the group has never committed to.
NO_COMMIT = -1


@dataclass(frozen=True)
class Snapshot:
    at: float  # monotonic seconds
    committed: Mapping[GroupPartition, int]
    log_end: Mapping[tuple[str, int], int]


@dataclass(frozen=True)
class LagRow:
    group: str
    topic: str
    partition: int
    committed: int | None  # None: nothing committed yet (lag counts from the log start, 0)
    log_end: int
    lag: int
    rate_per_second: float
    seconds_to_drain: float | None  # None: not draining (rate 0 with a backlog)

    def as_json(self) -> dict[str, object]:
        return asdict(self)


def lag_rows(before: Snapshot, after: Snapshot) -> list[LagRow]:
    """One row per (group, topic, partition) of `after`, sorted; the rate is the committed
    offsets' advance since `before` (0 when the interval is empty or the partition is new)."""
    interval = after.at - before.at
    rows = []
    for (group, topic, partition), offset in sorted(after.committed.items()):
        end = after.log_end.get((topic, partition), 0)
        committed = None if offset < 0 else offset
        lag = max(0, end - (committed or 0))
        previous = before.committed.get((group, topic, partition), NO_COMMIT)
        advanced = committed - previous if committed is not None and previous >= 0 else 0
        rate = advanced / interval if interval > 0 and advanced > 0 else 0.0
        if lag == 0:
            drain: float | None = 0.0
        else:
            drain = lag / rate if rate > 0 else None
        rows.append(LagRow(group, topic, partition, committed, end, lag, rate, drain))
    return rows


def format_drain(seconds: float | None) -> str:
    if seconds is None or math.isinf(seconds):
        return "not moving"
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min"


def engine_groups(admin: AdminClient, prefix: str, timeout: float) -> list[str]:
    """The consumer groups whose ids start with the engine's prefix (all groups without one)."""
    listing = admin.list_consumer_groups(request_timeout=timeout).result(timeout=timeout + 1)
    if listing.errors:  # an unreachable cluster answers "no groups" plus the reason here
        raise KafkaException(listing.errors[0])
    return sorted(g.group_id for g in listing.valid if g.group_id.startswith(prefix))


def take_snapshot(admin: AdminClient, groups: list[str], timeout: float) -> Snapshot:
    committed: dict[GroupPartition, int] = {}
    for group in groups:
        futures = admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group)], request_timeout=timeout)
        result = futures[group].result(timeout=timeout + 1)
        for tp in result.topic_partitions or []:
            if tp.error is not None:
                raise KafkaException(tp.error)
            committed[(group, tp.topic, tp.partition)] = tp.offset if tp.offset >= 0 else NO_COMMIT
    partitions = {(topic, partition) for _, topic, partition in committed}
    log_end: dict[tuple[str, int], int] = {}
    if partitions:
        requests = {TopicPartition(t, p): OffsetSpec.latest() for t, p in sorted(partitions)}
        answers = admin.list_offsets(requests, isolation_level=IsolationLevel.READ_COMMITTED,
                                     request_timeout=timeout)
        for tp, future in answers.items():
            log_end[(tp.topic, tp.partition)] = future.result(timeout=timeout + 1).offset
    return Snapshot(time.monotonic(), committed, log_end)
