"""A send thread's group of mails on one pooled session (`SmtpPool.send_many`,
`SmtpConnection.send_many`), against the project's sink on loopback ports.

Each mail's outcome is exactly what one `send` per mail gives it (outcomes, records, what a
lost connection means: the mail it hit, and no other, is ambiguous); a relay whose session
cannot be set up costs the group one attempt, and every mail of it the set-up failure."""

from __future__ import annotations

import pytest

from services.sender.mime import OutgoingMail
from services.sender.replies import Verdict
from services.sender.smtp_pool import NOT_TRIED, RelayResult, SetupPhase, SmtpPool
from services.smtp_sink import SinkConfig, SmtpSink
from tests.chaos.fault_kit import free_port
from tests.integration.test_smtp_pipelining import _mixed_mails, connection, mail

pytestmark = pytest.mark.integration


def outcomes(results: list[RelayResult]) -> list[tuple[Verdict, int | None, bool]]:
    return [(r.attempt.verdict, r.attempt.code, r.attempt.ambiguous) for r in results]


def _through_sink(config: SinkConfig, mails: list[OutgoingMail], grouped: bool,
                  ) -> tuple[list[tuple[Verdict, int | None, str, bool]], list[dict[str, object]],
                             dict[str, int]]:
    with SmtpSink(config) as sink:
        smtp = connection(sink.port)
        try:
            if grouped:
                attempts = [r.attempt for r in smtp.send_many(mails)]
            else:
                attempts = [smtp.transmit(m) for m in mails]
        finally:
            smtp.close()
        return ([(a.verdict, a.code, a.text, a.ambiguous) for a in attempts], sink.messages,
                dict(sink.stats))


@pytest.mark.parametrize("chunking", [True, False])
def test_a_group_gives_the_outcomes_and_records_of_one_send_per_mail(chunking: bool) -> None:
    mails = _mixed_mails() * 3
    config = {"port": 0, "tempfail_rate": 0.2, "permfail_rate": 0.2, "seed": 2920,
              "chunking": chunking}
    grouped, grouped_records, _ = _through_sink(SinkConfig(**config), mails,  # type: ignore[arg-type]
                                                grouped=True)
    single, single_records, _ = _through_sink(SinkConfig(**config), mails,  # type: ignore[arg-type]
                                              grouped=False)
    assert grouped == single
    assert {code for _, code, _, _ in grouped} == {250, 451, 550, 553}
    keep = ("mail_from", "rcpt_tos", "message_id", "headers", "body", "size")
    assert [{k: r[k] for k in keep} for r in grouped_records] == [
        {k: r[k] for k in keep} for r in single_records]


@pytest.mark.parametrize("chunking", [True, False])
def test_a_dropped_connection_makes_only_its_own_mail_ambiguous(chunking: bool) -> None:
    mails = [mail(n) for n in range(40)]
    config = SinkConfig(port=0, drop_rate=0.25, seed=18, chunking=chunking)
    grouped, records, stats = _through_sink(config, mails, grouped=True)
    ambiguous = [a for a in grouped if a[3]]
    assert stats["drop_after_data"] > 0
    assert len(ambiguous) == stats["drop_after_data"] + stats.get("drop_before_data", 0) * chunking
    # The others went out, on fresh sessions after each drop.
    assert len(records) == len(mails) - len(ambiguous)
    assert all(a[0] is Verdict.SENT for a in grouped if not a[3])


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
    assert pool.replaced == 1  # found at check-out: no mail paid for it


def test_a_relay_that_cannot_be_reached_costs_the_group_one_attempt() -> None:
    port = free_port()  # nothing listens there
    smtp = connection(port)
    results = smtp.send_many([mail(n) for n in range(5)])
    assert [r.setup for r in results] == [SetupPhase.CONNECT] * 5
    assert {(r.attempt.verdict, r.attempt.ambiguous) for r in results} == {(Verdict.TRANSIENT, False)}
    assert len({id(r) for r in results}) == 1  # one connect attempt, its result for all


def test_a_mail_its_check_holds_back_is_never_said_to_the_relay() -> None:
    asked: list[int] = []

    def go(index: int) -> bool:
        asked.append(index)
        return index != 1

    with SmtpSink(SinkConfig(port=0)) as sink:
        smtp = connection(sink.port)
        try:
            results = smtp.send_many([mail(n) for n in range(3)], go)
        finally:
            smtp.close()
        recorded = [r["message_id"] for r in sink.messages]
    assert asked == [0, 1, 2]  # asked right before each mail's turn
    assert results[1] is NOT_TRIED
    assert [r.attempt.verdict for r in (results[0], results[2])] == [Verdict.SENT] * 2
    assert recorded == [mail(0).message_id, mail(2).message_id]
