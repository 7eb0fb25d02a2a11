"""SMTP PIPELINING (RFC 2920) in the sink and in the sender's SMTP connection (the DATA path:
sinks here do not offer CHUNKING; BDAT is in test_smtp_chunking.py).

The sink (in-process, on a free loopback port) is driven over raw sockets, so commands really
arrive together in one segment; the sender's `SmtpConnection` is checked against the sink with
pipelining on and off (same outcomes), and against a tiny scripted relay over a loopback
socket for what the sink never does (answering 354 after refusing RCPT, hanging up right
after a refusal) and to see exactly which bytes the sender writes when.
"""

from __future__ import annotations

import smtplib
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from services.sender.mime import OutgoingMail
from services.sender.replies import Attempt, Verdict
from services.sender.smtp_pool import Security, SmtpConnection, tls_context
from services.smtp_sink import SinkConfig, SmtpSink
from services.smtp_sink.certificates import Certificate, self_signed
from tests.sink_settings import sink_config_from

pytestmark = pytest.mark.integration

# Socket timeout of the test's own clients and of the scripted relay: guards against a bug
# (a held reply, a client waiting for a reply that never comes) hanging the run instead of
# failing it.
TIMEOUT_S = 5.0
# The sender's timeout against the scripted relay: a sender that waits for a reply the relay
# withholds (because it wants the whole group first) fails quickly instead of hanging.
SENDER_TIMEOUT_S = 2.0

GROUP = b"MAIL FROM:<news@example.com>\r\nRCPT TO:<jane@example.org>\r\nDATA\r\n"
CONTENT = (b"From: news@example.com\r\nTo: jane@example.org\r\nSubject: piped\r\n"
           b"Message-ID: <piped-1@example.com>\r\n\r\nhello\r\n.\r\n")


def mail(n: int, sender: str = "news@example.com", recipient: str | None = None) -> OutgoingMail:
    recipient = recipient or f"user{n}@example.org"
    message_id = f"<pipelining-{n}@example.com>"
    content = (f"From: {sender}\r\nTo: {recipient}\r\nSubject: test {n}\r\n"
               f"Message-ID: {message_id}\r\n\r\nHello {n}\r\n.leading dot\r\n").encode()
    return OutgoingMail(message_id, sender, recipient, content)


def connection(port: int, timeout: float = TIMEOUT_S, **extra: object) -> SmtpConnection:
    return SmtpConnection("127.0.0.1", port, "test.localhost", timeout, **extra)  # type: ignore[arg-type]


# --- the sink, over a raw socket ----------------------------------------------------------------


