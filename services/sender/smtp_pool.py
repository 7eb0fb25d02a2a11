"""Reused SMTP connections to one relay, and the single SMTP transaction.

Guarantees:
- A connection is used by one thread at a time, and at most `size` connections are open;
  connections stay open across messages (no TCP + EHLO per mail).
- A connection that failed in any way is closed and replaced on next use, so one dropped
  connection costs one attempt, never a stuck worker.
- `transmit` never raises for SMTP or network trouble: it returns an `Attempt` that says
  whether the message was sent, refused for good, refused for now, or possibly sent (the
  reply to the final "." was lost).
"""

from __future__ import annotations

import re
import smtplib
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from services.sender.mime import OutgoingMail
from services.sender.replies import Attempt, Stage, Verdict, classify_failure, classify_reply

# Every socket operation (connect, each command, each reply) gives up after this long: it
# guards against a relay that accepts the connection and then hangs, which would otherwise
# block a sender thread, its batch and the consumer's offsets forever.
SMTP_TIMEOUT_SECONDS = 10.0
# Lines starting with "." are dot-stuffed (RFC 5321 4.5.2) so they cannot end DATA early.
_LEADING_DOT = re.compile(rb"(?m)^\.")
_END_OF_DATA = b".\r\n"


class SmtpConnection:
    """One SMTP session, opened lazily, closed on any failure."""

    def __init__(self, host: str, port: int, local_hostname: str, timeout: float) -> None:
        self.host = host
        self.port = port
        self.local_hostname = local_hostname
        self.timeout = timeout
        self._smtp: smtplib.SMTP | None = None

    @property
    def is_open(self) -> bool:
        return self._smtp is not None

    def transmit(self, mail: OutgoingMail) -> Attempt:
        """One MAIL / RCPT / DATA transaction."""
        try:
            smtp = self._session()
        except (smtplib.SMTPException, OSError) as exc:
            self.close()
            return classify_failure(Stage.CONNECT, exc)
        options: list[str] = []
        if mail.needs_smtputf8:
            if not smtp.has_extn("smtputf8"):
                return Attempt(Verdict.PERMANENT, None, "non-ASCII address; relay lacks SMTPUTF8")
            options.append("SMTPUTF8")
        try:
            refusal = self._envelope(smtp, mail, options)
        except (smtplib.SMTPException, OSError, UnicodeError) as exc:
            self.close()
            return classify_failure(Stage.ENVELOPE, exc)
        if refusal is not None:
            return refusal
        try:
            smtp.send(_LEADING_DOT.sub(b"..", mail.content) + _END_OF_DATA)
        except (smtplib.SMTPException, OSError) as exc:
            # The final "." did not go out whole, so the relay cannot have accepted it.
            self.close()
            return classify_failure(Stage.CONTENT, exc)
        try:
            code, text = smtp.getreply()
        except (smtplib.SMTPException, OSError) as exc:
            self.close()
            return classify_failure(Stage.FINAL_REPLY, exc)
        return classify_reply(code, text)

    def _envelope(self, smtp: smtplib.SMTP, mail: OutgoingMail, options: list[str]) -> Attempt | None:
        """MAIL, RCPT and DATA; the refusal if the relay said no, None when it wants content."""
        code, text = smtp.mail(mail.sender, options)
        if code != 250:
            return self._refused(smtp, code, text)
        code, text = smtp.rcpt(mail.recipient)
        if code not in (250, 251):
            return self._refused(smtp, code, text)
        code, text = smtp.docmd("DATA")
        if code != 354:
            return self._refused(smtp, code, text)
        return None

    def _refused(self, smtp: smtplib.SMTP, code: int, text: bytes) -> Attempt:
        refusal = classify_reply(code, text)
        if refusal.verdict is Verdict.SENT:
            # A 2xx where 354 (or 250) was due: a confused relay; another try may do better.
            refusal = Attempt(Verdict.TRANSIENT, code, refusal.text)
        self._reset(smtp)
        return refusal

    def _session(self) -> smtplib.SMTP:
        if self._smtp is None:
            smtp = smtplib.SMTP(timeout=self.timeout, local_hostname=self.local_hostname)
            smtp.connect(self.host, self.port)
            try:
                smtp.ehlo()
            except BaseException:
                smtp.close()
                raise
            self._smtp = smtp
        return self._smtp

    def _reset(self, smtp: smtplib.SMTP) -> None:
        """End a refused transaction so the session can carry the next one."""
        try:
            code, _ = smtp.rset()
        except (smtplib.SMTPException, OSError):
            code = -1
        if code != 250:
            self.close()

    def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            smtp.close()


class SmtpPool:
    """Up to `size` reused connections to one relay, handed to one thread at a time."""

    def __init__(
        self,
        host: str,
        port: int,
        size: int,
        *,
        timeout: float = SMTP_TIMEOUT_SECONDS,
        local_hostname: str | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("an SMTP pool needs at least one connection")
        # smtplib would call socket.getfqdn(), a reverse DNS lookup that can hang for
        # seconds per connection on hosts without working DNS.
        hostname = local_hostname or socket.gethostname() or "localhost"
        self._idle = [SmtpConnection(host, port, hostname, timeout) for _ in range(size)]
        self._available = threading.Condition()
        self.name = f"{host}:{port}"

    def server_for(self, sender: str) -> str:
        """One relay: every mail books this relay's rate limit."""
        return self.name

    def transmit(self, mail: OutgoingMail) -> Attempt:
        """Send one message over a free connection (waits for one if all are busy)."""
        with self._connection() as connection:
            return connection.transmit(mail)

    @contextmanager
    def _connection(self) -> Iterator[SmtpConnection]:
        with self._available:
            self._available.wait_for(lambda: bool(self._idle))
            # Most recently used first: it is the one most likely still open.
            connection = self._idle.pop()
        try:
            yield connection
        finally:
            with self._available:
                self._idle.append(connection)
                self._available.notify()

    def close(self) -> None:
        """QUIT every idle connection (call when no thread is transmitting)."""
        with self._available:
            for connection in self._idle:
                connection.close()
