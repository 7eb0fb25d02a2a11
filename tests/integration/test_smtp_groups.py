"""Several transactions in one write (`SmtpConnection.send_many` on a relay offering CHUNKING
and PIPELINING), against the project's sink and a scripted relay over loopback sockets.

What a loss in the middle of a group means for each mail (smtp_pool's module docstring): a
mail whose final reply was read is decided; one whose bytes were written with no final reply
is ambiguous, exactly as a single mail; one not written is retried once on a fresh session
when the lost session was a reused one. Outcomes match one mail per call, a refusal leaves
nothing open for the next transaction (RSET before each one after the first), and no reply
is ever taken for another mail's."""

from __future__ import annotations

import pytest

from services.sender.mime import OutgoingMail
from services.sender.replies import Verdict
from services.sender.smtp_pool import RelayResult, SmtpPool
from services.smtp_sink import SinkConfig, SmtpSink
from tests.chaos.fault_kit import free_port
from tests.integration.test_smtp_pipelining import (
    ScriptedRelay,
    _mixed_mails,
    connection,
    mail,
)

pytestmark = pytest.mark.integration

SENDER_TIMEOUT_S = 2.0
OK3 = (b"250 2.1.0 Ok", b"250 2.1.5 Ok")


def head(n: int) -> bytes:
    return (b"MAIL FROM:<news@example.com>\r\nRCPT TO:<user%d@example.org>\r\n" % n
            + b"BDAT %d LAST\r\n" % len(mail(n).content))


def send_many_to(relay: ScriptedRelay, mails: list[OutgoingMail]) -> list[RelayResult]:
    smtp = connection(relay.port, SENDER_TIMEOUT_S)
    try:
        return smtp.send_many(mails)
    finally:
        smtp.close()


def outcomes(results: list[RelayResult]) -> list[tuple[Verdict, int | None, bool]]:
    return [(r.attempt.verdict, r.attempt.code, r.attempt.ambiguous) for r in results]


def _through_sink(config: SinkConfig, mails: list[OutgoingMail], grouped: bool,
                  ) -> tuple[list[tuple[Verdict, int | None, str]], list[dict[str, object]]]:
    with SmtpSink(config) as sink:
        smtp = connection(sink.port)
        try:
            if grouped:
                attempts = [r.attempt for r in smtp.send_many(mails)]
            else:
                attempts = [smtp.transmit(m) for m in mails]
        finally:
            smtp.close()
        return [(a.verdict, a.code, a.text) for a in attempts], sink.messages


def test_a_group_gives_the_outcomes_and_records_of_one_mail_per_call() -> None:
    mails = [mail(n) for n in range(30)]
    grouped, grouped_records = _through_sink(SinkConfig(port=0), mails, grouped=True)
    single, single_records = _through_sink(SinkConfig(port=0), mails, grouped=False)
    assert grouped == single and {v for v, _, _ in grouped} == {Verdict.SENT}
    keep = ("mail_from", "rcpt_tos", "message_id", "headers", "body", "size")
    assert [{k: r[k] for k in keep} for r in grouped_records] == [
        {k: r[k] for k in keep} for r in single_records]


def test_mixed_refusals_in_groups_leave_nothing_open_and_no_stray_reply() -> None:
    mails = _mixed_mails() * 3
    config = {"port": 0, "tempfail_rate": 0.2, "permfail_rate": 0.2, "seed": 2920}
    grouped, grouped_records = _through_sink(SinkConfig(**config), mails,  # type: ignore[arg-type]
                                             grouped=True)
    single, single_records = _through_sink(SinkConfig(**config), mails,  # type: ignore[arg-type]
                                           grouped=False)
    # A refused RCPT leaving MAIL open would turn the next mail into a 503; a reply left
    # behind would shift every later outcome by one.
    assert grouped == single
    assert {code for _, code, _ in grouped} == {250, 451, 550, 553}
    assert [r["message_id"] for r in grouped_records] == [r["message_id"] for r in single_records]


def test_a_relay_dropping_the_connection_leaves_every_written_mail_ambiguous() -> None:
    with SmtpSink(SinkConfig(port=0, drop_rate=1.0)) as sink:
        smtp = connection(sink.port)
        try:
            results = smtp.send_many([mail(n) for n in range(4)])
        finally:
            smtp.close()
        assert sink.messages == []
    assert outcomes(results) == [(Verdict.TRANSIENT, None, True)] * 4


def test_a_group_on_a_session_the_restarted_relay_closed_goes_out_on_a_fresh_one() -> None:
    port = free_port()
    pool = SmtpPool("127.0.0.1", port, 1)
    try:
        with SmtpSink(SinkConfig(port=port)) as before:
            assert outcomes(pool.send_many([mail(1), mail(2)])) == [(Verdict.SENT, 250, False)] * 2
            assert len(before.messages) == 2
        with SmtpSink(SinkConfig(port=port)) as after:
            results = pool.send_many([mail(3), mail(4), mail(5)])
            assert outcomes(results) == [(Verdict.SENT, 250, False)] * 3
            assert [m["message_id"] for m in after.messages] == [
                f"<pipelining-{n}@example.com>" for n in (3, 4, 5)]
    finally:
        pool.close()
    assert pool.replaced == 1


