"""The bounce receiver: an SMTP server (aiosmtpd) for the bounce domain that turns DSNs and
ARF reports into EmailBounced / EmailComplained and, for hard bounces and complaints,
ContactSuppressed (services.bounces.events).

Guarantees:
- Only `bounces+<anything>@<bounce domain>` is accepted at RCPT (any case); every other
  recipient gets 550, so the server is no open relay and takes no mail for people.
- A message is answered 250 only after Kafka acknowledged all of its records; when Kafka
  does not within BOUNCE_KAFKA_TIMEOUT_SECONDS (or the campaign directory cannot be read) the
  answer is 451, so the remote MTA keeps the report and tries again: nothing answered 250 is
  lost. A report delivered twice (a 250 lost on the way) gives records with the same ids.
- A message that states nothing we can attribute (`Unparseable`) is answered 250 too (a
  refusal would only make a second bounce to a postmaster), logged with the reason and
  counted in `stats["unparseable"]`.
- Soft bounces are recorded; they suppress only through a `history` of the contact (see
  services.bounces.policy), which this receiver is given by its wiring or not at all: the
  history needs a read model of each contact's outcomes across campaigns (bounces from the
  bounce topic, deliveries, engagement), which is not built yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import structlog
from aiosmtpd.smtp import SMTP, Envelope, Session

from services.bounces.events import Outgoing, records_for
from services.bounces.parse import BounceContext, BounceReport, Parsed, Recipient, parse_message
from services.bounces.policy import ContactOutcome, soft_bounce_streak
from services.bounces.publisher import PublishFailed
from services.bounces.verp import DirectoryUnavailable, token_of

log = structlog.get_logger("bounces")

# Name in the greeting: aiosmtpd would otherwise ask DNS (socket.getfqdn) per connection.
_HOSTNAME = "bounces.local"
# Idle connections are closed after this: guards against peers that vanished.
_IDLE_TIMEOUT_S = 120.0
# Largest report accepted: a DSN or ARF report with the original attached is well under it;
# guards memory against a runaway peer.
_DATA_SIZE_LIMIT = 10 * 1024 * 1024
# A message may name at most this many recipients: a report is for one mail.
_MAX_RECIPIENTS = 10
# start() / stop() wait this long for the server thread: guards against a thread that died or
# hung leaving the caller waiting forever.
_THREAD_TIMEOUT_S = 10.0
# How often the server loop calls on_tick (the service's heartbeat).
_TICK_SECONDS = 1.0

Publish = Callable[[list[Outgoing]], Any]  # async: awaits the broker's acknowledgements
History = Callable[[str, str], Sequence[ContactOutcome]]


class BounceHandler:
    """aiosmtpd handler: RCPT filtering and DATA -> records -> Kafka -> reply."""

    def __init__(self, context: BounceContext, publish: Publish, *, trust_headers: bool = False,
                 soft_limit: int = 0, history: History | None = None) -> None:
        self.context = context
        self._publish = publish
        self._trust_headers = trust_headers
        self._soft_limit = soft_limit
        self._history = history
        self.stats: Counter[str] = Counter()

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if token_of(address, self.context.domain) is None:
            self.stats["refused_recipient"] += 1
            return "550 5.1.1 Not a bounce address of this domain"
        if len(envelope.rcpt_tos) >= _MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        rcpts = list(envelope.rcpt_tos)
        try:
            outcome = await asyncio.to_thread(parse_message, raw, rcpts, self.context)
        except DirectoryUnavailable as exc:
            self.stats["directory_unavailable"] += 1
            log.warning("bounce deferred: campaign directory unavailable", error=str(exc))
            return "451 4.3.0 Campaign directory unavailable, try again later"
        if not isinstance(outcome, Parsed):
            self.stats["unparseable"] += 1
            log.info("bounce unparseable", reason=outcome.reason, rcpt_tos=rcpts,
                     classified=outcome.report is not None, size=len(raw))
            return "250 2.0.0 OK (not attributable)"
        records = records_for(
            outcome, source="dsn", provider="", now=datetime.now(UTC),
            trust_headers=self._trust_headers, soft_limit=self._soft_limit,
            streak=self._streak(outcome.recipient, outcome),
        )
        try:
            await self._publish(records)
        except PublishFailed as exc:
            self.stats["kafka_unavailable"] += 1
            log.warning("bounce deferred: Kafka unavailable", error=str(exc))
            return "451 4.3.0 Temporarily unable to record the report, try again later"
        self.stats["accepted"] += 1
        log.info("bounce recorded", type=records[0].envelope.type, campaign_id=outcome.recipient.campaign_id,
                 contact_id=outcome.recipient.contact_id, via=outcome.recipient.via,
                 suppressed=len(records) > 1)
        return "250 2.0.0 OK"

    def _streak(self, who: Recipient, parsed: Parsed) -> int:
        report = parsed.report
        if self._history is None or not isinstance(report, BounceReport) or report.kind != "soft":
            return 0
        now = report.occurred_at or datetime.now(UTC)
        past = list(self._history(who.tenant_id, who.contact_id))
        return soft_bounce_streak([*past, ContactOutcome(now, who.campaign_id, "soft_bounce")])


class _Session(SMTP):
    """aiosmtpd's protocol, in the receiver's registry of open connections while open."""

    def __init__(self, handler: BounceHandler, sessions: set[_Session], **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._sessions = sessions
        sessions.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._sessions.discard(self)
        super().connection_lost(exc)


class BounceReceiver:
    """The SMTP server on its own event loop in a background thread.

    `start()` returns once the port accepts connections (port 0: a free one, see `port`);
    `stop()` closes every connection and stops the thread. Started at most once."""

    def __init__(self, handler: BounceHandler, host: str = "127.0.0.1", port: int = 0,
                 on_tick: Callable[[], None] | None = None) -> None:
        self.handler = handler
        self._on_tick = on_tick
        self.host = host
        self._requested_port = port
        self.port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> BounceReceiver:
        if self._thread is not None:
            raise RuntimeError("BounceReceiver already started")
        sock = socket.create_server((self.host, self._requested_port), reuse_port=False, backlog=256)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._run, args=(sock,), name=f"bounces:{self.port}",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(_THREAD_TIMEOUT_S) or self._error is not None:
            self.stop()
            raise RuntimeError(f"bounce receiver failed to start on port {self.port}") from self._error
        return self

    def stop(self) -> None:
        """Close all connections and stop the server thread. Idempotent."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None or not thread.is_alive():
            return
        if loop is not None and stopping is not None:
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:
                pass  # the loop is closed already: the thread is on its way out
        thread.join(_THREAD_TIMEOUT_S)
        if thread.is_alive():
            log.error("bounce receiver thread did not stop", timeout=_THREAD_TIMEOUT_S)

    def __enter__(self) -> BounceReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, sock: socket.socket) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve(sock, loop))
        except BaseException as error:  # reported to start(), which raises
            self._error = error
            log.exception("bounce receiver thread failed")
        finally:
            self._ready.set()
            sock.close()
            loop.close()

    async def _serve(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._stopping = asyncio.Event()
        sessions: set[_Session] = set()

        def factory() -> _Session:
            return _Session(self.handler, sessions, hostname=_HOSTNAME, timeout=_IDLE_TIMEOUT_S,
                            data_size_limit=_DATA_SIZE_LIMIT, enable_SMTPUTF8=True, loop=loop)

        server = await loop.create_server(factory, sock=sock)
        self._ready.set()
        while not self._stopping.is_set():
            if self._on_tick is not None:
                self._on_tick()  # the heartbeat: this loop is alive and not stuck
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), _TICK_SECONDS)
        server.close()
        for protocol in list(sessions):
            if protocol.transport is not None:
                protocol.transport.close()
        await server.wait_closed()
        pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
