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
the bound all the same (up to SWEEP_SECONDS before it, never after; pixel served, person
redirected, never an error page) and the hit,
which the producer gives up at that same bound, is counted in
campaign_tracker_hits_lost_total instead of campaign_tracker_hits_total (one that was in
flight when given up may still have reached the broker: lost counts are an upper bound).
At most once per request: a client that asks twice makes two hits, each with its own id
(read models count unique per contact). The record's bytes are those of the schema path
(services/tracker/record.py writes them directly; anything it cannot write plainly goes
through the pydantic models).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import deque
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
from services.engagement.machine import Hit, Verdict, classify
from services.engagement.tokens import InvalidTrackingToken, Kind, TrackingClaim, TrackingKeys
from services.tracker.record import hit_record, new_request_id

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
# The heartbeat's pace, and how long delivery reports may wait for the producer's thread
# when the event loop has not served them (no hit in flight, or the loop held up).
POLL_SECONDS = 0.05
# While hits are in flight the event loop serves their delivery reports this often: on the
# loop thread they settle the waiting requests directly, with no other thread taking the
# GIL for each report and no wake-up of the loop.
LOOP_POLL_SECONDS = 0.001
# Bounds the flush of hits still in flight at shutdown (a broker away would hold it forever).
CLOSE_FLUSH_SECONDS = 2.0
# A hit leaves at once: the person waits for its acknowledgement.
LINGER_MS = 1
# Bounds the wait for the topic's metadata at start, so the first hits do not pay for it; a
# broker away at start only delays serving by this much, it never stops it.
START_METADATA_SECONDS = 3.0
# During an outage every hit is lost: one log line per this many seconds says how many.
LOSS_LOG_SECONDS = 5.0
# A wait is ended by the sweep up to this much before its bound, never after it: one timer
# serves every wait due within this span.
SWEEP_SECONDS = 0.005
_LABELS = {Kind.OPEN: "open", Kind.CLICK: "click"}


class HitPublisher:
    """Produces hits to campaign.engagement and tells each waiting request its fate. While
    hits are in flight the event loop serves the producer's delivery reports every
    LOOP_POLL_SECONDS (poll(0): never blocks); a thread of its own serves them whenever the
    loop has not for POLL_SECONDS, handing the fates to the loop in one wake-up, and beats
    the heartbeat: a tracker whose producer thread stopped is not alive. One timer at a
    time (not one per request) ends the waits that reach the bound."""

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
        self._acked = {(kind, machine): metrics.TRACKER_HITS.labels(
            kind=_LABELS[kind], machine=str(machine).lower()) for kind in Kind for machine in (False, True)}
        # Filled by delivery reports (on whichever thread polled), emptied after each poll;
        # a deque: its append and popleft are atomic, so no fate is lost between threads.
        self._settled: deque[tuple[asyncio.Future[bool], bool]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_poll_at: asyncio.TimerHandle | None = None
        self._loop_polled_at = float("-inf")
        # (deadline, future) in the order the hits were produced: one bound for all, so the
        # deadlines are in order too.
        self._waiting: deque[tuple[float, asyncio.Future[bool]]] = deque()
        self._sweep_at: asyncio.TimerHandle | None = None

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
        while not self._stop.wait(POLL_SECONDS):
            if time.monotonic() - self._loop_polled_at >= POLL_SECONDS:
                self.producer.poll(0)
                self._hand_over()
            self.heartbeat.beat()

    def _hand_over(self) -> None:
        """On the producer's thread: the fates its poll served, to the loop at once."""
        batch = _drain(self._settled)
        if not batch or self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(_settle_all, batch)
        except RuntimeError:
            pass  # the loop is gone (shutdown): nobody waits any more

    def _loop_poll(self) -> None:
        """On the loop: serve the delivery reports due, settle their requests, and come back
        while any hit is still in flight."""
        self._loop_poll_at = None
        self._loop_polled_at = time.monotonic()
        self.producer.poll(0)
        _settle_all(_drain(self._settled))
        if len(self.producer) and self._loop is not None:
            self._loop_poll_at = self._loop.call_later(LOOP_POLL_SECONDS, self._loop_poll)

    async def publish(self, kind: Kind, machine: bool, key: bytes, value: bytes) -> bool:
        """Produce one hit and wait for its acknowledgement, at most `wait_seconds`; True
        when Kafka acknowledged it in time. Never raises for a Kafka failure."""
        loop = self._loop = asyncio.get_running_loop()
        acked: asyncio.Future[bool] = loop.create_future()
        acked_total = self._acked[kind, machine]

        def delivered(error: KafkaError | None, _msg: Message) -> None:
            # Inside a poll (the loop's or the producer thread's): each hit's fate, once.
            if error is None:
                acked_total.inc()
            else:
                self._lost(_LABELS[kind], str(error))
            self._settled.append((acked, error is None))

        try:
            self.producer.produce(self.topic, key=key, value=value, on_delivery=delivered)
        except (BufferError, KafkaException) as exc:
            self._lost(_LABELS[kind], str(exc))
            return False
        if self._loop_poll_at is None:
            self._loop_poll_at = loop.call_later(LOOP_POLL_SECONDS, self._loop_poll)
        self._waiting.append((loop.time() + self.wait_seconds, acked))
        if self._sweep_at is None:
            self._sweep_at = loop.call_at(self._waiting[0][0] - SWEEP_SECONDS, self._sweep)
        return await acked  # False at the bound: its delivery report will count it

    def _sweep(self) -> None:
        """On the loop: end the waits due within SWEEP_SECONDS (so none ends late), drop
        the answered ones ahead of them, and come back for the next wait still open."""
        waiting, now = self._waiting, self._loop.time() if self._loop else 0.0
        while waiting and (waiting[0][1].done() or waiting[0][0] - SWEEP_SECONDS <= now):
            _settle(waiting.popleft()[1], False)
        self._sweep_at = None
        if waiting and self._loop is not None:
            self._sweep_at = self._loop.call_at(waiting[0][0] - SWEEP_SECONDS, self._sweep)

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


def _settle_all(batch: list[tuple[asyncio.Future[bool], bool]]) -> None:
    for future, ok in batch:
        if not future.done():
            future.set_result(ok)


def _drain(settled: deque[tuple[asyncio.Future[bool], bool]]) -> list[tuple[asyncio.Future[bool], bool]]:
    batch = []
    try:
        while True:  # another thread may drain it too: popleft, not a test of its length
            batch.append(settled.popleft())
    except IndexError:
        return batch


def hit_event(claim: TrackingClaim, request_id: uuid.UUID | str, hit: Hit,
              scanner_window_seconds: float) -> tuple[bytes, bytes, bool]:
    """The record of one hit (key, value) and whether it is machine traffic. Pure. Written
    by `hit_record` when it can, else through the schema (the same bytes: unit-tested)."""
    verdict = classify(hit, scanner_window_seconds=scanner_window_seconds)
    key = contact_key(claim.tenant_id, claim.contact_id)
    value = hit_record(claim, str(request_id), verdict, hit.at)
    if value is None:
        value = schema_hit_value(claim, uuid.UUID(str(request_id)), verdict, hit.at)
    return key, value, verdict.machine


def schema_hit_value(claim: TrackingClaim, request_id: uuid.UUID, verdict: Verdict,
                     at: float) -> bytes:
    """The encoded envelope of one hit built through the pydantic models (validated)."""
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
                    message_id=request_id, occurred_at=datetime.fromtimestamp(at, UTC))
    return encode(envelope)