class RawClient:
    """A socket speaking SMTP by hand, reading replies line by line."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
        self.buffer = b""

    def replies(self, count: int) -> list[tuple[int, str]]:
        """The next `count` replies (multi-line ones as their last line)."""
        found: list[tuple[int, str]] = []
        while len(found) < count:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise ConnectionError(f"closed after {found}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            if line[3:4] != b"-":
                found.append((int(line[:3]), line[4:].decode()))
        return found

    def closed(self) -> bool:
        """The sink closed the connection without saying anything more."""
        try:
            return self.buffer == b"" and self.sock.recv(4096) == b""
        except ConnectionResetError:
            return True

    def hello(self) -> list[str]:
        self.replies(1)  # greeting
        self.sock.sendall(b"EHLO test.localhost\r\n")
        lines: list[str] = []
        while True:
            while b"\r\n" not in self.buffer:
                self.buffer += self.sock.recv(4096)
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line[4:].decode())
            if line[3:4] == b" ":
                return lines

    def close(self) -> None:
        self.sock.close()


@contextmanager
def raw_client(sink: SmtpSink) -> Iterator[RawClient]:
    client = RawClient(sink.port)
    try:
        yield client
    finally:
        client.close()


@pytest.mark.parametrize("pipelining", [True, False])
def test_ehlo_offers_pipelining_unless_switched_off(pipelining: bool) -> None:
    with SmtpSink(SinkConfig(port=0, pipelining=pipelining)) as sink, raw_client(sink) as client:
        assert ("PIPELINING" in client.hello()) is pipelining


def test_pipelining_is_on_by_default_and_switched_off_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert SinkConfig(port=0).pipelining
    assert sink_config_from(monkeypatch, {"SMTP_PORT": "0"}).pipelining
    assert not sink_config_from(monkeypatch, {"SMTP_PORT": "0", "SINK_PIPELINING": "0"}).pipelining
    with pytest.raises(ValueError, match="SINK_PIPELINING"):
        sink_config_from(monkeypatch, {"SINK_PIPELINING": "sometimes"})


@pytest.mark.parametrize("pipelining", [True, False])
def test_a_group_in_one_segment_is_answered_in_order_and_recorded_once(pipelining: bool) -> None:
    with SmtpSink(SinkConfig(port=0, pipelining=pipelining)) as sink, raw_client(sink) as client:
        client.hello()
        for _ in range(3):  # one connection, several pipelined transactions
            client.sock.sendall(GROUP)
            assert [code for code, _ in client.replies(3)] == [250, 250, 354]
            client.sock.sendall(CONTENT)
            assert client.replies(1)[0][0] == 250
        records = sink.messages
    assert [(r["mail_from"], r["rcpt_tos"], r["message_id"]) for r in records] == [
        ("news@example.com", ["jane@example.org"], "<piped-1@example.com>")] * 3


def test_a_refused_rcpt_in_a_group_is_answered_and_data_refused_then_the_session_goes_on() -> None:
    with SmtpSink(SinkConfig(port=0)) as sink, raw_client(sink) as client:
        client.hello()
        client.sock.sendall(b"MAIL FROM:<news@example.com>\r\nRCPT TO:<x@>\r\nDATA\r\n")
        assert [code for code, _ in client.replies(3)] == [250, 553, 503]
        client.sock.sendall(b"RSET\r\n" + GROUP)  # RSET pipelined too, as RFC 2920 allows
        assert [code for code, _ in client.replies(4)] == [250, 250, 250, 354]
        client.sock.sendall(CONTENT)
        assert client.replies(1)[0][0] == 250
        assert [r["rcpt_tos"] for r in sink.messages] == [["jane@example.org"]]


@pytest.mark.parametrize(("fault", "code", "stat"), [
    ("tempfail_rate", 451, "tempfail"),
    ("permfail_rate", 550, "permfail"),
])
def test_refusing_faults_apply_to_pipelined_transactions(fault: str, code: int, stat: str) -> None:
    config = SinkConfig(port=0, **{fault: 1.0})  # type: ignore[arg-type]
    with SmtpSink(config) as sink, raw_client(sink) as client:
        client.hello()
        for _ in range(2):  # the session stays usable after each refusal
            client.sock.sendall(GROUP)
            assert [c for c, _ in client.replies(3)] == [250, 250, 354]
            client.sock.sendall(CONTENT)
            assert client.replies(1)[0][0] == code
        assert sink.messages == []
        assert sink.stats[stat] == 2


def test_a_drop_before_data_closes_a_pipelined_group_without_a_354() -> None:
    with SmtpSink(SinkConfig(port=0, drop_before_data_rate=1.0)) as sink, raw_client(sink) as client:
        client.hello()
        client.sock.sendall(GROUP)
        with pytest.raises((ConnectionError, OSError)) as lost:
            client.replies(3)
        assert "354" not in str(lost.value)
        assert sink.messages == []
        assert sink.stats["drop_before_data"] == 1


def test_a_drop_after_data_closes_a_pipelined_transaction_without_a_reply() -> None:
    with SmtpSink(SinkConfig(port=0, drop_rate=1.0)) as sink, raw_client(sink) as client:
        client.hello()
        client.sock.sendall(GROUP)
        assert [c for c, _ in client.replies(3)] == [250, 250, 354]
        client.sock.sendall(CONTENT)
        assert client.closed()
        assert sink.messages == []
        assert sink.stats["drop_after_data"] == 1


def test_a_reply_is_never_held_when_no_complete_command_waits() -> None:
    with SmtpSink(SinkConfig(port=0)) as sink, raw_client(sink) as client:
        client.hello()
        client.sock.sendall(b"MAIL FROM:<news@example.com>\r\n")  # alone: answered at once
        assert client.replies(1)[0][0] == 250
        client.sock.sendall(b"RSET\r\nMAIL FROM:<news@example.com>\r\nRCPT TO:<ja")  # half a line
        assert [c for c, _ in client.replies(2)] == [250, 250]
        client.sock.sendall(b"ne@example.org>\r\n")
        assert client.replies(1)[0][0] == 250
        client.sock.sendall(b"RSET\r\nNOOP\r\n")  # NOOP ends the group: never held
        assert [c for c, _ in client.replies(2)] == [250, 250]
        # QUIT is never held, even with more waiting: the sink closes right after it.
        client.sock.sendall(b"RSET\r\nQUIT\r\nNOOP\r\n")
        assert [c for c, _ in client.replies(2)] == [250, 221]


# --- the sender against the sink -------------------------------------------------------------------


@pytest.mark.parametrize("pipelining", [True, False])
def test_the_sender_pipelines_when_offered_and_each_mail_is_recorded_once(pipelining: bool) -> None:
    mails = [mail(n) for n in range(30)]
    with SmtpSink(SinkConfig(port=0, pipelining=pipelining, chunking=False)) as sink:
        smtp = connection(sink.port)
        try:
            attempts = [smtp.transmit(m) for m in mails]
            assert smtp.pipelining is pipelining
        finally:
            smtp.close()
        records = sink.messages
    assert [(a.verdict, a.code) for a in attempts] == [(Verdict.SENT, 250)] * 30
    assert [(r["message_id"], r["rcpt_tos"]) for r in records] == [
        (m.message_id, [m.recipient]) for m in mails]
    assert records[0]["body"].replace("\r\n", "\n") == "Hello 0\n.leading dot\n"  # dot-stuffed


@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize(("fault", "verdict", "code", "ambiguous"), [
    ("tempfail_rate", Verdict.TRANSIENT, 451, False),
    ("permfail_rate", Verdict.PERMANENT, 550, False),
    ("drop_rate", Verdict.TRANSIENT, None, True),
    ("drop_before_data_rate", Verdict.TRANSIENT, None, False),
])
def test_the_sinks_faults_classify_alike_with_and_without_pipelining(
        pipelining: bool, fault: str, verdict: Verdict, code: int | None, ambiguous: bool) -> None:
    config = SinkConfig(port=0, pipelining=pipelining, chunking=False,
                        **{fault: 1.0})  # type: ignore[arg-type]
    with SmtpSink(config) as sink:
        smtp = connection(sink.port)
        try:
            attempts = [smtp.transmit(mail(n)) for n in range(3)]  # also: reconnects after drops
        finally:
            smtp.close()
        assert sink.messages == []
    assert [(a.verdict, a.code, a.ambiguous) for a in attempts] == [(verdict, code, ambiguous)] * 3
    if fault == "drop_before_data_rate":
        assert all(a.text.startswith("envelope:") for a in attempts), attempts


def _mixed_mails() -> list[OutgoingMail]:
    """Mails with refusals at MAIL (every 7th), at RCPT (every 5th) mixed in."""
    mails = []
    for n in range(60):
        sender = "bad@" if n % 7 == 3 else "news@example.com"
        recipient = "x@" if n % 5 == 2 else None
        mails.append(mail(n, sender, recipient))
    return mails


def _outcomes(pipelining: bool, mails: list[OutgoingMail]) -> tuple[list[Attempt], list[str]]:
    config = SinkConfig(port=0, pipelining=pipelining, chunking=False, tempfail_rate=0.2,
                        permfail_rate=0.2,
                        seed=2920)
    with SmtpSink(config) as sink:
        smtp = connection(sink.port)
        try:
            attempts = [smtp.transmit(m) for m in mails]
            assert smtp.is_open, "refusals keep the session (RSET), no reconnect needed"
        finally:
            smtp.close()
        return attempts, [r["message_id"] for r in sink.messages]


def test_mixed_refusals_over_one_connection_leave_no_stray_reply() -> None:
    mails = _mixed_mails()
    piped, piped_recorded = _outcomes(True, mails)
    lockstep, lockstep_recorded = _outcomes(False, mails)
    # Same seeded sink, same mails: the same outcome for every mail, in either mode. A reply
    # left behind would shift every later outcome by one.
    assert [(a.verdict, a.code, a.text) for a in piped] == [
        (a.verdict, a.code, a.text) for a in lockstep]
    assert piped_recorded == lockstep_recorded
    for m, attempt in zip(mails, piped, strict=True):
        if m.sender == "bad@":
            assert (attempt.verdict, attempt.code) == (Verdict.PERMANENT, 553)  # at MAIL
        elif m.recipient == "x@":
            assert (attempt.verdict, attempt.code) == (Verdict.PERMANENT, 553)  # at RCPT
        else:
            assert attempt.code in (250, 451, 550)
    assert piped_recorded == [m.message_id for m, a in zip(mails, piped, strict=True)
                              if a.verdict is Verdict.SENT]
    assert {a.code for a in piped} == {250, 451, 550, 553}  # every kind really happened


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    return self_signed(tmp_path_factory.mktemp("tls"))


def test_pipelining_over_starttls(certificate: Certificate) -> None:
    config = SinkConfig(port=0, tls_cert=certificate.cert, tls_key=certificate.key,
                        require_starttls=True, chunking=False)
    with SmtpSink(config) as sink:
        smtp = connection(sink.port, security=Security.STARTTLS,
                          context=tls_context(certificate.cert))
        try:
            attempts = [smtp.transmit(mail(n)) for n in range(3)]
            assert smtp.pipelining  # read from the EHLO after STARTTLS
        finally:
            smtp.close()
        assert [a.verdict for a in attempts] == [Verdict.SENT] * 3
        assert [r["session"]["tls"] for r in sink.messages] == [True] * 3


# --- the sender against a scripted relay ----------------------------------------------------------


class ScriptedRelay:
    """One connection served by `script(relay)` on a loopback port; records what it read."""

    def __init__(self, script: Callable[[ScriptedRelay], None], pipelining: bool = True,
                 chunking: bool = False) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT_S)
        self.port: int = self.listener.getsockname()[1]
        self.script = script
        self.pipelining = pipelining
        self.chunking = chunking
        self.received = b""  # everything received, in order
        self.consumed = 0  # how much of it the script has read
        self.errors: list[BaseException] = []
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
            conn.settimeout(TIMEOUT_S)
            self.conn = conn
            with conn:
                conn.sendall(b"220 scripted.localhost ESMTP\r\n")
                self.read_until(b"\r\n")  # EHLO
                extensions = ((b"250-PIPELINING\r\n" if self.pipelining else b"")
                              + (b"250-CHUNKING\r\n" if self.chunking else b""))
                conn.sendall(b"250-scripted.localhost\r\n" + extensions + b"250 8BITMIME\r\n")
                self.script(self)
        except BaseException as error:  # surfaced by finish()
            self.errors.append(error)
        finally:
            self.listener.close()

    def read_until(self, marker: bytes) -> bytes:
        """Everything up to and including the next `marker` (more stays buffered)."""
        assert self.conn is not None
        while (end := self.received.find(marker, self.consumed)) < 0:
            chunk = self.conn.recv(4096)
            if not chunk:
                raise ConnectionError(f"client closed; read {self.received!r}")
            self.received += chunk
        start, self.consumed = self.consumed, end + len(marker)
        return self.received[start:self.consumed]

    @property
    def unread(self) -> bytes:
        """Received but not yet read by the script."""
        return self.received[self.consumed:]

    def reply(self, *lines: bytes) -> None:
        assert self.conn is not None
        self.conn.sendall(b"".join(line + b"\r\n" for line in lines))

    def rest_until_closed(self) -> bytes:
        """Whatever the client still writes before it closes the connection."""
        assert self.conn is not None
        while chunk := self.conn.recv(4096):
            self.received += chunk
        return self.unread

    def finish(self) -> None:
        self.thread.join(TIMEOUT_S * 2)
        assert not self.thread.is_alive(), "the scripted relay is still waiting"
        assert self.errors == []


def transmit_to(relay: ScriptedRelay, *mails: OutgoingMail) -> list[Attempt]:
    smtp = connection(relay.port, SENDER_TIMEOUT_S)
    try:
        return [smtp.transmit(m) for m in mails]
    finally:
        smtp.close()


def test_mail_rcpt_and_data_go_out_together_and_content_only_after_354() -> None:
    after_group: list[bytes] = []

    def script(relay: ScriptedRelay) -> None:
        # No reply before the whole group is in: a sender waiting for one would time out.
        group = relay.read_until(b"DATA\r\n")
        assert group == b"MAIL FROM:<news@example.com>\r\nRCPT TO:<user1@example.org>\r\nDATA\r\n"
        after_group.append(relay.unread)  # nothing beyond DATA before the 354
        relay.reply(b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"354 go ahead")
        relay.read_until(b"\r\n.\r\n")
        relay.reply(b"250 2.0.0 queued as ONE")
        assert relay.read_until(b"\r\n").upper() == b"QUIT\r\n"
        relay.reply(b"221 bye")

    relay = ScriptedRelay(script)
    [attempt] = transmit_to(relay, mail(1))
    relay.finish()
    assert (attempt.verdict, attempt.code, attempt.text) == (Verdict.SENT, 250, "2.0.0 queued as ONE")
    assert after_group == [b""]
    assert b"Subject: test 1\r\n" in relay.received


def test_without_pipelining_each_command_waits_for_its_reply() -> None:
    def script(relay: ScriptedRelay) -> None:
        for command, answer in ((b"MAIL FROM:", b"250 Ok"), (b"RCPT TO:", b"250 Ok"),
                                (b"DATA", b"354 go ahead")):
            line = relay.read_until(b"\r\n")
            assert line.startswith(command) and relay.unread == b"", relay.received
            relay.reply(answer)
        relay.read_until(b"\r\n.\r\n")
        relay.reply(b"250 queued")
        assert relay.read_until(b"\r\n").upper() == b"QUIT\r\n"
        relay.reply(b"221 bye")

    relay = ScriptedRelay(script, pipelining=False)
    [attempt] = transmit_to(relay, mail(1))
    relay.finish()
    assert attempt.verdict is Verdict.SENT


@pytest.mark.parametrize(("replies", "verdict", "code"), [
    ((b"250 Ok", b"550 5.1.1 no such user", b"354 go ahead"), Verdict.PERMANENT, 550),
    ((b"451 4.3.0 try later", b"503 need MAIL", b"354 go ahead"), Verdict.TRANSIENT, 451),
    ((b"250 Ok", b"252 cannot verify", b"354 go ahead"), Verdict.TRANSIENT, 252),
])
def test_a_relay_answering_354_after_a_refusal_gets_no_content_not_even_rset(
        replies: tuple[bytes, ...], verdict: Verdict, code: int) -> None:
    leftover: list[bytes] = []

    def script(relay: ScriptedRelay) -> None:
        relay.read_until(b"DATA\r\n")
        relay.reply(*replies)
        leftover.append(relay.rest_until_closed())

    relay = ScriptedRelay(script)
    [attempt] = transmit_to(relay, mail(1))
    relay.finish()
    assert (attempt.verdict, attempt.code) == (verdict, code)
    assert leftover == [b""], "nothing may follow DATA once the relay reads content"
    assert b"Subject:" not in relay.received


def test_a_refusal_followed_by_a_hang_up_is_the_refusal() -> None:
    def script(relay: ScriptedRelay) -> None:
        relay.read_until(b"DATA\r\n")
        relay.reply(b"421 4.3.2 shutting down")  # and the connection closes

    relay = ScriptedRelay(script)
    [attempt] = transmit_to(relay, mail(1))
    relay.finish()
    assert (attempt.verdict, attempt.code, attempt.ambiguous) == (Verdict.TRANSIENT, 421, False)


@pytest.mark.parametrize("answered", [(), (b"250 Ok",), (b"250 Ok", b"250 Ok")])
def test_a_connection_lost_before_the_354_is_a_transient_envelope_failure(
        answered: tuple[bytes, ...]) -> None:
    def script(relay: ScriptedRelay) -> None:
        relay.read_until(b"DATA\r\n")
        if answered:
            relay.reply(*answered)

    relay = ScriptedRelay(script)
    [attempt] = transmit_to(relay, mail(1))
    relay.finish()
    assert (attempt.verdict, attempt.code, attempt.ambiguous) == (Verdict.TRANSIENT, None, False)
    assert attempt.text.startswith("envelope: SMTPServerDisconnected"), attempt.text
    assert b"Subject:" not in relay.received


def test_a_refusal_is_followed_by_rset_and_the_next_mail_reads_its_own_replies() -> None:
    def script(relay: ScriptedRelay) -> None:
        relay.read_until(b"DATA\r\n")
        relay.reply(b"250 Ok", b"550 5.1.1 no such user", b"503 need RCPT")
        assert relay.read_until(b"\r\n") == b"RSET\r\n"
        relay.reply(b"250 reset")
        relay.read_until(b"DATA\r\n")
        relay.reply(b"250 Ok", b"250 Ok", b"354 go ahead")
        relay.read_until(b"\r\n.\r\n")
        relay.reply(b"250 queued as TWO")
        assert relay.read_until(b"\r\n").upper() == b"QUIT\r\n"
        relay.reply(b"221 bye")

    relay = ScriptedRelay(script)
    first, second = transmit_to(relay, mail(1), mail(2))
    relay.finish()
    assert (first.verdict, first.code) == (Verdict.PERMANENT, 550)
    assert (second.verdict, second.code, second.text) == (Verdict.SENT, 250, "queued as TWO")
    assert relay.received.count(b"Subject:") == 1


def test_smtplib_still_works_against_a_pipelining_sink() -> None:
    """smtplib ignores PIPELINING (never groups): the sink must answer it as before."""
    with SmtpSink(SinkConfig(port=0)) as sink:
        with smtplib.SMTP(sink.host, sink.port, timeout=TIMEOUT_S) as client:
            client.ehlo()
            assert client.has_extn("pipelining")
            for n in range(3):
                m = mail(n)
                client.sendmail(m.sender, [m.recipient], m.content)
        assert len(sink.messages) == 3
