"""Thin confluent-kafka adapters: the client settings every service shares.

All producers use the murmur2 partitioner (Java's default), so a key lands on the same
partition whichever client wrote it, and topics keyed by campaign id stay co-partitioned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from services.common.settings import Settings


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "partitioner": "murmur2_random",
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
    }
    config.update(overrides)
    return config


def consumer_config(settings: Settings, group: str, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "group.id": settings.group(group),
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        # Never read records of aborted or still-open transactions.
        "isolation.level": "read_committed",
    }
    config.update(overrides)
    return config


def make_producer(settings: Settings, **overrides: Any) -> Producer:
    return Producer(producer_config(settings, **overrides))


def make_consumer(settings: Settings, group: str, **overrides: Any) -> Consumer:
    return Consumer(consumer_config(settings, group, **overrides))


def partition_reader(settings: Settings, group: str, **overrides: Any) -> Consumer:
    """A consumer for `read_to_end`: assigned by hand (the group id only names it), committed
    records only, reporting the end of a partition."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "group.id": group,
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
        "enable.partition.eof": True,
        # The end of a partition is noticed after this long, not the default 500 ms.
        "fetch.wait.max.ms": 10,
    }
    config.update(overrides)
    return Consumer(config)


def read_to_end(
    reader: Consumer, topic: str, partition: int, start: int, on_message: Callable[[Message], None],
    *, idle_timeout: float = 30.0,
) -> int:
    """Feed the records of one partition from `start` to its end (for read_committed readers,
    the last stable offset: an open transaction's records are not reached) to `on_message`;
    returns the next offset: where the broker says the partition ends, which lies past a
    transaction marker that ends it (never delivered as a record). Raises KafkaException when
    the broker says nothing for `idle_timeout` seconds."""
    reader.assign([TopicPartition(topic, partition, start)])
    position = start
    try:
        idle = 0.0
        while True:
            msg = reader.poll(0.2)
            if msg is None:
                idle += 0.2
                if idle >= idle_timeout:
                    raise KafkaException(KafkaError(KafkaError._TIMED_OUT, f"{topic}[{partition}] silent"))
                continue
            idle = 0.0
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    return max(position, msg.offset() or 0)
                raise KafkaException(error)
            position = (msg.offset() or 0) + 1
            on_message(msg)
    finally:
        reader.unassign()