def create_app(settings: TrackerSettings, keys: TrackingKeys,
               publisher: HitPublisher | None = None) -> FastAPI:
    """The tracker's routes; the publisher (made from the settings unless given) starts and
    stops with the app. The two hit routes are plain Starlette routes of the FastAPI app
    (the request is all they read: no parameter parsing or dependency solving)."""

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

    async def track(request: Request, kind: Kind) -> TrackingClaim | Response:
        try:
            claim = keys.verify(request.path_params["token"])
        except InvalidTrackingToken as refused:
            metrics.TRACKER_REFUSED.labels(reason=refused.reason.value).inc()
            if refused.malformed:
                return Response("malformed tracking link\n", 400, media_type="text/plain")
            return Response("unknown tracking link\n", 404, media_type="text/plain")
        if claim.kind is not kind:
            metrics.TRACKER_REFUSED.labels(reason="wrong kind").inc()
            return Response("unknown tracking link\n", 404, media_type="text/plain")
        client = request.scope.get("client")
        hit = Hit(kind, request.method, _user_agent(request.scope),
                  client[0] if client else None, time.time(), claim.sent_at)
        key, value, machine = hit_event(claim, new_request_id(), hit, window)
        hits: HitPublisher = request.app.state.publisher
        await hits.publish(kind, machine, key, value)
        return claim

    async def pixel(request: Request) -> Response:
        answer = await track(request, Kind.OPEN)
        if isinstance(answer, Response):
            return answer
        return Response(PIXEL, 200, media_type="image/gif", headers=NO_CACHE)

    async def click(request: Request) -> Response:
        answer = await track(request, Kind.CLICK)
        if isinstance(answer, Response):
            return answer
        assert answer.url is not None  # a click claim always carries its link
        return Response(status_code=302, headers={**REDIRECT_HEADERS, "Location": answer.url})

    app.add_route("/o/{token}.gif", pixel, methods=["GET", "HEAD"], include_in_schema=False)
    app.add_route("/c/{token}", click, methods=["GET", "HEAD"], include_in_schema=False)
    return app


def _user_agent(scope: Any) -> str:
    """The request's User-Agent header (the first), decoded as Starlette decodes headers."""
    for name, value in scope["headers"]:
        if name == b"user-agent":
            return str(value.decode("latin-1"))
    return ""
