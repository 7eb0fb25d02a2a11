"""Test-side Kafka I/O: publish envelopes and read a topic back, on the real broker."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable

from confluent_kafka import Consumer, KafkaError

from schemas.envelope import Envelope, Message, decode, encode
from services.common.kafka import make_producer
from services.common.settings import Settings
from services.common.topics import TopicSpec, topic_name


def publish(settings: Settings, spec: TopicSpec, records: Iterable[tuple[bytes, bytes | Envelope]]) -> int:
    producer = make_producer(settings)
    count = 0
    for key, value in records:
        raw = encode(value) if isinstance(value, Envelope) else value
        producer.produce(topic_name(spec, settings), key=key, value=raw)
        producer.poll(0)
        count += 1
    assert producer.flush(30) == 0, "records left unacknowledged"
    return count


def read_topic(settings: Settings, spec: TopicSpec, *, until: int | None = None, timeout: float = 30.0,
               idle: float = 3.0, counting: Callable[[Message], bool] | None = None) -> list[Message]:
    """Committed records of a topic from the beginning: stops at `until` records (of those
    `counting` accepts, if given) or when idle."""
    consumer = Consumer({
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "group.id": f"reader-{uuid.uuid4()}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
    })
    consumer.subscribe([topic_name(spec, settings)])
    out: list[Message] = []
    counted = 0
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    try:
        while time.monotonic() < deadline:
            msgs = consumer.consume(1000, 0.5)
            for m in msgs:
                error = m.error()
                if error is not None:
                    # A topic created a moment ago may not be in this client's metadata yet.
                    if error.code() not in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
                        raise RuntimeError(error)
                    continue
                out.append(decode(m.value()))
                counted += counting is None or counting(out[-1])
                last = time.monotonic()
            if until is not None and counted >= until:
                # Linger a moment: an extra (duplicate) record must be seen, not missed.
                if time.monotonic() - last > 1.0:
                    break
            elif until is None and out and time.monotonic() - last > idle:
                break
    finally:
        consumer.close()
    return out
