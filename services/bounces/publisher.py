"""Publishing a report's records to Kafka with a bounded wait, for the receiver and webhooks.

Guarantee: `publish` returns only once the broker acknowledged every record (acks=all,
idempotent producer), and raises `PublishFailed` when any was refused or not acknowledged
within the bound (librdkafka's message timeout is the same bound, so nothing is left queued
to appear later by surprise, save a record whose acknowledgement was lost in flight). The
caller answers its peer only after that: 250 / 2xx on success, 451 / 503 on failure, so the
peer sends the report again. Repeats are harmless: the records have deterministic ids.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import structlog
from confluent_kafka import KafkaError, KafkaException, Producer

from schemas.envelope import encode
from services.bounces.events import Outgoing
from services.common.kafka import make_producer
from services.common.settings import Settings
from services.common.topics import topic_name

log = structlog.get_logger("bounces")

# How often the poll thread hands delivery reports over: the added latency of a reply.
_POLL_SECONDS = 0.05
# close() waits this long for records still in flight: guards against a broker that went away
# holding the process's exit.
_CLOSE_FLUSH_SECONDS = 5.0


class PublishFailed(RuntimeError):
    """The broker did not acknowledge every record within the bound."""


class BouncePublisher:
    """One idempotent producer shared by every SMTP session and webhook request; a producer
    that hit a fatal error (its idempotence state lost) is replaced before the next publish."""

    def __init__(self, settings: Settings, timeout_seconds: float) -> None:
        self._settings = settings
        self._timeout = timeout_seconds
        self._fatal = threading.Event()
        self._producer = self._new_producer()
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="bounce-publisher", daemon=True)
        self._poller.start()

    def _new_producer(self) -> Producer:
        timeout_ms = max(1000, int(self._timeout * 1000))
        return make_producer(self._settings, **{
            "message.timeout.ms": timeout_ms,
            "request.timeout.ms": min(30_000, timeout_ms),
            "linger.ms": 1,
            "error_cb": self._on_error,
        })

    def _on_error(self, error: KafkaError) -> None:
        if error.fatal():
            log.error("bounce producer failed fatally; it is replaced", error=str(error))
            self._fatal.set()

    def _renew_if_fatal(self) -> None:
        if self._fatal.is_set():
            self._fatal.clear()
            old, self._producer = self._producer, self._new_producer()
            old.flush(0)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(_POLL_SECONDS)

    async def publish(self, records: list[Outgoing]) -> None:
        self._renew_if_fatal()
        loop = asyncio.get_running_loop()
        pending: list[asyncio.Future[None]] = []

        def settle(future: asyncio.Future[None], error: KafkaError | None) -> None:
            if future.done():
                return
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(PublishFailed(str(error)))

        for record in records:
            future: asyncio.Future[None] = loop.create_future()
            pending.append(future)

            def report(error: KafkaError | None, _msg: Any, future: asyncio.Future[None] = future) -> None:
                loop.call_soon_threadsafe(settle, future, error)

            try:
                self._producer.produce(topic_name(record.spec, self._settings), key=record.key,
                                       value=encode(record.envelope), on_delivery=report)
            except (BufferError, KafkaException, ValueError) as exc:
                for left in pending:
                    left.cancel()
                raise PublishFailed(f"not queued: {exc}") from None
        try:
            # A little past librdkafka's own timeout, which reports the failure itself.
            await asyncio.wait_for(asyncio.gather(*pending), self._timeout + 1.0)
        except TimeoutError:
            raise PublishFailed(f"not acknowledged within {self._timeout:g} s") from None

    def close(self) -> None:
        self._stop.set()
        self._poller.join(_CLOSE_FLUSH_SECONDS)
        self._producer.flush(_CLOSE_FLUSH_SECONDS)
