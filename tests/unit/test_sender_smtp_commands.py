"""The sender's SMTP command channel: replies read as smtplib reads them, paths as smtplib
quotes them, no line break ever reaching a command."""

from __future__ import annotations

import smtplib
import socket
import time
from collections.abc import Iterator

import pytest

from services.sender.smtp_commands import CommandChannel, InvalidPath, kernel_timeouts, mailbox_path


@pytest.fixture
def pair() -> Iterator[tuple[CommandChannel, socket.socket]]:
    ours, server = socket.socketpair()
    ours.settimeout(2)
    server.settimeout(2)
    try:
        yield CommandChannel(ours), server
    finally:
        ours.close()
        server.close()


def test_a_command_goes_out_as_one_crlf_line_and_its_reply_comes_back(
    pair: tuple[CommandChannel, socket.socket],
) -> None:
    channel, server = pair
    server.sendall(b"250 2.1.0 Ok\r\n")
    assert channel.command("MAIL FROM:<a@example.com>") == (250, b"2.1.0 Ok")
    assert server.recv(100) == b"MAIL FROM:<a@example.com>\r\n"


def test_a_multi_line_reply_is_joined_like_smtplib_does(
    pair: tuple[CommandChannel, socket.socket],
) -> None:
    channel, server = pair
    server.sendall(b"250-first\r\n250-second\r\n250 last\r\n")
    assert channel.reply() == (250, b"first\nsecond\nlast")


def test_bytes_beyond_one_reply_are_kept_for_the_next(
    pair: tuple[CommandChannel, socket.socket],
) -> None:
    channel, server = pair
    server.sendall(b"354 go ahead\r\n250 queued as X\r\n421 bye")
    assert channel.reply() == (354, b"go ahead")
    assert channel.reply() == (250, b"queued as X")
    server.sendall(b"\r\n")
    assert channel.reply() == (421, b"bye")


def test_a_reply_without_a_code_reads_as_minus_one(
    pair: tuple[CommandChannel, socket.socket],
) -> None:
    channel, server = pair
    server.sendall(b"hello there\r\n")
    assert channel.reply() == (-1, b"o there")


def test_a_closed_connection_is_smtplibs_disconnect(
    pair: tuple[CommandChannel, socket.socket],
) -> None:
    channel, server = pair
    server.sendall(b"250 Ok")  # half a reply, then the connection goes
    server.close()
    with pytest.raises(smtplib.SMTPServerDisconnected, match="unexpectedly closed"):
        channel.reply()


def test_a_silent_server_times_out_as_a_disconnect(
    pair: tuple[CommandChannel, socket.socket],
) -> None:
    channel, _server = pair
    channel._sock.settimeout(0.05)
    with pytest.raises(smtplib.SMTPServerDisconnected, match="timed out"):
        channel.reply()


def test_an_endless_line_is_a_protocol_error_not_unbounded_memory(
    pair: tuple[CommandChannel, socket.socket],
) -> None:
    channel, server = pair
    server.sendall(b"250 " + b"x" * 9000)
    with pytest.raises(smtplib.SMTPResponseException) as raised:
        channel.reply()
    assert raised.value.smtp_code == 500


@pytest.mark.parametrize("address", [
    "person@example.org",
    "first.last+tag@sub.example.co.uk",
    "o'brien@example.org",
    "jörg@example.de",
    'odd"quote@example.org',
    "with(comment)@example.org",
    "",
])
def test_paths_are_what_smtplib_quoteaddr_gives(address: str) -> None:
    assert mailbox_path(address) == smtplib.quoteaddr(address)


@pytest.mark.parametrize("address", ["a@example.org\r\nRCPT TO:<x@evil.example>",
                                     "a\n@example.org"])
def test_a_line_break_in_an_address_never_reaches_a_command(address: str) -> None:
    with pytest.raises(InvalidPath):
        mailbox_path(address)


def test_with_a_timeout_a_silent_relay_reads_as_smtplibs_timed_out_disconnect() -> None:
    ours, server = socket.socketpair()
    try:
        channel = CommandChannel(ours, timeout=0.2)
        assert ours.gettimeout() is None  # the kernel keeps the bound, not Python's poll
        started = time.monotonic()
        with pytest.raises(smtplib.SMTPServerDisconnected, match="timed out"):
            channel.command("NOOP")
        assert 0.15 < time.monotonic() - started < 2.0
        assert server.recv(100) == b"NOOP\r\n"
    finally:
        ours.close()
        server.close()


def test_with_a_timeout_replies_still_read_whole_and_in_order() -> None:
    ours, server = socket.socketpair()
    try:
        channel = CommandChannel(ours, timeout=2.0)
        server.sendall(b"250 one\r\n250-two\r\n")
        assert channel.reply() == (250, b"one")
        server.sendall(b"250 three\r\n")
        assert channel.reply() == (250, b"two\nthree")
    finally:
        ours.close()
        server.close()


def test_a_kernel_timeout_must_be_positive() -> None:
    with socket.socket() as sock, pytest.raises(ValueError, match="positive"):
        kernel_timeouts(sock, 0)
