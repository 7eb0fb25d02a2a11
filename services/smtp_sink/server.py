"""The SMTP server of the sink: aiosmtpd on its own event loop in a background thread.

Guarantees:
- Every message answered 250 was recorded (memory, and the JSONL file when configured) exactly
  once, before the 250 was written: recording and returning the reply happen with no await in
  between, so nothing (stop, a vanished client) can cut in. The converse does not hold: if the
  client vanishes after the record, the 250 is lost in transit but the record stays — exactly
  the ambiguity real senders face, and why a sender retry can produce a duplicate record.
- Messages given a fault (451, 550, dropped connection) are never recorded; each applied fault
  is counted once in `SmtpSink.stats`.
- A dropped connection gets no reply at all: the transport is aborted, so the client sees the
  connection close (smtplib: SMTPServerDisconnected).
- Many connections, each sending many messages (MAIL/RCPT/DATA repeated), are served
  concurrently; `stop()` closes all of them and flushes the record file.
- With TLS or AUTH configured (see config), a message is only accepted over a session that
  met them (aiosmtpd answers 530 otherwise), and its record says how it came:
  `record["session"] = {"tls": bool, "auth_user": str | None}`. Logins are counted in
  `SmtpSink.logins` ("ok" / "refused"); a refused login gets 535.
- With `pipelining` on (the default) the EHLO reply offers PIPELINING (RFC 2920). Commands
  that arrive together are answered one by one, in order, exactly as if they had come one per
  segment (aiosmtpd reads them line by line from its buffer). The replies to MAIL, RCPT and
  RSET are held back while the next command line is already buffered and go out with the
  reply to the group's last command in one write (RFC 2920 3.1); a reply is never held when
  no complete command is waiting, nor for any other command (EHLO, DATA, STARTTLS, QUIT...),
  so a client waiting for a reply always gets it.
- With `chunking` on (the default) the EHLO reply offers CHUNKING (RFC 3030) and BDAT is taken:
  `BDAT <size> [LAST]` followed at once by exactly <size> octets of the message. The chunk is
  always read whole before any reply (also when it is refused, so the session stays in step);
  a message over the size limit is refused (552) and its transaction ended, as RFC 3030
  prescribes. The LAST chunk goes through the same hook as DATA content: the same faults,
  latency, record and reply (a dropped connection there also loses the MAIL and RCPT replies
  held for the group: the client sees only the close, as from a relay that crashed). A BDAT
  refused for want of RCPT leaves the MAIL transaction open, as DATA does. A BDAT line whose
  size cannot be read is answered 501 and the
  connection closed (the octets that follow could not be told from commands).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import re
import socket
import ssl
import threading
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, AnyStr

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session

from services.smtp_sink.config import SinkConfig
from services.smtp_sink.faults import FaultPlan, Outcome
from services.smtp_sink.records import Record, RecordLog, build_record

EventCallback = Callable[[str, dict[str, Any]], None]

_log = logging.getLogger(__name__)

# Name announced in the greeting/EHLO. Set explicitly because aiosmtpd otherwise calls
# socket.getfqdn() for every connection: a DNS lookup that blocks the loop for seconds when no
# resolver answers (no network here).
_HOSTNAME = "smtp-sink.local"
# Idle time after which a connection is closed: guards against clients that vanished without
# closing (killed sender), whose connections would otherwise pile up forever.
_IDLE_TIMEOUT_S = 300.0
# Largest message accepted (bytes): guards against a runaway client filling memory.
_DATA_SIZE_LIMIT = 32 * 1024 * 1024
# Listen backlog: a burst of senders opening connections at once must not get refusals
# while the loop is busy.
_BACKLOG = 1024
# How long start() waits for the server thread to listen: guards against a thread that died
# or hung during start-up leaving the caller waiting forever.
_START_TIMEOUT_S = 10.0
# How long stop() waits for the server thread to finish: guards against a wedged loop hanging
# the caller (a test, the process shutdown) forever.
_STOP_TIMEOUT_S = 10.0
# After aborting a transport the handler waits to be cancelled by connection_lost (scheduled
# on the next loop iteration). The bound guards against leaking a handler forever should that
# cancellation never come; any reply written afterwards goes to a closed transport.
_DROP_SETTLE_S = 5.0

# "<local@domain>" followed by optional parameters, with a dot-atom local part and a plain
# host name: the subset of addresses that needs no RFC 5322 parsing (see _SinkSMTP._getaddr).
_SIMPLE_ADDRESS = re.compile(
    r"\s*<(?P<local>[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*)"
    r"@(?P<domain>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)>(?P<rest>.*)\Z",
    re.DOTALL,
)

# "BDAT <size> [LAST]" (RFC 3030 2); ten digits hold any size the limit above lets through.
_BDAT_ARGUMENTS = re.compile(r"(?P<size>[0-9]{1,10})(?:[ \t]+(?P<last>LAST))?", re.IGNORECASE)
# A chunk over the size limit is read and dropped in pieces of this size: it is consumed
# (the session stays in step) without being held in memory.
_DISCARD_PIECE = 64 * 1024

_TEMPFAIL_REPLY = "451 4.3.0 Temporary failure (injected by smtp-sink)"
_PERMFAIL_REPLY = "550 5.1.1 Mailbox unavailable (injected by smtp-sink)"
_ACCEPT_REPLY = "250 2.0.0 OK"
_REFUSE_GREETING = "421 4.3.2 Service not available (refused by smtp-sink)"


def _not_deprecation_noise(record: logging.LogRecord) -> bool:
    # aiosmtpd warns about its own internal use of Session.login_data on every login.
    return "login_data is deprecated" not in record.getMessage()


class _SinkEnvelope(Envelope):
    """An envelope that also carries the outcome drawn for its transaction."""

    def __init__(self) -> None:
        super().__init__()
        self.outcome: Outcome | None = None


def _grouped(command: Callable[[SMTP, str], Awaitable[None]]) -> Callable[[_SinkSMTP, str], Awaitable[None]]:
    """aiosmtpd's `command`, its reply held back while more commands of its group wait."""

    @functools.wraps(command)  # keeps aiosmtpd's HELP syntax attributes
    async def answer(self: _SinkSMTP, arg: str) -> None:
        self._in_group = self._pipelining
        try:
            await command(self, arg)
        finally:
            self._in_group = False

    return answer


