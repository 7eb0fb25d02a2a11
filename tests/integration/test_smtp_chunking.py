"""CHUNKING (RFC 3030, BDAT) in the SMTP sink and in the sender's SMTP connection.

The sink, driven over raw loopback sockets so the command and its octets really arrive
together: offered in EHLO unless switched off, content taken byte for byte (no
dot-unstuffing), several chunks joined, refusals that keep the session in step, faults applied
to the LAST chunk like to DATA content. The sender's `SmtpConnection`: one write per
transaction when the relay offers CHUNKING and PIPELINING, the same outcomes and records as
the DATA path (one difference, stated in smtp_pool: a loss before any reply is ambiguous), and
against a scripted relay, exactly what it writes and how it reads refusals and hang-ups."""

from __future__ import annotations

import pytest

from services.sender.mime import OutgoingMail
from services.sender.replies import Attempt, Verdict
from services.smtp_sink import SinkConfig, SmtpSink
from services.smtp_sink import server as sink_server
from tests.integration.test_smtp_pipelining import (
    RawClient,
    ScriptedRelay,
    _mixed_mails,
    connection,
    mail,
    raw_client,
    transmit_to,
)
from tests.sink_settings import sink_config_from

pytestmark = pytest.mark.integration

ENVELOPE = b"MAIL FROM:<news@example.com>\r\nRCPT TO:<jane@example.org>\r\n"
# A line starting with "." stays as it is: BDAT content is counted, never dot-stuffed.
CONTENT = (b"From: news@example.com\r\nTo: jane@example.org\r\nSubject: chunked\r\n"
           b"Message-ID: <chunked-1@example.com>\r\n\r\nhello\r\n.leading dot\r\n..two\r\n")


def bdat(content: bytes, last: bool = True) -> bytes:
    return b"BDAT %d%s\r\n" % (len(content), b" LAST" if last else b"") + content


def codes(client: RawClient, count: int) -> list[int]:
    return [code for code, _ in client.replies(count)]


@pytest.mark.parametrize("chunking", [True, False])
def test_ehlo_offers_chunking_unless_switched_off(chunking: bool) -> None:
    with SmtpSink(SinkConfig(port=0, chunking=chunking)) as sink, raw_client(sink) as client:
        assert ("CHUNKING" in client.hello()) is chunking


def test_chunking_is_on_by_default_and_switched_off_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert SinkConfig(port=0).chunking
    assert sink_config_from(monkeypatch, {"SMTP_PORT": "0"}).chunking
    assert not sink_config_from(monkeypatch, {"SMTP_PORT": "0", "SINK_CHUNKING": "no"}).chunking
    with pytest.raises(ValueError, match="SINK_CHUNKING"):
        sink_config_from(monkeypatch, {"SINK_CHUNKING": "maybe"})


@pytest.mark.parametrize("pipelining", [True, False])
def test_one_write_per_transaction_is_answered_in_order_and_recorded_byte_for_byte(
    pipelining: bool,
) -> None:
    with SmtpSink(SinkConfig(port=0, pipelining=pipelining)) as sink, \
            raw_client(sink) as client:
        client.hello()
        for _ in range(3):  # one connection, several transactions
            client.sock.sendall(ENVELOPE + bdat(CONTENT))
            assert codes(client, 3) == [250, 250, 250]
        records = sink.messages
    assert [(r["mail_from"], r["rcpt_tos"], r["message_id"], r["size"]) for r in records] == [
        ("news@example.com", ["jane@example.org"], "<chunked-1@example.com>", len(CONTENT))] * 3
    assert records[0]["body"] == "hello\n.leading dot\n..two\n"


