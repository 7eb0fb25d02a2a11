"""Reused SMTP connections to one relay, and the single SMTP transaction.

Session set-up (`Security`): plain SMTP, STARTTLS (the session is upgraded before anything
else is said; a relay that does not offer STARTTLS is refused, never used in the clear) or
implicit TLS (SMTPS). Certificates are verified against the system's CAs, or the CA file
given, unless verification is explicitly switched off (test relays with self-signed
certificates). With credentials the session logs in (AUTH PLAIN or LOGIN, whichever the
relay offers; smtplib picks) once the session is encrypted.

Guarantees:
- A connection is used by one thread at a time, and at most `size` connections are open;
  connections stay open across messages (no TCP + EHLO per mail).
- A connection that failed in any way is closed and replaced on next use, so one dropped
  connection costs one attempt, never a stuck worker.
- A pooled session is checked before it carries a mail (`checkout`, pure): one the relay
  closed or spoke on unasked (EOF, a 421 before hanging up: the socket is readable) is
  replaced; one idle for NOOP_AFTER_IDLE_SECONDS is asked NOOP first (a relay that vanished
  without closing it); one idle for MAX_IDLE_SECONDS is replaced outright (relays drop idle
  sessions after a few minutes). A session found dead costs nothing: the mail goes out on a
  fresh one. And when a reused session is lost before the relay can have taken anything (at
  MAIL / RCPT / DATA, or while the content is still being written), the mail is tried once
  more at once on a fresh session instead of being deferred: so a relay restarted between
  two campaigns costs neither an ambiguous count nor a retry delay. A loss after the whole
  message was out is still ambiguous and never retried here.
- `transmit` never raises for SMTP or network trouble: it returns an `Attempt` that says
  whether the message was sent, refused for good, refused for now, or possibly sent (the
  reply to the final "." was lost).
- When the relay offers PIPELINING (RFC 2920; read from the last EHLO, i.e. after STARTTLS),
  MAIL, RCPT and DATA go out in one write and their three replies are read in order: one
  round trip instead of three, same outcome. The refusal is the first reply that is not OK,
  classified as without pipelining; all three replies are read before anything else is said,
  so no reply is left to be taken for the next transaction's; the content goes out only after
  MAIL, RCPT and DATA were all accepted: a relay that answers 354 to DATA after refusing MAIL
  or RCPT gets no content, its session is closed instead.
- An envelope address with a non-ASCII local part goes out with `SMTPUTF8` on MAIL FROM
  (RFC 6531), UTF-8 on the wire, when the relay offers SMTPUTF8; otherwise the attempt is a
  permanent failure with the reason SMTPUTF8_REFUSAL, decided before anything is sent (never
  a retry loop, never a crash). Domains are in their IDNA ASCII form already.
- When it offers CHUNKING as well (RFC 3030), the whole transaction is one write: MAIL, RCPT
  and `BDAT <size> LAST` followed by the message, then the three replies in order. One round
  trip per mail, no dot-stuffing, same outcomes with one difference: a connection lost
  before any reply came is ambiguous (the content was out, and a relay may hold the MAIL and
  RCPT replies for the chunk's), where with DATA a loss before the 354 is a plain transient
  failure. A refusal of MAIL or RCPT is the outcome as before (the relay drops the chunk);
  after any refusal the session is reset (RSET) before the next mail.
- `send_many` (a send thread's group of mails) is `send` of each on one session, one
  transaction per write as above: each mail's outcome, and what a loss means for it, is
  exactly `send`'s. Once a session cannot be set up, the group's remaining mails get the same
  set-up failure without another try (nothing was written for them).
- `send` says in addition whether the relay itself could not be used (`RelayResult.setup`):
  the failure happened while setting up the session (TCP connect, greeting, EHLO, TLS, AUTH),
  before MAIL FROM, so the relay cannot have taken the message and another relay may be
  tried without any risk of a duplicate.

Why a failed login is not a permanent failure of the mail: a 535 answers the relay's
credentials, not the recipient. Failing the recipient for good would turn one wrong password
into a whole audience of permanent failures (and, worse, hard-bounce suppressions). It is a
relay problem: `setup` is AUTH, the router fails over to another relay when there is one,
and otherwise the attempt is transient (the recipient is retried with backoff while an
operator fixes the password; the router logs the failure as an error).
"""

from __future__ import annotations

