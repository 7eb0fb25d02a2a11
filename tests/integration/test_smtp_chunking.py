"""CHUNKING (RFC 3030, BDAT) in the SMTP sink, driven over raw loopback sockets so the command
and its octets really arrive together: offered in EHLO unless switched off, content taken
byte for byte (no dot-unstuffing), several chunks joined, refusals that keep the session in
step, faults applied to the LAST chunk like to DATA content."""

from __future__ import annotations

import pytest

from services.smtp_sink import SinkConfig, SmtpSink
from services.smtp_sink import server as sink_server
from tests.integration.test_smtp_pipelining import RawClient, raw_client

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


def test_chunking_is_on_by_default_and_switched_off_from_the_environment() -> None:
    assert SinkConfig(port=0).chunking
    assert SinkConfig.from_env({"SMTP_PORT": "0"}).chunking
    assert not SinkConfig.from_env({"SMTP_PORT": "0", "SINK_CHUNKING": "no"}).chunking
    with pytest.raises(ValueError, match="SINK_CHUNKING must be"):
        SinkConfig.from_env({"SINK_CHUNKING": "maybe"})


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