def test_chunks_are_joined_and_each_one_before_the_last_is_acknowledged() -> None:
    first, second = CONTENT[:40], CONTENT[40:]
    with SmtpSink(SinkConfig(port=0)) as sink, raw_client(sink) as client:
        client.hello()
        client.sock.sendall(ENVELOPE + bdat(first, last=False))
        assert client.replies(3)[2] == (250, "2.0.0 40 octets received")
        client.sock.sendall(bdat(second) + bdat(b"", last=True))
        # The empty LAST chunk after a completed message: no RCPT in the new transaction.
        assert codes(client, 2) == [250, 503]
        records = sink.messages
    assert [r["size"] for r in records] == [len(CONTENT)]
    assert records[0]["message_id"] == "<chunked-1@example.com>"


def test_a_chunk_without_rcpt_is_consumed_refused_and_the_session_goes_on() -> None:
    with SmtpSink(SinkConfig(port=0)) as sink, raw_client(sink) as client:
        client.hello()
        # The chunk's octets look like commands; they must be read as data, not run.
        client.sock.sendall(b"MAIL FROM:<news@example.com>\r\n" + bdat(b"QUIT\r\nRSET\r\n")
                            + b"NOOP\r\n")
        assert codes(client, 3) == [250, 503, 250]
        # As after DATA without RCPT, the MAIL transaction is still open until RSET.
        client.sock.sendall(b"RSET\r\n" + ENVELOPE + bdat(CONTENT))
        assert codes(client, 4) == [250, 250, 250, 250]
        assert len(sink.messages) == 1


def test_a_message_over_the_size_limit_is_read_refused_and_ends_the_transaction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sink_server, "_DATA_SIZE_LIMIT", 100)
    with SmtpSink(SinkConfig(port=0)) as sink, raw_client(sink) as client:
        client.hello()
        client.sock.sendall(ENVELOPE + bdat(b"x" * 60, last=False) + bdat(b"y" * 60))
        assert codes(client, 4) == [250, 250, 250, 552]
        # The transaction is over: a further chunk has no recipient.
        client.sock.sendall(bdat(b"z" * 10))
        assert codes(client, 1) == [503]
        client.sock.sendall(ENVELOPE + bdat(CONTENT[:90]))
        assert codes(client, 3) == [250, 250, 250]
        assert [r["size"] for r in sink.messages] == [90]


@pytest.mark.parametrize("argument", [b"", b"ten LAST", b"12 FIRST", b"-5 LAST"])
def test_an_unreadable_size_is_refused_and_the_connection_closed(argument: bytes) -> None:
    with SmtpSink(SinkConfig(port=0)) as sink, raw_client(sink) as client:
        client.hello()
        client.sock.sendall(ENVELOPE + b"BDAT " + argument + b"\r\nRSET\r\n")
        assert codes(client, 3) == [250, 250, 501]
        assert client.closed()
        assert sink.messages == []


def test_bdat_is_an_unknown_command_when_chunking_is_off() -> None:
    with SmtpSink(SinkConfig(port=0, chunking=False)) as sink, raw_client(sink) as client:
        client.hello()
        client.sock.sendall(ENVELOPE + b"BDAT 0 LAST\r\n")
        assert codes(client, 3) == [250, 250, 500]
        assert sink.messages == []


@pytest.mark.parametrize(("fault", "code", "stat"), [
    ("tempfail_rate", 451, "tempfail"), ("permfail_rate", 550, "permfail")])
def test_refusing_faults_apply_to_the_last_chunk(fault: str, code: int, stat: str) -> None:
    config = SinkConfig(port=0, **{fault: 1.0})  # type: ignore[arg-type]
    with SmtpSink(config) as sink, raw_client(sink) as client:
        client.hello()
        client.sock.sendall(ENVELOPE + bdat(CONTENT))
        assert codes(client, 3) == [250, 250, code]
        assert sink.messages == []
        assert sink.stats[stat] == 1


def test_a_drop_after_data_closes_the_connection_without_any_reply_of_its_group() -> None:
    # The MAIL and RCPT replies were held for the group's last command (RFC 2920), the one
    # the sink never answers: the client sees only the close, as from a relay that crashed.
    with SmtpSink(SinkConfig(port=0, drop_rate=1.0)) as sink, raw_client(sink) as client:
        client.hello()
        client.sock.sendall(ENVELOPE + bdat(CONTENT))
        assert client.closed()
        assert sink.messages == []