import enum
import re
import select
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from services.sender.mime import OutgoingMail
from services.sender.replies import Attempt, Stage, Verdict, classify_failure, classify_reply
from services.sender.smtp_commands import CRLF, CommandChannel, InvalidPath, mailbox_path

# Every socket operation (connect, each command, each reply) gives up after this long: it
# guards against a relay that accepts the connection and then hangs, which would otherwise
# block a sender thread, its batch and the consumer's offsets forever.
SMTP_TIMEOUT_SECONDS = 10.0
# Lines starting with "." are dot-stuffed (RFC 5321 4.5.2) so they cannot end DATA early.
_LEADING_DOT = re.compile(rb"(?m)^\.")
# A pooled session idle this long is asked NOOP before it carries a mail: finds a session whose
# relay vanished without closing it (host down, a NAT entry expired) before MAIL, instead of
# as a timeout after the content, which would count the mail ambiguous.
NOOP_AFTER_IDLE_SECONDS = 15.0
# A pooled session idle this long is closed and opened afresh: relays drop idle sessions after
# a few minutes (RFC 5321 4.5.3.2.7 suggests 5; Postfix and the sink use 300 s).
MAX_IDLE_SECONDS = 120.0
_END_OF_DATA = b".\r\n"
_DATA_COMMAND = b"DATA\r\n"
# The outcome of a mail whose envelope needs SMTPUTF8 (RFC 6531: an internationalised local
# part) on a relay that does not offer it. Domains never need it: they go out in IDNA form.
SMTPUTF8_REFUSAL = "smtputf8 not offered by relay: the address has a non-ASCII local part"


class Checkout(enum.Enum):
    """What to do with a pooled session before it carries a mail."""

    USE = "use"  # as it is
    PROBE = "probe"  # NOOP first; replace it unless the relay answers 250
    REOPEN = "reopen"  # close it and set up a fresh session


def checkout(idle_seconds: float, relay_spoke: bool, *,
             noop_after: float = NOOP_AFTER_IDLE_SECONDS,
             max_idle: float = MAX_IDLE_SECONDS) -> Checkout:
    """The check of a session idle for `idle_seconds`; `relay_spoke`: its socket is readable
    (EOF, or words unasked for, e.g. a 421 before the relay hangs up). Pure."""
    if relay_spoke or idle_seconds >= max_idle:
        return Checkout.REOPEN
    if idle_seconds >= noop_after:
        return Checkout.PROBE
    return Checkout.USE


class Security(enum.StrEnum):
    """How a session with a relay is protected."""

    NONE = "none"  # plain SMTP (a local relay or the test sink)
    STARTTLS = "starttls"  # plain connect, then STARTTLS before anything else (port 587)
    TLS = "tls"  # TLS from the first byte, SMTPS (port 465)


class SetupPhase(enum.StrEnum):
    """Where setting up a session failed: the relay, not the message, is the problem."""

    CONNECT = "connect"  # TCP connect, greeting (e.g. 421), EHLO
    TLS = "tls"  # STARTTLS refused or missing, handshake or certificate failure
    AUTH = "auth"  # login refused (535) or impossible (no AUTH, no common mechanism)


@dataclass(frozen=True)
class Credentials:
    """A relay login. The password never appears in a repr, a log line or an error."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class RelayResult:
    """One transaction's attempt, and whether the relay could not be used at all."""

    attempt: Attempt
    # Set when session set-up failed (before MAIL FROM): nothing was sent, another relay may
    # take the message. None for every outcome of a transaction that started.
    setup: SetupPhase | None = None


# What `send_many` gives a mail its `go` held back (asked right before the mail's
# transaction): nothing was said for it. Told apart by identity.
NOT_TRIED = RelayResult(Attempt(Verdict.TRANSIENT, None, "not tried: held back before its turn"))


class _SetupFailed(Exception):
    """Session set-up failed in `phase` (wraps the driver's error)."""

    def __init__(self, phase: SetupPhase, error: BaseException) -> None:
        super().__init__(f"{phase.value}: {type(error).__name__}: {error}")
        self.phase = phase
        self.error = error