class _SinkSMTP(SMTP):
    """aiosmtpd's protocol, with our envelopes, a registry of open connections and the replies
    to a pipelined group written together."""

    def __init__(self, handler: _Handler, connections: set[_SinkSMTP], *,
                 refuse: bool = False, pipelining: bool = False, chunking: bool = False,
                 **kwargs: Any) -> None:
        # Before aiosmtpd's constructor, which resets the transaction state (see below).
        self._chunks: list[bytes] = []  # BDAT chunks of the transaction so far
        self._chunked_bytes = 0
        super().__init__(handler, **kwargs)
        self._connections = connections
        self._refuse = refuse
        self._pipelining = pipelining
        self._chunking = chunking
        self._in_group = False  # answering MAIL / RCPT / RSET (see _grouped)
        self._held: list[bytes] = []  # replies waiting for the rest of their group

    # RFC 2920 3.1: the replies a server may hold back for its group's last command.
    smtp_MAIL = _grouped(SMTP.smtp_MAIL)
    smtp_RCPT = _grouped(SMTP.smtp_RCPT)
    smtp_RSET = _grouped(SMTP.smtp_RSET)

    async def push(self, status: AnyStr) -> None:
        if self._in_group and self._command_waiting():
            # One write (one send here, one wake-up of the client) for the whole group.
            self._held.append(self._reply_bytes(status))
            return
        if not self._held:
            await super().push(status)  # nothing held: aiosmtpd's own path
            return
        replies = b"\r\n".join([*self._held, self._reply_bytes(status)])
        self._held = []
        await super().push(replies)  # aiosmtpd adds the last CRLF

    def _reply_bytes(self, status: AnyStr) -> bytes:
        """A reply as aiosmtpd's push would encode it."""
        if isinstance(status, bytes):
            return status
        return status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")

    def _command_waiting(self) -> bool:
        """A complete command line is already buffered: reading it will not wait for the
        client, so a held reply is flushed before the sink ever waits on the client."""
        buffered = getattr(self._reader, "_buffer", None)  # asyncio.StreamReader's buffer
        return buffered is not None and b"\n" in buffered

    async def _handle_client(self) -> None:
        if not self._refuse:
            await super()._handle_client()
            return
        # A relay that is up but takes no mail: 421 instead of the 220 greeting, then close.
        await self.push(_REFUSE_GREETING)
        if self.transport is not None:
            self.transport.close()

    def _create_envelope(self) -> _SinkEnvelope:
        return _SinkEnvelope()

    # aiosmtpd resets a transaction through these two (RSET, a new EHLO, the end of DATA).
    def _set_rset_state(self) -> None:
        self._drop_chunks()
        super()._set_rset_state()

    def _set_post_data_state(self) -> None:
        self._drop_chunks()
        super()._set_post_data_state()

    def _drop_chunks(self) -> None:
        self._chunks = []
        self._chunked_bytes = 0

    async def smtp_BDAT(self, arg: str) -> None:
        """RFC 3030 CHUNKING: one chunk of the message; the LAST one completes it like DATA."""
        if not self._chunking:
            await self.push('500 Error: command "BDAT" not recognized')
            return
        parsed = _BDAT_ARGUMENTS.fullmatch(arg.strip()) if arg else None
        if parsed is None:
            await self.push("501 5.5.4 Syntax: BDAT <size> [LAST]")
            if self.transport is not None:
                self.transport.close()
            return
        size, last = int(parsed["size"]), parsed["last"] is not None
        try:
            chunk = await self._read_chunk(size)
        except asyncio.IncompleteReadError:
            return  # the client closed mid-chunk: nothing to answer, nothing recorded
        if await self.check_helo_needed() or await self.check_auth_needed("BDAT"):
            self._drop_chunks()
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            self._drop_chunks()
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if chunk is None:
            self._set_post_data_state()
            await self.push("552 5.3.4 Error: Too much mail data")
            return
        self._chunks.append(chunk)
        self._chunked_bytes += size
        if not last:
            await self.push(f"250 2.0.0 {size} octets received")
            return
        content = b"".join(self._chunks)
        self._drop_chunks()
        self.envelope.original_content = content
        self.envelope.content = (
            content.decode("utf-8", errors="surrogateescape") if self._decode_data else content)
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    async def _read_chunk(self, size: int) -> bytes | None:
        """The chunk's octets, or None (read and dropped) when the message would exceed the
        size limit."""
        limit = self.data_size_limit
        if not limit or self._chunked_bytes + size <= limit:
            return await self._reader.readexactly(size)
        remaining = size
        while remaining:
            remaining -= len(await self._reader.readexactly(min(remaining, _DISCARD_PIECE)))
        return None

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd parses every MAIL/RCPT address with the email package's RFC 5322 parser,
        # a large share of the per-message CPU. Plain "<local@domain>" addresses (what senders
        # use) are taken by a regex; anything else still goes through the full parser.
        match = _SIMPLE_ADDRESS.match(arg)
        limit = self.local_part_limit  # 0 means unlimited, as in aiosmtpd
        if match is None or (limit and len(match["local"]) > limit):
            result: tuple[str | None, str | None] = super()._getaddr(arg)
            return result
        return f"{match['local']}@{match['domain']}", match["rest"].lstrip()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._connections.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._connections.discard(self)
        super().connection_lost(error)