# --- the sender ---------------------------------------------------------------------------------


def _send_all(config: SinkConfig, mails: list[OutgoingMail]) -> tuple[list[Attempt], list[dict[str, object]], bool]:
    with SmtpSink(config) as sink:
        smtp = connection(sink.port)
        try:
            attempts = [smtp.transmit(m) for m in mails]
            chunking = smtp.chunking
        finally:
            smtp.close()
        return attempts, sink.messages, chunking


def test_the_sender_chunks_when_offered_and_records_match_the_data_path() -> None:
    mails = [mail(n) for n in range(20)]
    chunked, chunked_records, used = _send_all(SinkConfig(port=0), mails)
    plain, plain_records, unused = _send_all(SinkConfig(port=0, chunking=False), mails)
    assert (used, unused) == (True, False)
    assert [(a.verdict, a.code) for a in chunked] == [(Verdict.SENT, 250)] * 20
    keep = ("mail_from", "rcpt_tos", "message_id", "headers", "body", "size")
    assert [{k: r[k] for k in keep} for r in chunked_records] == [
        {k: r[k] for k in keep} for r in plain_records]
    assert chunked_records[0]["body"] == "Hello 0\n.leading dot\n"


def test_without_pipelining_chunking_is_not_used() -> None:
    _, records, used = _send_all(SinkConfig(port=0, pipelining=False), [mail(1)])
    assert used is False and len(records) == 1


@pytest.mark.parametrize(("fault", "verdict", "code", "ambiguous"), [
    ("tempfail_rate", Verdict.TRANSIENT, 451, False),
    ("permfail_rate", Verdict.PERMANENT, 550, False),
    ("drop_rate", Verdict.TRANSIENT, None, True),
    # Dropped at RCPT, but the content was already out and no reply came: the sender cannot
    # tell this from a drop after the message was taken (smtp_pool's module doc).
    ("drop_before_data_rate", Verdict.TRANSIENT, None, True),
])
def test_the_sinks_faults_classify_over_bdat(
        fault: str, verdict: Verdict, code: int | None, ambiguous: bool) -> None:
    attempts, records, _ = _send_all(SinkConfig(port=0, **{fault: 1.0}),  # type: ignore[arg-type]
                                     [mail(n) for n in range(3)])  # also: reconnects after drops
    assert records == []
    assert [(a.verdict, a.code, a.ambiguous) for a in attempts] == [(verdict, code, ambiguous)] * 3


def test_mixed_refusals_give_the_data_paths_outcomes_over_one_connection() -> None:
    mails = _mixed_mails()
    config = {"port": 0, "tempfail_rate": 0.2, "permfail_rate": 0.2, "seed": 3030}
    chunked, chunked_records, _ = _send_all(SinkConfig(**config), mails)  # type: ignore[arg-type]
    plain, plain_records, _ = _send_all(SinkConfig(chunking=False, **config),  # type: ignore[arg-type]
                                        mails)
    # A reply left behind would shift every later outcome by one.
    assert [(a.verdict, a.code, a.text) for a in chunked] == [
        (a.verdict, a.code, a.text) for a in plain]
    assert [r["message_id"] for r in chunked_records] == [r["message_id"] for r in plain_records]
    assert {a.code for a in chunked} == {250, 451, 550, 553}  # every kind really happened


