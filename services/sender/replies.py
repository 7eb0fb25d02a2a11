"""What one SMTP attempt came to, in our own words: sent, transient, permanent, ambiguous.

Callers decide retries and delivery events from an `Attempt` without importing smtplib.
Pure: classification looks only at reply codes and at where in the transaction a failure hit.

Reply classes (RFC 5321): 2xx sent; 5xx permanent (the receiver refuses, retrying cannot
help); 4xx transient (try again later). A dropped connection or a timeout is transient; it is
also ambiguous when it hit after the final "." of DATA, because the receiver may have
accepted the message before the reply was lost.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


class Verdict(enum.Enum):
    SENT = "sent"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


class Stage(enum.Enum):
    """Where in the SMTP transaction a failure happened."""

    CONNECT = "connect"
    ENVELOPE = "envelope"  # MAIL FROM, RCPT TO, the DATA command itself
    CONTENT = "content"  # writing the message, up to and including the final "."
    FINAL_REPLY = "final reply"  # waiting for the reply to the final "."


@dataclass(frozen=True)
class Attempt:
    """The result of one SMTP transaction."""

    verdict: Verdict
    code: int | None
    text: str
    # The message may or may not have been accepted (connection lost after the final ".").
    ambiguous: bool = False

    @property
    def reply(self) -> str:
        """The reply as a server would print it, e.g. "250 2.0.0 Ok"."""
        return f"{self.code} {self.text}".strip() if self.code is not None else self.text


def classify_reply(code: int, text: str | bytes) -> Attempt:
    """The attempt a final SMTP reply stands for."""
    message = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    message = " ".join(message.split())  # multi-line replies arrive joined by newlines
    if 200 <= code < 300:
        return Attempt(Verdict.SENT, code, message)
    if 500 <= code < 600:
        return Attempt(Verdict.PERMANENT, code, message)
    # 4xx, and anything that is not a valid final reply (smtplib reports -1 for garbage):
    # nothing says the receiver refuses for good, so another try is worth it.
    return Attempt(Verdict.TRANSIENT, code if code > 0 else None, message)


def classify_failure(stage: Stage, error: BaseException) -> Attempt:
    """The attempt a lost connection, timeout or protocol error stands for."""
    reason = f"{stage.value}: {type(error).__name__}: {error}".strip()
    return Attempt(Verdict.TRANSIENT, None, reason, ambiguous=stage is Stage.FINAL_REPLY)


# Enhanced status codes of RFC 3463 that say the address itself is bad (5.1.x: no such user,
# bad domain, bad syntax, moved) or the mailbox is gone for good (5.2.1: disabled).
_HARD_BOUNCE_STATUS = re.compile(r"(?:^|\s)5\.(?:1\.\d{1,3}|2\.1)(?:\s|$)")
# Relays that answer without enhanced codes still say so in words.
_HARD_BOUNCE_WORDS = re.compile(
    r"user unknown|unknown user|no such (?:user|mailbox|recipient)|does not exist|"
    r"mailbox (?:not found|unavailable)|invalid (?:recipient|mailbox)",
    re.IGNORECASE,
)


def is_hard_bounce(attempt: Attempt) -> bool:
    """A permanent refusal of the address itself: mailing it again can never succeed, so the
    contact is suppressed. Other permanent refusals (policy, content, size) are not."""
    if attempt.verdict is not Verdict.PERMANENT or attempt.code is None:
        return False
    if _HARD_BOUNCE_STATUS.search(attempt.text):
        return True
    return attempt.code in (550, 551, 553) and bool(_HARD_BOUNCE_WORDS.search(attempt.text))