class _Handler:
    """aiosmtpd hooks: draw one outcome per transaction at the first RCPT, apply it.

    Runs only on the server's event loop thread, so the random generator needs no lock.
    """

    def __init__(
        self,
        config: SinkConfig,
        records: RecordLog,
        stats: Counter[str],
        stats_lock: threading.Lock,
        on_event: EventCallback | None,
        logins: Counter[str] | None = None,
    ) -> None:
        self._plan = FaultPlan.from_config(config)
        self._rng = random.Random(config.seed)
        self._latency_s = config.latency_ms / 1000.0
        self._records = records
        self._stats = stats
        self._stats_lock = stats_lock
        self._on_event = on_event
        self._accounts = {name.encode(): password.encode()
                          for name, password in config.auth_users.items()}
        self._describe_session = config.tls or bool(config.auth_users)
        self._pipelining = config.pipelining
        self._chunking = config.chunking
        self.logins: Counter[str] = logins if logins is not None else Counter()

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        """aiosmtpd's authenticator: PLAIN and LOGIN against the configured accounts."""
        ok = (isinstance(auth_data, LoginPassword)
              and self._accounts.get(auth_data.login) == auth_data.password)
        with self._stats_lock:
            self.logins["ok" if ok else "refused"] += 1
        user = auth_data.login.decode("utf-8", "replace") if isinstance(auth_data, LoginPassword) else None
        self._emit("auth_succeeded" if ok else "auth_refused", {"user": user, "mechanism": mechanism})
        # handled=False: aiosmtpd writes the 235 / 535 reply itself.
        return AuthResult(success=ok, handled=False, auth_data=user if ok else None)

    async def handle_EHLO(  # name fixed by aiosmtpd
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        """The EHLO reply lines, with PIPELINING and CHUNKING offered when configured."""
        session.host_name = hostname  # this hook's duty, says aiosmtpd
        if self._chunking:
            responses.insert(1, "250-CHUNKING")
        if self._pipelining:
            responses.insert(1, "250-PIPELINING")  # after the greeting line, as Postfix does
        return responses

    async def handle_RCPT(  # name fixed by aiosmtpd
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        assert isinstance(envelope, _SinkEnvelope)
        if envelope.outcome is None:
            envelope.outcome = self._plan.decide(self._rng)
        if envelope.outcome is Outcome.DROP_BEFORE_DATA:
            await self._drop(server, envelope, Outcome.DROP_BEFORE_DATA, rcpt=address)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(  # name fixed by aiosmtpd
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        assert isinstance(envelope, _SinkEnvelope)
        outcome = envelope.outcome or self._plan.decide(self._rng)
        if self._latency_s > 0:
            await asyncio.sleep(self._latency_s)
        if outcome is Outcome.ACCEPT:
            content = envelope.original_content or b""
            record = build_record(envelope.mail_from, envelope.rcpt_tos, content)
            if self._describe_session:
                transport = server.transport
                tls = transport is not None and transport.get_extra_info("ssl_object") is not None
                record["session"] = {"tls": tls,
                                     "auth_user": session.auth_data if session.authenticated else None}
            # The record is complete (and flushed) before the 250 is returned: see module doc.
            self._records.append(record)
            self._count(Outcome.ACCEPT)
            self._emit("message_accepted", _summary(record))
            return _ACCEPT_REPLY
        if outcome is Outcome.DROP_AFTER_DATA:
            await self._drop(server, envelope, outcome)
        self._count(outcome)
        self._emit("fault_injected", _fault_fields(envelope, outcome))
        return _TEMPFAIL_REPLY if outcome is Outcome.TEMPFAIL else _PERMFAIL_REPLY

    async def _drop(
        self, server: SMTP, envelope: _SinkEnvelope, outcome: Outcome, rcpt: str | None = None
    ) -> None:
        """Close the connection without a reply; returns only if never cancelled."""
        self._count(outcome)
        fields = _fault_fields(envelope, outcome)
        if rcpt is not None:
            fields["rcpt_tos"] = [*fields["rcpt_tos"], rcpt]
        self._emit("fault_injected", fields)
        # abort(), not close(): no pending output is flushed, and connection_lost runs on the
        # next loop iteration, which cancels this coroutine before any reply is written.
        _abort(server.transport)
        await asyncio.sleep(_DROP_SETTLE_S)

    def _count(self, outcome: Outcome) -> None:
        with self._stats_lock:
            self._stats[outcome.value] += 1

    def _emit(self, event: str, fields: dict[str, Any]) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event, fields)
        except Exception:
            # A broken observer must not turn a recorded message into a 500 reply.
            _log.exception("smtp-sink event callback failed")


def _summary(record: Record) -> dict[str, Any]:
    return {
        "message_id": record["message_id"],
        "mail_from": record["mail_from"],
        "rcpt_tos": record["rcpt_tos"],
        "subject": record["subject"],
    }


def _fault_fields(envelope: Envelope, outcome: Outcome) -> dict[str, Any]:
    return {
        "outcome": outcome.value,
        "mail_from": envelope.mail_from,
        "rcpt_tos": list(envelope.rcpt_tos),
    }


def _abort(transport: asyncio.BaseTransport | None) -> None:
    if isinstance(transport, asyncio.Transport):
        transport.abort()
    elif transport is not None:
        transport.close()


def _bind(host: str, port: int) -> socket.socket:
    """A bound, listening socket; port 0 gets a free port from the kernel, with no race."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        # Lets a restarted sink reuse its port while old connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(_BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class SmtpSink:
    """An in-process SMTP server recording what it accepts and injecting configured faults.

    Usage: `with SmtpSink(SinkConfig(port=0)) as sink: smtplib.SMTP(sink.host, sink.port)`.
    `start()` returns once the port accepts connections; `stop()` closes every connection,
    stops the thread and flushes the record file. A sink is started at most once.
    """

    def __init__(self, config: SinkConfig | None = None, *, on_event: EventCallback | None = None) -> None:
        self.config = config or SinkConfig()
        self._records = RecordLog(None)  # replaced by start(); lets readers work before it
        self._stats: Counter[str] = Counter()
        self._logins: Counter[str] = Counter()
        self._stats_lock = threading.Lock()
        self._on_event = on_event
        self._tls_context: ssl.SSLContext | None = None
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._error: BaseException | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> SmtpSink:
        if self._thread is not None:
            raise RuntimeError("SmtpSink already started")
        # aiosmtpd logs every SMTP command at INFO on "mail.log"; at thousands of messages per
        # second that is both noise and a real CPU cost, so only its warnings get through.
        logging.getLogger("mail.log").setLevel(logging.WARNING)
        logging.getLogger("mail.log").addFilter(_not_deprecation_noise)  # idempotent
        if self.config.tls_cert is not None and self.config.tls_key is not None:
            # Loaded here, not on the server thread: a bad certificate fails start() itself.
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
            self._tls_context = context
        sock = _bind(self.config.host, self.config.port)
        self._port = sock.getsockname()[1]
        self._records = RecordLog(self.config.record_path, self.config.keep_in_memory)
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(sock, ready), name=f"smtp-sink:{self._port}", daemon=True
        )
        self._thread.start()
        if not ready.wait(_START_TIMEOUT_S) or self._error is not None:
            self.stop()
            raise RuntimeError(f"SMTP sink failed to start on port {self._port}") from self._error
        return self

    def stop(self) -> None:
        """Close all connections, stop the server thread, flush and close the record file.
        Idempotent."""
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is not None and thread.is_alive():
            if loop is not None and stop_event is not None:
                try:
                    loop.call_soon_threadsafe(stop_event.set)
                except RuntimeError:
                    pass  # loop already closed: the thread is on its way out
            thread.join(_STOP_TIMEOUT_S)
            if thread.is_alive():
                _log.error("smtp-sink thread did not stop within %ss", _STOP_TIMEOUT_S)
        self._records.close()

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- what tests and tools read ------------------------------------------------------------

    @property
    def host(self) -> str:
        return self.config.host

    @property
    def port(self) -> int:
        """The port actually listened on (the chosen free one when configured with 0)."""
        return self._port if self._port is not None else self.config.port

    @property
    def messages(self) -> list[Record]:
        """Snapshot of the accepted messages, in acceptance order."""
        return self._records.snapshot()

    @property
    def logins(self) -> dict[str, int]:
        """AUTH attempts: {"ok": n, "refused": m}."""
        with self._stats_lock:
            return {"ok": self._logins["ok"], "refused": self._logins["refused"]}

    @property
    def stats(self) -> dict[str, int]:
        """Count of applied outcomes, keyed by `Outcome.value` (every outcome present)."""
        with self._stats_lock:
            return {outcome.value: self._stats[outcome.value] for outcome in Outcome}

    def wait_for_messages(self, count: int, timeout: float = 10.0) -> bool:
        """Block until at least `count` messages were accepted; False on timeout."""
        return self._records.wait_for(count, timeout)

    def clear(self) -> None:
        """Forget accepted messages and stats in memory (the record file keeps its lines)."""
        self._records.clear()
        with self._stats_lock:
            self._stats.clear()

    # -- server thread -------------------------------------------------------------------------

    def _run(self, sock: socket.socket, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve(sock, ready))
        except BaseException as error:  # reported to start(), which re-raises
            self._error = error
            _log.exception("smtp-sink server thread failed")
        finally:
            ready.set()
            sock.close()
            loop.close()

    async def _serve(self, sock: socket.socket, ready: threading.Event) -> None:
        loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._loop = loop
        connections: set[_SinkSMTP] = set()
        handler = _Handler(self.config, self._records, self._stats, self._stats_lock, self._on_event,
                           self._logins)
        config = self.config
        starttls = self._tls_context if not config.implicit_tls else None
        security: dict[str, Any] = {}
        if starttls is not None:
            security.update(tls_context=starttls, require_starttls=config.require_starttls)
        if config.auth_users:
            security.update(
                authenticator=handler.authenticate,
                auth_required=True,
                # Over implicit TLS the whole session is encrypted, but aiosmtpd only knows
                # about STARTTLS; it would refuse AUTH (538) without this.
                auth_require_tls=config.auth_require_tls and not config.implicit_tls,
            )

        def factory() -> _SinkSMTP:
            with warnings.catch_warnings():
                # aiosmtpd warns about AUTH without STARTTLS, not knowing of implicit TLS.
                warnings.simplefilter("ignore", UserWarning)
                return _SinkSMTP(
                    handler,
                    connections,
                    refuse=config.refuse_connections,
                    pipelining=config.pipelining,
                    chunking=config.chunking,
                    hostname=_HOSTNAME,
                    timeout=_IDLE_TIMEOUT_S,
                    data_size_limit=_DATA_SIZE_LIMIT,
                    enable_SMTPUTF8=config.smtputf8,
                    loop=loop,
                    **security,
                )

        server = await loop.create_server(
            factory, sock=sock, backlog=_BACKLOG,
            ssl=self._tls_context if config.implicit_tls else None)
        ready.set()
        await self._stop_event.wait()

        server.close()
        for protocol in list(connections):
            _abort(protocol.transport)
        await server.wait_closed()
        # Let the handlers cancelled by connection_lost finish before the loop closes.
        pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
