"""The SMTP sink's raw capacity: messages pushed straight at it by plain smtplib clients.

No Kafka, no ledger, no rendering on the clock: the messages are built beforehand with the
sender's own MIME builder (so they have the same size and shape as campaign mail), then
`connections` threads, each holding one reused SMTP connection as the sender's pool does, send
them as fast as the sink answers. The figure is the ceiling the pipeline's send rate is
compared with.
"""

from __future__ import annotations

import queue
import smtplib
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from schemas.events import MessageTemplate, RecipientQueued
from services.sender.mime import OutgoingMail, build_mail
from services.sender.render import render

# Per socket operation; guards against a sink that accepts and then hangs (the run fails
# instead of waiting forever). Same order as the sender's SMTP timeout.
SMTP_TIMEOUT_SECONDS = 10.0
# Name given in EHLO: set explicitly because smtplib would otherwise do a reverse DNS lookup,
# which can take seconds on machines without DNS.
LOCAL_HOSTNAME = "bench.localhost"


@dataclass(frozen=True)
class RawContact:
    """What the bench knows of a contact: enough to build its mail."""

    contact_id: str
    email: str
    first_name: str
    last_name: str
    attributes: dict[str, str]


@dataclass(frozen=True)
class RawResult:
    """Outcome of the raw run: how many the sink accepted and in how long."""

    attempted: int
    accepted: int
    refused: int
    errors: list[str]
    seconds: float
    connections: int

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds if self.seconds > 0 else 0.0


def build_messages(
    contacts: list[RawContact], template: MessageTemplate, campaign_id: str
) -> list[OutgoingMail]:
    """One campaign-like mail per contact, carrying X-Campaign-ID `campaign_id`."""
    now = datetime.now(UTC)
    mails = []
    for contact in contacts:
        recipient = RecipientQueued(
            campaign_id=campaign_id,
            contact_id=contact.contact_id,
            email=contact.email,
            first_name=contact.first_name,
            last_name=contact.last_name,
            attributes=contact.attributes,
            template=template,
        )
        mails.append(build_mail(recipient, render(recipient), now))
    return mails


def send_all(mails: list[OutgoingMail], host: str, port: int, connections: int) -> RawResult:
    """Send every mail over `connections` reused connections; timed from the first connect to
    the last reply."""
    work: queue.SimpleQueue[OutgoingMail] = queue.SimpleQueue()
    for mail in mails:
        work.put(mail)
    lock = threading.Lock()
    accepted = refused = 0
    errors: list[str] = []

    def client() -> None:
        nonlocal accepted, refused
        ok = bad = 0
        try:
            with smtplib.SMTP(host, port, local_hostname=LOCAL_HOSTNAME,
                              timeout=SMTP_TIMEOUT_SECONDS) as smtp:
                while True:
                    try:
                        mail = work.get_nowait()
                    except queue.Empty:
                        break
                    try:
                        smtp.sendmail(mail.sender, [mail.recipient], mail.content)
                        ok += 1
                    except (smtplib.SMTPResponseException, smtplib.SMTPRecipientsRefused):
                        bad += 1  # a refusal (sink faults configured): counted, not fatal
        except (smtplib.SMTPException, OSError) as exc:
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")
        with lock:
            accepted += ok
            refused += bad

    threads = [threading.Thread(target=client, name=f"raw-smtp-{i}") for i in range(connections)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    return RawResult(len(mails), accepted, refused, errors, seconds, connections)
