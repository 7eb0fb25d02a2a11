"""SMTP reply classes and failure classification."""

from __future__ import annotations

import smtplib

import pytest

from services.sender.replies import Stage, Verdict, classify_failure, classify_reply


@pytest.mark.parametrize(
    ("code", "verdict"),
    [
        (250, Verdict.SENT),
        (251, Verdict.SENT),
        (421, Verdict.TRANSIENT),
        (451, Verdict.TRANSIENT),
        (452, Verdict.TRANSIENT),
        (550, Verdict.PERMANENT),
        (552, Verdict.PERMANENT),
        (554, Verdict.PERMANENT),
        (-1, Verdict.TRANSIENT),
    ],
)
def test_reply_classes(code: int, verdict: Verdict) -> None:
    attempt = classify_reply(code, b"whatever")
    assert attempt.verdict is verdict
    assert not attempt.ambiguous


def test_reply_text_is_kept_on_one_line() -> None:
    attempt = classify_reply(550, b"5.1.1 Mailbox\nunavailable")
    assert attempt.code == 550
    assert attempt.text == "5.1.1 Mailbox unavailable"
    assert attempt.reply == "550 5.1.1 Mailbox unavailable"


def test_garbage_code_is_not_reported_as_a_code() -> None:
    assert classify_reply(-1, "").code is None


@pytest.mark.parametrize("stage", [Stage.CONNECT, Stage.ENVELOPE, Stage.CONTENT])
def test_failures_before_the_final_dot_are_transient_and_certain(stage: Stage) -> None:
    attempt = classify_failure(stage, ConnectionRefusedError(111, "refused"))
    assert attempt.verdict is Verdict.TRANSIENT
    assert not attempt.ambiguous
    assert attempt.text.startswith(stage.value)


@pytest.mark.parametrize(
    "error",
    [smtplib.SMTPServerDisconnected("Connection unexpectedly closed"), TimeoutError("timed out")],
)
def test_lost_reply_to_the_final_dot_is_ambiguous(error: Exception) -> None:
    attempt = classify_failure(Stage.FINAL_REPLY, error)
    assert attempt.verdict is Verdict.TRANSIENT
    assert attempt.ambiguous
    assert attempt.code is None
    assert type(error).__name__ in attempt.text


@pytest.mark.parametrize(
    ("code", "text", "hard"),
    [
        (550, "5.1.1 Mailbox unavailable", True),
        (550, "5.1.10 Recipient address rejected", True),
        (552, "5.2.1 mailbox disabled", True),
        (550, "User unknown", True),
        (554, "5.7.1 Message rejected as spam", False),
        (552, "5.3.4 Message too big", False),
        (451, "4.1.1 try later", False),
    ],
)
def test_hard_bounces(code: int, text: str, hard: bool) -> None:
    from services.sender.replies import is_hard_bounce

    assert is_hard_bounce(classify_reply(code, text)) is hard
