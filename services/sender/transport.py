"""The seam between the sender's loop and the SMTP side.

The worker only needs three things of whatever carries its mail: a server name to book rate
limits against, one SMTP transaction that never raises for SMTP or network trouble, and a way
to close. `SmtpPool` (one relay, services/sender/smtp_pool.py) satisfies it, and so does
`RelayRouter` (several relays routed by From domain, with failover; services/sender/relays.py).
`relays.transport_factory` picks one of them from the environment at start-up, wrapped in
`TimedTransport`, which records each transaction's duration per routed relay.

Several mails may go in one call (`transmit_all`): a transport that has `transmit_many` (both
of the above) carries them over one session, one transaction after the other; any other is
called once per mail. Either way each mail gets its own attempt, in order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from services.common.metrics import SMTP_TRANSACTION_SECONDS
from services.sender.mime import OutgoingMail
from services.sender.replies import Attempt
from services.sender.smtp_pool import NOT_TRIED


class MailTransport(Protocol):
    """Carries one mail per call; thread-safe; never raises for SMTP or network trouble."""

    def server_for(self, sender: str) -> str:
        """The name ("host:port" or a configured relay name) whose per-server rate limit a
        mail from `sender` (its From / envelope address) books."""
        ...

    def transmit(self, mail: OutgoingMail) -> Attempt:
        """One MAIL / RCPT / DATA transaction (or its failure, classified)."""
        ...

    def close(self) -> None:
        """Release connections; called when no thread is transmitting."""
        ...


class TimedTransport:
    """A `MailTransport` that observes every transaction's duration in
    campaign_smtp_transaction_seconds{relay=<routed relay>} (connection set-up included)."""

    def __init__(self, inner: MailTransport) -> None:
        self.inner = inner
        # relay name -> its labelled histogram: `labels` costs a few microseconds per mail.
        self._histograms: dict[str, Any] = {}

    def server_for(self, sender: str) -> str:
        return self.inner.server_for(sender)

    def transmit(self, mail: OutgoingMail) -> Attempt:
        started = time.perf_counter()
        try:
            return self.inner.transmit(mail)
        finally:
            relay = self.inner.server_for(mail.sender)
            histogram = self._histograms.get(relay)
            if histogram is None:  # two threads may both look it up: the same child
                histogram = self._histograms[relay] = SMTP_TRANSACTION_SECONDS.labels(relay=relay)
            histogram.observe(time.perf_counter() - started)

    def transmit_many(self, mails: Sequence[OutgoingMail],
                      go: Callable[[int], bool] | None = None) -> list[Attempt]:
        """`transmit_all` on the inner transport; each mail tried observes an equal share of
        the call's duration (its transactions ran one after the other on one session: their
        mean, and the histogram's sum stays the time spent)."""
        started = time.perf_counter()
        attempts: list[Attempt] = []
        try:
            attempts = transmit_all(self.inner, mails, go)
            return attempts
        finally:
            tried = [mail for mail, attempt in zip(mails, attempts, strict=False)
                     if attempt is not NOT_TRIED.attempt] or list(mails)
            share = (time.perf_counter() - started) / len(tried)
            for mail in tried:
                relay = self.inner.server_for(mail.sender)
                histogram = self._histograms.get(relay)
                if histogram is None:
                    histogram = self._histograms[relay] = SMTP_TRANSACTION_SECONDS.labels(
                        relay=relay)
                histogram.observe(share)

    def close(self) -> None:
        self.inner.close()


def transmit_all(transport: MailTransport, mails: Sequence[OutgoingMail],
                 go: Callable[[int], bool] | None = None) -> list[Attempt]:
    """One attempt per mail, in order: by `transmit_many` when the transport has it. `go(i)`,
    asked right before mail i's transaction: False holds it back, its attempt is then
    `NOT_TRIED.attempt` (nothing was said for it)."""
    many = getattr(transport, "transmit_many", None)
    if many is not None and len(mails) > 1:
        attempts: list[Attempt] = many(mails, go)
        return attempts
    return [NOT_TRIED.attempt if go is not None and not go(i) else transport.transmit(mail)
            for i, mail in enumerate(mails)]
