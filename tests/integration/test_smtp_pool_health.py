"""Pooled SMTP sessions that died while idle: found before a mail, never counted ambiguous.

Against the project's sink restarted on its port (every pooled session closed by the relay),
and against a tiny scripted relay for what the sink never does: hanging up at the next MAIL
of a session it kept open, or going silent without closing. Each checks the `Attempt` the
pool returns (sent, not ambiguous) and that the relay really got the mail once.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

import pytest

from services.sender import smtp_pool
from services.sender.mime import OutgoingMail
from services.sender.replies import Verdict
from services.sender.smtp_pool import SmtpPool
from services.smtp_sink import SinkConfig, SmtpSink
from tests.chaos.fault_kit import free_port

pytestmark = pytest.mark.integration

# The scripted relay's own socket timeout: a bug hangs nothing for longer.
RELAY_TIMEOUT_S = 10.0


def mail(n: int) -> OutgoingMail:
    message_id = f"<health-{n}@example.com>"
    content = (f"From: news@example.com\r\nTo: user{n}@example.org\r\nSubject: {n}\r\n"
               f"Message-ID: {message_id}\r\n\r\nHello {n}\r\n").encode()
    return OutgoingMail(message_id, "news@example.com", f"user{n}@example.org", content)


@pytest.mark.parametrize("chunking", [True, False])
def test_a_relay_restarted_between_mails_costs_no_ambiguity_and_no_retry(chunking):
    port = free_port()
    pool = SmtpPool("127.0.0.1", port, 1)
    try:
        with SmtpSink(SinkConfig(port=port, chunking=chunking)) as before:
            assert pool.transmit(mail(1)).verdict is Verdict.SENT
            assert len(before.messages) == 1
        with SmtpSink(SinkConfig(port=port, chunking=chunking)) as after:
            attempt = pool.transmit(mail(2))
            assert (attempt.verdict, attempt.ambiguous) == (Verdict.SENT, False), attempt
            assert [m["message_id"] for m in after.messages] == ["<health-2@example.com>"]
    finally:
        pool.close()
    assert pool.replaced == 1  # the dead session was found at checkout, not by the mail


class TinyRelay:
    """Serves one scripted session per accepted connection, in order, on a loopback port."""

    def __init__(self, sessions: list[Callable[[Session], None]], *, chunking: bool = False) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(RELAY_TIMEOUT_S)
        self.port: int = self.listener.getsockname()[1]
        self.chunking = chunking
        self.accepted: list[bytes] = []  # the content of every message answered 250
        self.connections = 0
        self.errors: list[BaseException] = []
        self._sessions = sessions
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            for script in self._sessions:
                conn, _ = self.listener.accept()
                self.connections += 1
                conn.settimeout(RELAY_TIMEOUT_S)
                session = Session(conn, self)
                session.reply(b"220 tiny.localhost ESMTP")
                session.line()  # EHLO
                extensions = b"250-PIPELINING\r\n" + (b"250-CHUNKING\r\n" if self.chunking else b"")
                conn.sendall(b"250-tiny.localhost\r\n" + extensions + b"250 8BITMIME\r\n")
                script(session)
        except BaseException as error:  # surfaced by finish()
            self.errors.append(error)

    def finish(self) -> None:
        self._thread.join(RELAY_TIMEOUT_S)
        self.listener.close()
        assert not self.errors, self.errors


class Session:
    def __init__(self, conn: socket.socket, relay: TinyRelay) -> None:
        self.conn = conn
        self.relay = relay
        self.buffer = b""

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.conn.recv(4096)
            if not chunk:
                raise ConnectionError("client closed")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def reply(self, *lines: bytes) -> None:
        self.conn.sendall(b"".join(line + b"\r\n" for line in lines))

    def transaction(self) -> None:
        """MAIL, RCPT, DATA (pipelined), the content; 250 for all."""
        assert self.line().startswith(b"MAIL FROM:")
        assert self.line().startswith(b"RCPT TO:")
        assert self.line() == b"DATA"
        self.reply(b"250 ok", b"250 ok", b"354 go on")
        content = b""
        while (line := self.line()) != b".":
            content += line + b"\r\n"
        self.relay.accepted.append(content)
        self.reply(b"250 2.0.0 queued")

    def hang_up_at_mail(self) -> None:
        assert self.line().startswith(b"MAIL FROM:")
        self.conn.close()

    def go_silent(self) -> None:
        """Keep the connection open and never answer again (a relay host gone away)."""
        while self.conn.recv(4096):
            pass


def then(*steps: Callable[[Session], object]) -> Callable[[Session], None]:
    """One scripted session: `steps` in order on the same connection."""
    def session(s: Session) -> None:
        for step in steps:
            step(s)
    return session


def test_a_kept_session_lost_at_the_next_mail_is_retried_once_on_a_fresh_session():
    relay = TinyRelay([then(Session.transaction, Session.hang_up_at_mail),
                       then(Session.transaction, Session.line)])  # then QUIT
    pool = SmtpPool("127.0.0.1", relay.port, 1, timeout=5.0)
    try:
        first, second = pool.transmit(mail(1)), pool.transmit(mail(2))
    finally:
        pool.close()
        relay.finish()
    assert (first.verdict, second.verdict, second.ambiguous) == (Verdict.SENT, Verdict.SENT, False)
    assert relay.connections == 2 and len(relay.accepted) == 2
    assert b"Hello 2" in relay.accepted[1]


def test_a_silent_relay_is_found_by_the_idle_probe_before_the_mail(monkeypatch):
    monkeypatch.setattr(smtp_pool, "NOOP_AFTER_IDLE_SECONDS", 0.0)  # probe every reuse
    relay = TinyRelay([then(Session.transaction, Session.go_silent),
                       then(Session.transaction, Session.line)])
    pool = SmtpPool("127.0.0.1", relay.port, 1, timeout=1.0)
    try:
        first, second = pool.transmit(mail(1)), pool.transmit(mail(2))
    finally:
        pool.close()
        relay.finish()
    assert (first.verdict, second.verdict, second.ambiguous) == (Verdict.SENT, Verdict.SENT, False)
    assert relay.connections == 2 and len(relay.accepted) == 2
    assert pool.replaced == 1


def test_a_probe_answered_250_keeps_the_session(monkeypatch):
    monkeypatch.setattr(smtp_pool, "NOOP_AFTER_IDLE_SECONDS", 0.0)
    with SmtpSink(SinkConfig(port=0)) as sink:
        pool = SmtpPool("127.0.0.1", sink.port, 1)
        try:
            attempts = [pool.transmit(mail(n)) for n in range(3)]
        finally:
            pool.close()
        assert [a.verdict for a in attempts] == [Verdict.SENT] * 3
        assert len(sink.messages) == 3
    assert pool.replaced == 0
