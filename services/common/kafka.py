"""Thin confluent-kafka adapters: the client settings every service shares.

All producers use the murmur2 partitioner (Java's default), so a key lands on the same
partition whichever client wrote it, and topics keyed by campaign id stay co-partitioned.
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import Consumer, Producer

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