def tls_context(ca_file: Path | None = None, verify: bool = True) -> ssl.SSLContext:
    """The client TLS context of a relay: certificate and host name checked against the
    system's CAs (or `ca_file`) unless `verify` is False (test relays only)."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class SmtpConnection:
    """One SMTP session, opened lazily, closed on any failure."""

    def __init__(
        self,
        host: str,
        port: int,
        local_hostname: str,
        timeout: float,
        *,
        security: Security = Security.NONE,
        context: ssl.SSLContext | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.local_hostname = local_hostname
        self.timeout = timeout
        self.security = security
        self.credentials = credentials
        self._context = context if context is not None or security is Security.NONE else tls_context()
        self._smtp: smtplib.SMTP | None = None
        self._channel: CommandChannel | None = None
        self._pipelining = False  # the open session's relay offered PIPELINING
        self._chunking = False  # ... and CHUNKING too: one write per transaction (BDAT)
        self._last_used = 0.0  # time.monotonic() when the open session last finished a command
        # Set by the transaction when its session was lost before the relay could have taken
        # the message (nothing accepted): the mail may go out again on a fresh session.
        self._lost_unaccepted = False
        self.replaced = 0  # pooled sessions found dead or stale at checkout and replaced

    @property
    def is_open(self) -> bool:
        return self._smtp is not None

    @property
    def pipelining(self) -> bool:
        """The open session writes MAIL, RCPT and DATA at once (its relay offers PIPELINING)."""
        return self._smtp is not None and self._pipelining

    @property
    def chunking(self) -> bool:
        """The open session writes each transaction at once, the message as one BDAT chunk
        (its relay offers CHUNKING and PIPELINING)."""
        return self._smtp is not None and self._chunking

    def transmit(self, mail: OutgoingMail) -> Attempt:
        """One MAIL / RCPT / DATA transaction."""
        return self.send(mail).attempt

    def send(self, mail: OutgoingMail) -> RelayResult:
        """One MAIL / RCPT / DATA transaction, telling a relay that could not be used apart."""
        reused = self._smtp is not None and self._check_out()
        result = self._send_once(mail)
        if reused and self._lost_unaccepted:
            # The pooled session died under us before the relay could take anything: a fresh
            # session, once, instead of a deferral.
            self.replaced += 1
            result = self._send_once(mail)
        return result

    def send_many(self, mails: Sequence[OutgoingMail],
                  go: Callable[[int], bool] | None = None) -> list[RelayResult]:
        """`send` of each mail, in order, on this one session; once a session cannot be set
        up, the mails after it fail the same way without trying (nothing was written for them:
        another relay may take them), so a dead relay costs one connect timeout per group.
        `go(i)`, asked right before mail i's transaction (the sender's pause and deadline
        check), holds it back when False: NOT_TRIED, nothing said for it."""
        results: list[RelayResult] = []
        for index, mail in enumerate(mails):
            if go is not None and not go(index):
                results.append(NOT_TRIED)
                continue
            result = self.send(mail)
            results.append(result)
            if result.setup is not None:
                results += [result] * (len(mails) - len(results))
                break
        return results

    def _send_once(self, mail: OutgoingMail) -> RelayResult:
        self._lost_unaccepted = False
        try:
            smtp = self._session()
        except _SetupFailed as failed:
            self.close()
            attempt = classify_failure(Stage.CONNECT, failed.error)
            if failed.phase is not SetupPhase.CONNECT:
                attempt = replace(attempt, text=str(failed))
            return RelayResult(attempt, failed.phase)
        try:
            return RelayResult(self._transaction(smtp, mail))
        finally:
            self._last_used = time.monotonic()

    def _check_out(self) -> bool:
        """Check the open session (see `checkout`); True when it is kept, False when it was
        closed (the next transaction sets up a fresh one)."""
        smtp = self._smtp
        assert smtp is not None and smtp.sock is not None
        action = checkout(time.monotonic() - self._last_used, _readable(smtp.sock),
                          noop_after=NOOP_AFTER_IDLE_SECONDS, max_idle=MAX_IDLE_SECONDS)
        if action is Checkout.USE:
            return True
        if action is Checkout.PROBE:
            channel = self._channel
            assert channel is not None
            try:
                code, _ = channel.command("NOOP")
            except (smtplib.SMTPException, OSError):
                code = -1
            if code == 250:
                self._last_used = time.monotonic()
                return True
        # No QUIT: the session is dead, or stale enough that a relay gone silent would keep
        # us waiting for the answer for the whole timeout.
        self._abandon()
        self.replaced += 1
        return False

    def _transaction(self, smtp: smtplib.SMTP, mail: OutgoingMail) -> Attempt:
        encoding = "ascii"
        options = ""
        if mail.needs_smtputf8:
            if not smtp.has_extn("smtputf8"):
                # Permanent for this relay, not a retry: asking again gets the same EHLO.
                return Attempt(Verdict.PERMANENT, None, SMTPUTF8_REFUSAL)
            encoding, options = "utf-8", " SMTPUTF8"
        try:
            sender, recipient = mailbox_path(mail.sender), mailbox_path(mail.recipient)
        except InvalidPath as exc:
            return Attempt(Verdict.PERMANENT, None, f"invalid envelope address: {exc}")
        channel = self._channel
        assert channel is not None  # set together with the session
        if self._chunking:
            return self._chunked(channel, f"MAIL FROM:{sender}{options}", f"RCPT TO:{recipient}",
                                 encoding, mail.content)
        envelope = self._pipelined_envelope if self._pipelining else self._envelope
        try:
            refusal = envelope(channel, f"MAIL FROM:{sender}{options}", f"RCPT TO:{recipient}",
                               encoding)
        except UnicodeError as exc:
            self.close()
            return classify_failure(Stage.ENVELOPE, exc)
        except (smtplib.SMTPException, OSError) as exc:
            # Lost before the content: the relay cannot have taken the message.
            self._lost_unaccepted = _connection_lost(exc)
            self._abandon()
            return classify_failure(Stage.ENVELOPE, exc)
        if refusal is not None:
            return refusal
        content = mail.content
        # Most mails have no line starting with "." (the regex costs ~3.5 us on a 1 KB mail,
        # the test ~1 us): stuffed only when there is one, the same bytes either way.
        if content.startswith(b".") or b"\n." in content:
            content = _LEADING_DOT.sub(b"..", content)
        try:
            channel.send(content + _END_OF_DATA)
        except (smtplib.SMTPException, OSError) as exc:
            # The final "." did not go out whole, so the relay cannot have accepted it.
            self._lost_unaccepted = _connection_lost(exc)
            self._abandon()
            return classify_failure(Stage.CONTENT, exc)
        try:
            code, text = channel.reply()
        except (smtplib.SMTPException, OSError) as exc:
            self._abandon()
            return classify_failure(Stage.FINAL_REPLY, exc)
        return classify_reply(code, text)

    def _envelope(self, channel: CommandChannel, mail_from: str, rcpt_to: str,
                  encoding: str) -> Attempt | None:
        """MAIL, RCPT and DATA; the refusal if the relay said no, None when it wants content."""
        code, text = channel.command(mail_from, encoding)
        if code != 250:
            return self._refused(channel, code, text)
        code, text = channel.command(rcpt_to, encoding)
        if code not in (250, 251):
            return self._refused(channel, code, text)
        code, text = channel.command("DATA")
        if code != 354:
            return self._refused(channel, code, text)
        return None

    def _pipelined_envelope(self, channel: CommandChannel, mail_from: str, rcpt_to: str,
                            encoding: str) -> Attempt | None:
        """`_envelope` in one round trip (RFC 2920): MAIL, RCPT and DATA written together,
        then their three replies read in order."""
        channel.send(mail_from.encode(encoding) + CRLF + rcpt_to.encode(encoding) + CRLF
                     + _DATA_COMMAND)
        refused: tuple[int, bytes] | None = None
        code = -1
        for accepted in ((250,), (250, 251), (354,)):
            try:
                code, text = channel.reply()
            except (smtplib.SMTPException, OSError):
                if refused is None:
                    raise  # nothing refused yet: a lost envelope, as without pipelining
                # The refusal already came (e.g. 421, then the relay hung up): it is the
                # outcome, as when the RSET after it fails without pipelining.
                self._abandon()
                return _refusal(*refused)
            if refused is None and code not in accepted:
                refused = (code, text)
        if refused is None:
            return None
        if code == 354:
            # DATA accepted although MAIL or RCPT was refused: the relay now reads anything
            # said as content (RSET, even QUIT) and would deliver it. Nothing more is said.
            self._abandon()
            return _refusal(*refused)
        self._reset(channel)
        return _refusal(*refused)

    def _chunked(self, channel: CommandChannel, mail_from: str, rcpt_to: str, encoding: str,
                 content: bytes) -> Attempt:
        """The whole transaction in one write (RFC 3030 CHUNKING, pipelined as RFC 2920
        allows): MAIL, RCPT and the message as one `BDAT <size> LAST` chunk, then the three
        replies in order. No 354 round trip and no dot-stuffing (the size delimits the
        content). The content goes out before MAIL and RCPT are answered: a relay that
        refuses them reads the chunk and drops it (RFC 3030 4.2)."""
        try:
            head = (mail_from.encode(encoding) + CRLF + rcpt_to.encode(encoding) + CRLF
                    + b"BDAT %d LAST\r\n" % len(content))
        except UnicodeError as exc:
            return classify_failure(Stage.ENVELOPE, exc)
        try:
            channel.send(head + content)
        except (smtplib.SMTPException, OSError) as exc:
            # The chunk did not go out whole, so the relay cannot have accepted the message.
            self._lost_unaccepted = _connection_lost(exc)
            self._abandon()
            return classify_failure(Stage.CONTENT, exc)
        refused: tuple[int, bytes] | None = None
        code, text = -1, b""
        for accepted in ((250,), (250, 251), None):
            try:
                code, text = channel.reply()
            except (smtplib.SMTPException, OSError) as exc:
                if refused is not None:
                    # The refusal already came (e.g. 421, then the relay hung up): it is the
                    # outcome, as in `_pipelined_envelope`.
                    self._abandon()
                    return _refusal(*refused)
                # Everything was written and no refusal came: a relay may hold its MAIL and
                # RCPT replies until the chunk's (RFC 2920), so it may have taken the message.
                self._abandon()
                return classify_failure(Stage.FINAL_REPLY, exc)
            if refused is None and accepted is not None and code not in accepted:
                refused = (code, text)
        if refused is None:
            outcome = classify_reply(code, text)
            if outcome.verdict is not Verdict.SENT:
                self._reset(channel)  # the message was refused: start the next one clean
            return outcome
        if 200 <= code < 300:
            # The chunk was accepted although MAIL or RCPT was refused: a confused relay,
            # not trusted with another transaction on this session.
            self._abandon()
        else:
            self._reset(channel)  # MAIL may still be open (RCPT refused)
        return _refusal(*refused)

    def _refused(self, channel: CommandChannel, code: int, text: bytes) -> Attempt:
        self._reset(channel)
        return _refusal(code, text)

    def _session(self) -> smtplib.SMTP:
        """The open session, set up first if needed; raises _SetupFailed."""
        if self._smtp is None:
            smtp = self._connect()
            try:
                self._secure(smtp)
                self._login(smtp)
            except BaseException:
                smtp.close()
                raise
            # Transactions go straight to the socket from here on (see smtp_commands).
            assert smtp.sock is not None  # connected by the constructor
            self._channel = CommandChannel(smtp.sock, self.timeout)
            # From the last EHLO: after STARTTLS, what the relay said in the clear is void.
            self._pipelining = smtp.has_extn("pipelining")
            self._chunking = self._pipelining and smtp.has_extn("chunking")
            self._smtp = smtp
        return self._smtp

    def _connect(self) -> smtplib.SMTP:
        # Host and port go to the constructor, which connects (and closes again on a failed
        # greeting): smtplib checks the certificate against the host given there, for
        # STARTTLS and SMTPS alike; a later connect(host) would leave that name empty.
        smtp: smtplib.SMTP
        try:
            if self.security is Security.TLS:
                smtp = smtplib.SMTP_SSL(self.host, self.port, local_hostname=self.local_hostname,
                                        timeout=self.timeout, context=self._context)
            else:
                smtp = smtplib.SMTP(self.host, self.port, local_hostname=self.local_hostname,
                                    timeout=self.timeout)
        except ssl.SSLError as exc:  # implicit TLS: the handshake is part of connecting
            raise _SetupFailed(SetupPhase.TLS, exc) from exc
        except (smtplib.SMTPException, OSError) as exc:
            raise _SetupFailed(SetupPhase.CONNECT, exc) from exc
        try:
            smtp.ehlo()
        except (smtplib.SMTPException, OSError) as exc:
            smtp.close()
            raise _SetupFailed(SetupPhase.CONNECT, exc) from exc
        return smtp

    def _secure(self, smtp: smtplib.SMTP) -> None:
        if self.security is not Security.STARTTLS:
            return
        try:
            # Raises SMTPNotSupportedError when the relay does not offer STARTTLS: then the
            # session is dropped rather than carrying mail (and a password) in the clear.
            smtp.starttls(context=self._context)
            smtp.ehlo()  # the capabilities said before TLS are void (RFC 3207 4.2)
        except (smtplib.SMTPException, OSError) as exc:
            raise _SetupFailed(SetupPhase.TLS, exc) from exc

    def _login(self, smtp: smtplib.SMTP) -> None:
        if self.credentials is None:
            return
        try:
            smtp.login(self.credentials.username, self.credentials.password)
        except smtplib.SMTPServerDisconnected as exc:
            raise _SetupFailed(SetupPhase.CONNECT, exc) from exc
        # Before OSError: smtplib's errors are OSErrors too. UnicodeError: a non-ASCII secret.
        except (smtplib.SMTPException, UnicodeError) as exc:
            raise _SetupFailed(SetupPhase.AUTH, exc) from exc
        except OSError as exc:  # the connection broke (reset, timeout) while logging in
            raise _SetupFailed(SetupPhase.CONNECT, exc) from exc

    def _reset(self, channel: CommandChannel) -> None:
        """End a refused transaction so the session can carry the next one."""
        try:
            code, _ = channel.command("RSET")
        except (smtplib.SMTPException, OSError):
            code = -1
        if code != 250:
            self.close()

    def _abandon(self) -> None:
        """Close the session without a word: not even QUIT, which a relay waiting for
        content would take as content (and a broken connection would only time out on)."""
        smtp, self._smtp, self._channel = self._smtp, None, None
        if smtp is not None:
            smtp.close()

    def close(self) -> None:
        smtp, self._smtp, self._channel = self._smtp, None, None
        if smtp is None:
            return
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            smtp.close()


def _readable(sock: socket.socket) -> bool:
    """The relay said something (or closed) while nobody asked: the socket is readable, or a
    TLS record is waiting decrypted. Never blocks."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))


