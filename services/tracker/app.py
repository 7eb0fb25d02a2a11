"""The tracker: open pixels and click redirects of campaign mail, each hit an event.

Routes: `GET|HEAD /o/<token>.gif` answers a 43-byte transparent GIF that no cache keeps;
`GET|HEAD /c/<token>` answers 302 to the link the token carries. A token that is not one
(malformed) is a 400, one no configured key signed (tampered, foreign, retired key) or of
the other kind a 404: never a redirect, never a Location header.

Guarantees: stateless (the token carries everything; any number of replicas). Every hit it
answers is produced once to campaign.engagement (EmailOpened / LinkClicked, keyed by tenant +
contact, envelope id = the hit's request id) by an idempotent producer, and the answer waits
for Kafka's acknowledgement, at most `tracker_hit_wait_ms`: with Kafka up, a hit is on the
topic before the person gets their answer; with Kafka down or slow the answer goes out at
the bound all the same (pixel served, person redirected, never an error page) and the hit,
which the producer gives up at that same bound, is counted in
campaign_tracker_hits_lost_total instead of campaign_tracker_hits_total (one that was in
flight when given up may still have reached the broker: lost counts are an upper bound).
At most once per request: a client that asks twice makes two hits, each with its own id
(read models count unique per contact).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import structlog
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from fastapi import FastAPI, Request, Response

from schemas.contacts import contact_key
from schemas.engagement import EmailOpened, LinkClicked
from schemas.envelope import encode, wrap
from services.common import metrics
from services.common.heartbeat import Heartbeat
from services.common.kafka import make_producer
from services.common.settings import TrackerSettings
from services.common.topics import ENGAGEMENT, topic_name
from services.engagement.machine import Hit, classify
from services.engagement.tokens import InvalidTrackingToken, Kind, TrackingClaim, TrackingKeys

log = structlog.get_logger("tracker")

# The smallest transparent GIF (1x1, one transparent colour): 43 bytes.
PIXEL = bytes.fromhex(
    "47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b")
NO_CACHE = {
    "Cache-Control": "no-store, no-cache, must-revalidate, private, max-age=0",
    "Pragma": "no-cache",
    "Expires": "0",
}
# The token must not travel on to the linked site in a Referer header.
REDIRECT_HEADERS = {**NO_CACHE, "Referrer-Policy": "no-referrer"}
# How often the producer's delivery reports are served; also the heartbeat's pace.
POLL_SECONDS = 0.05
# Bounds the flush of hits still in flight at shutdown (a broker away would hold it forever).
CLOSE_FLUSH_SECONDS = 2.0
# A hit leaves at once: the person waits for its acknowledgement.
LINGER_MS = 1
# Bounds the wait for the topic's metadata at start, so the first hits do not pay for it; a
# broker away at start only delays serving by this much, it never stops it.
START_METADATA_SECONDS = 3.0
# During an outage every hit is lost: one log line per this many seconds says how many.
LOSS_LOG_SECONDS = 5.0


class HitPublisher:
    """Produces hits to campaign.engagement and tells each waiting request its fate. The
    producer's delivery reports are served on a thread of its own, which also beats the
    heartbeat: a tracker whose producer loop stopped is not alive."""

    def __init__(self, settings: TrackerSettings, heartbeat: Heartbeat | None = None,
                 factory: Callable[..., Producer] = make_producer) -> None:
        self.topic = topic_name(ENGAGEMENT, settings)
        self.wait_seconds = settings.tracker_hit_wait_ms / 1000
        self.heartbeat = heartbeat or settings.heartbeat()
        # The producer gives a hit up at the bound the request waits, so its fate (on the
        # topic, or counted lost) is known about when the answer goes out.
        self.producer = factory(settings, **{
            "message.timeout.ms": settings.tracker_hit_wait_ms,
            "linger.ms": LINGER_MS,
        })
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="tracker-producer", daemon=True)
        self._lost_unlogged = 0
        self._loss_logged_at = float("-inf")

    def start(self) -> HitPublisher:
        self._thread.start()
        return self

    def warm_up(self) -> None:
        """Fetch the topic's metadata (and let the producer get its id) before serving."""
        try:
            self.producer.list_topics(self.topic, timeout=START_METADATA_SECONDS)
        except KafkaException as exc:
            log.warning("broker not reachable at start; serving anyway", error=str(exc))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=CLOSE_FLUSH_SECONDS)
        left = self.producer.flush(CLOSE_FLUSH_SECONDS)
        if left:
            log.warning("hits unacknowledged at shutdown", hits=left)

    def _serve(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(POLL_SECONDS)
            self.heartbeat.beat()

    async def publish(self, kind: Kind, machine: bool, key: bytes, value: bytes) -> bool:
        """Produce one hit and wait for its acknowledgement, at most `wait_seconds`; True
        when Kafka acknowledged it in time. Never raises for a Kafka failure."""
        loop = asyncio.get_running_loop()
        acked: asyncio.Future[bool] = loop.create_future()
        label = "open" if kind is Kind.OPEN else "click"

        def delivered(error: KafkaError | None, _msg: Message) -> None:
            # On the producer's thread: every hit's fate is known here, once.
            if error is None:
                metrics.TRACKER_HITS.labels(kind=label, machine=str(machine).lower()).inc()
            else:
                self._lost(label, str(error))
            try:
                loop.call_soon_threadsafe(_settle, acked, error is None)
            except RuntimeError:
                pass  # the loop is gone (shutdown): nobody waits any more

        try:
            self.producer.produce(self.topic, key=key, value=value, on_delivery=delivered)
        except (BufferError, KafkaException) as exc:
            self._lost(label, str(exc))
            return False
        timer = loop.call_later(self.wait_seconds, _settle, acked, False)
        try:
            return await acked  # False at the bound: its delivery report will count it
        finally:
            timer.cancel()


    def _lost(self, kind: str, error: str) -> None:
        metrics.TRACKER_HITS_LOST.labels(kind=kind).inc()
        self._lost_unlogged += 1
        now = time.monotonic()
        if now - self._loss_logged_at >= LOSS_LOG_SECONDS:
            log.warning("hits lost", hits=self._lost_unlogged, last_error=error)
            self._lost_unlogged, self._loss_logged_at = 0, now


def _settle(future: asyncio.Future[bool], ok: bool) -> None:
    if not future.done():
        future.set_result(ok)


def hit_event(claim: TrackingClaim, request_id: uuid.UUID, hit: Hit,
              scanner_window_seconds: float) -> tuple[bytes, bytes, bool]:
    """The record of one hit (key, value) and whether it is machine traffic. Pure."""
    verdict = classify(hit, scanner_window_seconds=scanner_window_seconds)
    common: dict[str, Any] = {
        "campaign_id": claim.campaign_id, "contact_id": claim.contact_id,
        "request_id": request_id, "agent": verdict.agent, "machine": verdict.machine,
        "machine_reason": verdict.reason,
    }
    payload: EmailOpened | LinkClicked
    if claim.kind is Kind.OPEN:
        payload = EmailOpened(**common)
    else:
        payload = LinkClicked(**common, link_index=claim.link_index,
                              links_in_mail=claim.links_in_mail, url=claim.url)
    envelope = wrap(payload, tenant_id=claim.tenant_id, aggregate_id=claim.campaign_id,
                    message_id=request_id, occurred_at=datetime.fromtimestamp(hit.at, UTC))
    return contact_key(claim.tenant_id, claim.contact_id), encode(envelope), verdict.machine


def create_app(settings: TrackerSettings, keys: TrackingKeys,
               publisher: HitPublisher | None = None) -> FastAPI:
    """The tracker's routes; the publisher (made from the settings unless given) starts and
    stops with the app."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hits = (publisher or HitPublisher(settings)).start()
        await asyncio.to_thread(hits.warm_up)
        app.state.publisher = hits
        try:
            yield
        finally:
            await asyncio.to_thread(hits.close)

    app = FastAPI(title="campaign tracker", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    window = settings.tracker_scanner_window_seconds

    async def track(request: Request, token: str, kind: Kind) -> TrackingClaim | Response:
        try:
            claim = keys.verify(token)
        except InvalidTrackingToken as refused:
            metrics.TRACKER_REFUSED.labels(reason=refused.reason.value).inc()
            if refused.malformed:
                return Response("malformed tracking link\n", 400, media_type="text/plain")
            return Response("unknown tracking link\n", 404, media_type="text/plain")
        if claim.kind is not kind:
            metrics.TRACKER_REFUSED.labels(reason="wrong kind").inc()
            return Response("unknown tracking link\n", 404, media_type="text/plain")
        hit = Hit(kind, request.method, request.headers.get("user-agent", ""),
                  request.client.host if request.client else None, time.time(), claim.sent_at)
        key, value, machine = hit_event(claim, uuid.uuid4(), hit, window)
        hits: HitPublisher = request.app.state.publisher
        await hits.publish(kind, machine, key, value)
        return claim

    @app.api_route("/o/{token}.gif", methods=["GET", "HEAD"], include_in_schema=False)
    async def pixel(request: Request, token: str) -> Response:
        answer = await track(request, token, Kind.OPEN)
        if isinstance(answer, Response):
            return answer
        return Response(PIXEL, 200, media_type="image/gif", headers=NO_CACHE)

    @app.api_route("/c/{token}", methods=["GET", "HEAD"], include_in_schema=False)
    async def click(request: Request, token: str) -> Response:
        answer = await track(request, token, Kind.CLICK)
        if isinstance(answer, Response):
            return answer
        assert answer.url is not None  # a click claim always carries its link
        return Response(status_code=302, headers={**REDIRECT_HEADERS, "Location": answer.url})

    return app
