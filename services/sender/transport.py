"""The seam between the sender's loop and the SMTP side.

The worker only needs three things of whatever carries its mail: a server name to book rate
limits against, one SMTP transaction that never raises for SMTP or network trouble, and a way
to close. `SmtpPool` (one relay, services/sender/smtp_pool.py) satisfies it, and so does
`RelayRouter` (several relays routed by From domain, with failover; services/sender/relays.py).
`relays.transport_factory` picks one of them from the environment at start-up.
"""

from __future__ import annotations

from typing import Protocol

from services.sender.mime import OutgoingMail
from services.sender.replies import Attempt


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