def _connection_lost(error: BaseException) -> bool:
    """The session broke (closed, reset, timed out), as opposed to a protocol error."""
    return isinstance(error, smtplib.SMTPServerDisconnected | OSError) and not isinstance(
        error, smtplib.SMTPResponseException)


def _refusal(code: int, text: bytes) -> Attempt:
    """The attempt a refusal of MAIL, RCPT or DATA stands for."""
    refusal = classify_reply(code, text)
    if refusal.verdict is Verdict.SENT:
        # A 2xx where 354 (or 250) was due: a confused relay; another try may do better.
        refusal = Attempt(Verdict.TRANSIENT, code, refusal.text)
    return refusal


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
        security: Security = Security.NONE,
        context: ssl.SSLContext | None = None,
        credentials: Credentials | None = None,
        name: str | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("an SMTP pool needs at least one connection")
        # smtplib would call socket.getfqdn(), a reverse DNS lookup that can hang for
        # seconds per connection on hosts without working DNS.
        hostname = local_hostname or socket.gethostname() or "localhost"
        # One context for every connection: it is thread-safe, and loading CAs is not free.
        if context is None and security is not Security.NONE:
            context = tls_context()
        self._all = [
            SmtpConnection(host, port, hostname, timeout, security=security, context=context,
                           credentials=credentials)
            for _ in range(size)
        ]
        self._idle = list(self._all)
        self._available = threading.Condition()
        self.name = name or f"{host}:{port}"

    def server_for(self, sender: str) -> str:
        """One relay: every mail books this relay's rate limit."""
        return self.name

    @property
    def replaced(self) -> int:
        """Pooled sessions found dead or stale before a mail and replaced by fresh ones."""
        return sum(connection.replaced for connection in self._all)

    def transmit(self, mail: OutgoingMail) -> Attempt:
        """Send one message over a free connection (waits for one if all are busy)."""
        return self.send(mail).attempt

    def send(self, mail: OutgoingMail) -> RelayResult:
        """Like `transmit`, also telling whether the relay could not be used at all."""
        return self.send_many((mail,))[0]

    def send_many(self, mails: Sequence[OutgoingMail],
                  go: Callable[[int], bool] | None = None) -> list[RelayResult]:
        """`send` of each mail, in order, over one free connection (`SmtpConnection.send_many`):
        one check-out per group instead of one per mail."""
        # Check-out and return written out, not as a context manager: this runs once per job.
        available = self._available
        with available:
            while not self._idle:
                available.wait()
            # Most recently used first: it is the one most likely still open.
            connection = self._idle.pop()
        try:
            return connection.send_many(mails, go)
        finally:
            with available:
                self._idle.append(connection)
                available.notify()

    def transmit_many(self, mails: Sequence[OutgoingMail],
                      go: Callable[[int], bool] | None = None) -> list[Attempt]:
        """`transmit` of each mail, in order, over one free connection."""
        return [result.attempt for result in self.send_many(mails, go)]

    def close(self) -> None:
        """QUIT every idle connection (call when no thread is transmitting)."""
        with self._available:
            for connection in self._idle:
                connection.close()