def test_one_write_carries_mail_rcpt_bdat_and_the_content_undotted() -> None:
    written: list[bytes] = []

    def script(relay: ScriptedRelay) -> None:
        head = relay.read_until(b" LAST\r\n")
        assert head == (b"MAIL FROM:<news@example.com>\r\nRCPT TO:<user1@example.org>\r\n"
                        + b"BDAT %d LAST\r\n" % len(mail(1).content))
        written.append(relay.read_until(b".leading dot\r\n"))
        relay.reply(b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"250 2.0.0 queued as ONE")
        assert relay.read_until(b"\r\n").upper() == b"QUIT\r\n"
        relay.reply(b"221 bye")

    relay = ScriptedRelay(script, chunking=True)
    [attempt] = transmit_to(relay, mail(1))
    relay.finish()
    assert (attempt.verdict, attempt.code, attempt.text) == (Verdict.SENT, 250, "2.0.0 queued as ONE")
    assert written[0].endswith(b"\r\n\r\nHello 1\r\n.leading dot\r\n")  # not "..leading"


@pytest.mark.parametrize(("replies", "verdict", "code"), [
    ((b"250 Ok", b"550 5.1.1 no such user", b"503 need RCPT"), Verdict.PERMANENT, 550),
    ((b"451 4.3.0 try later", b"503 need MAIL", b"503 need RCPT"), Verdict.TRANSIENT, 451),
    ((b"250 Ok", b"250 Ok", b"452 4.3.1 full"), Verdict.TRANSIENT, 452),
    ((b"250 Ok", b"250 Ok", b"554 5.6.0 rejected"), Verdict.PERMANENT, 554),
])
def test_a_refusal_is_the_outcome_and_the_session_is_reset_for_the_next_mail(
        replies: tuple[bytes, ...], verdict: Verdict, code: int) -> None:
    def script(relay: ScriptedRelay) -> None:
        relay.read_until(b" LAST\r\n")
        relay.read_until(b".leading dot\r\n")
        relay.reply(*replies)
        assert relay.read_until(b"\r\n") == b"RSET\r\n"
        relay.reply(b"250 reset")
        relay.read_until(b" LAST\r\n")
        relay.read_until(b".leading dot\r\n")
        relay.reply(b"250 Ok", b"250 Ok", b"250 queued as TWO")
        assert relay.read_until(b"\r\n").upper() == b"QUIT\r\n"
        relay.reply(b"221 bye")

    relay = ScriptedRelay(script, chunking=True)
    first, second = transmit_to(relay, mail(1), mail(2))
    relay.finish()
    assert (first.verdict, first.code, first.ambiguous) == (verdict, code, False)
    assert (second.verdict, second.text) == (Verdict.SENT, "queued as TWO")


def test_a_chunk_accepted_after_a_refusal_closes_the_session() -> None:
    def script(relay: ScriptedRelay) -> None:
        relay.read_until(b".leading dot\r\n")
        relay.reply(b"250 Ok", b"550 no such user", b"250 queued anyway")
        assert relay.rest_until_closed() == b""  # no RSET, no QUIT: the session is dropped

    relay = ScriptedRelay(script, chunking=True)
    [attempt] = transmit_to(relay, mail(1))
    relay.finish()
    assert (attempt.verdict, attempt.code) == (Verdict.PERMANENT, 550)


@pytest.mark.parametrize("answered", [(), (b"250 Ok",), (b"250 Ok", b"250 Ok")])
def test_a_connection_lost_before_the_last_reply_is_ambiguous(answered: tuple[bytes, ...]) -> None:
    def script(relay: ScriptedRelay) -> None:
        relay.read_until(b".leading dot\r\n")
        if answered:
            relay.reply(*answered)

    relay = ScriptedRelay(script, chunking=True)
    [attempt] = transmit_to(relay, mail(1))
    relay.finish()
    assert (attempt.verdict, attempt.code, attempt.ambiguous) == (Verdict.TRANSIENT, None, True)


def test_a_refusal_followed_by_a_hang_up_is_the_refusal() -> None:
    def script(relay: ScriptedRelay) -> None:
        relay.read_until(b".leading dot\r\n")
        relay.reply(b"421 4.3.2 shutting down")  # and the connection closes

    relay = ScriptedRelay(script, chunking=True)
    [attempt] = transmit_to(relay, mail(1))
    relay.finish()
    assert (attempt.verdict, attempt.code, attempt.ambiguous) == (Verdict.TRANSIENT, 421, False)
