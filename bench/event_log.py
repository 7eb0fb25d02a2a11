"""Reading one campaign's facts back from a Kafka topic, with a throwaway consumer.

The consumer is assigned partitions directly (no group membership, nothing committed), so the
bench leaves no consumer group behind and never moves a service's offsets. It starts at the
first record written at or after a given time (offsets_for_times), so it reads only this run.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, TopicPartition

from schemas.base import Record
from schemas.envelope import Message, SchemaViolation, decode
from services.common.settings import Settings

# Guards against a broker that stops answering: the bench fails instead of hanging.
METADATA_TIMEOUT_SECONDS = 10.0
# Records fetched per consume() call: large enough to read 20,000 deliveries in a few calls.
CONSUME_BATCH = 5_000
# consume() wait per call; the read ends on end-of-partition, so this only matters when a
# partition is quiet.
CONSUME_TIMEOUT_SECONDS = 0.5


def read_campaign_messages(
    settings: Settings,
    topic: str,
    campaign_id: str,
    *,
    since_ms: int,
    timeout: float,
    enough: Callable[[list[Message[Record]]], bool] | None = None,
) -> list[Message[Record]]:
    """Every valid message keyed by `campaign_id` on `topic` written since `since_ms` (epoch
    ms, producer time), in offset order per partition.

    Reads to the end of every partition, or stops early once `enough(messages)` is true.
    Raises TimeoutError when the end is not reached within `timeout` seconds.
    """
    key = campaign_id.encode()
    consumer = Consumer({
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        # Required by the client even though nothing joins or commits.
        "group.id": f"bench-reader-{uuid.uuid4().hex}",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        # The same view as the projector: only committed transactions.
        "isolation.level": "read_committed",
    })
    try:
        start = _start_offsets(consumer, topic, since_ms)
        consumer.assign(start)
        # Partitions with nothing since `since_ms` start at the end: they still report EOF.
        pending = {tp.partition for tp in start}
        messages: list[Message[Record]] = []
        deadline = time.monotonic() + timeout
        while pending:
            if enough is not None and enough(messages):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{topic}: partitions {sorted(pending)} not read to the end in {timeout:g} s"
                )
            for record in consumer.consume(CONSUME_BATCH, CONSUME_TIMEOUT_SECONDS):
                _take(record, key, pending, messages)
        return messages
    finally:
        consumer.close()


def _start_offsets(consumer: Consumer, topic: str, since_ms: int) -> list[TopicPartition]:
    metadata = consumer.list_topics(topic, timeout=METADATA_TIMEOUT_SECONDS).topics[topic]
    if metadata.error is not None:
        raise KafkaException(metadata.error)
    wanted = [TopicPartition(topic, p, since_ms) for p in sorted(metadata.partitions)]
    found = consumer.offsets_for_times(wanted, timeout=METADATA_TIMEOUT_SECONDS)
    # offset -1: no record at or after the time in that partition.
    return [TopicPartition(topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_END)
            for tp in found]


def _take(record: Any, key: bytes, pending: set[int], messages: list[Message[Record]]) -> None:
    error = record.error()
    if error is not None:
        if error.code() == KafkaError._PARTITION_EOF:
            pending.discard(record.partition())
            return
        if error.fatal():
            raise KafkaException(error)
        return  # transient (a reconnect): the client retries by itself
    if record.key() != key:
        return
    try:
        messages.append(decode(record.value()))
    except SchemaViolation:
        pass  # not a fact the pipeline accepted either