def test_the_transactions_go_out_in_one_write_with_rset_between_them() -> None:
    def script(relay: ScriptedRelay) -> None:
        # Everything arrives before any reply is sent: the sender did not wait in between.
        relay.read_until(b"Hello 3\r\n.leading dot\r\n")
        relay.reply(*OK3, b"250 queued as ONE", b"250 reset", *OK3, b"250 queued as TWO",
                    b"250 reset", *OK3, b"250 queued as THREE")
        assert relay.read_until(b"\r\n").upper() == b"QUIT\r\n"
        relay.reply(b"221 bye")

    relay = ScriptedRelay(script, chunking=True)
    results = send_many_to(relay, [mail(1), mail(2), mail(3)])
    relay.finish()
    assert [r.attempt.text for r in results] == ["queued as ONE", "queued as TWO", "queued as THREE"]
    assert relay.received.split(b"\r\n", 1)[1] == (
        head(1) + mail(1).content + b"RSET\r\n" + head(2) + mail(2).content + b"RSET\r\n"
        + head(3) + mail(3).content + b"quit\r\n")  # smtplib says QUIT in lower case


@pytest.mark.parametrize("answered", [
    (),  # not even the RSET: the second mail's bytes were written, no reply
    (b"250 reset",),
    (b"250 reset", *OK3),  # all but the final reply
])
def test_a_loss_after_a_decided_mail_leaves_the_written_rest_ambiguous(
        answered: tuple[bytes, ...]) -> None:
    def script(relay: ScriptedRelay) -> None:
        relay.read_until(b"Hello 3\r\n.leading dot\r\n")
        relay.reply(*OK3, b"250 queued as ONE", *answered)  # and the connection closes

    relay = ScriptedRelay(script, chunking=True)
    results = send_many_to(relay, [mail(1), mail(2), mail(3)])
    relay.finish()
    assert outcomes(results) == [(Verdict.SENT, 250, False)] + [(Verdict.TRANSIENT, None, True)] * 2


def test_a_refusal_then_a_hang_up_is_the_refusal_and_the_rest_ambiguous() -> None:
    def script(relay: ScriptedRelay) -> None:
        relay.read_until(b"Hello 2\r\n.leading dot\r\n")
        relay.reply(b"421 4.3.2 shutting down")

    relay = ScriptedRelay(script, chunking=True)
    results = send_many_to(relay, [mail(1), mail(2)])
    relay.finish()
    assert outcomes(results) == [(Verdict.TRANSIENT, 421, False), (Verdict.TRANSIENT, None, True)]


def test_refusals_in_a_group_are_their_mails_outcomes_and_the_last_one_is_reset() -> None:
    def script(relay: ScriptedRelay) -> None:
        relay.read_until(b"Hello 3\r\n.leading dot\r\n")
        relay.reply(b"250 Ok", b"550 5.1.1 no such user", b"503 need RCPT", b"250 reset",
                    *OK3, b"250 queued as TWO", b"250 reset",
                    *OK3, b"452 4.3.1 full")
        # Only the last transaction was refused with no RSET behind it: reset now.
        assert relay.read_until(b"\r\n") == b"RSET\r\n"
        relay.reply(b"250 reset")
        assert relay.read_until(b"\r\n").upper() == b"QUIT\r\n"
        relay.reply(b"221 bye")

    relay = ScriptedRelay(script, chunking=True)
    results = send_many_to(relay, [mail(1), mail(2), mail(3)])
    relay.finish()
    assert outcomes(results) == [(Verdict.PERMANENT, 550, False), (Verdict.SENT, 250, False),
                                 (Verdict.TRANSIENT, 452, False)]


def test_a_refused_rset_makes_the_next_refusal_transient_and_drops_the_session() -> None:
    def script(relay: ScriptedRelay) -> None:
        relay.read_until(b"Hello 2\r\n.leading dot\r\n")
        relay.reply(b"250 Ok", b"550 no such user", b"503 need RCPT", b"500 what",
                    b"503 nested MAIL", b"503 need MAIL", b"503 need RCPT")
        assert relay.rest_until_closed() == b""  # no RSET, no QUIT

    relay = ScriptedRelay(script, chunking=True)
    results = send_many_to(relay, [mail(1), mail(2)])
    relay.finish()
    # The second mail's 503 may be the first one's open transaction: not a reason to fail
    # its recipient for good.
    assert outcomes(results) == [(Verdict.PERMANENT, 550, False), (Verdict.TRANSIENT, 503, False)]


def test_without_chunking_a_group_is_one_transaction_after_the_other() -> None:
    def script(relay: ScriptedRelay) -> None:
        for n in (1, 2):
            relay.read_until(b"DATA\r\n")
            assert relay.unread == b""  # nothing more until the 354
            relay.reply(*OK3, b"354 go ahead")
            relay.read_until(b"\r\n.\r\n")
            relay.reply(b"250 queued as %d" % n)
        assert relay.read_until(b"\r\n").upper() == b"QUIT\r\n"
        relay.reply(b"221 bye")

    relay = ScriptedRelay(script, chunking=False)
    results = send_many_to(relay, [mail(1), mail(2)])
    relay.finish()
    assert [r.attempt.text for r in results] == ["queued as 1", "queued as 2"]
