"""`python -m services.sender`: run one sender until SIGTERM or SIGINT.

A stop signal ends fetching; the batch in flight is still mailed, settled, published and
committed, then the process exits 0. Settings: `SenderSettings` (the README's table): the
SMTP connections, the retry policy of transient failures (services/sender/retries.py), the
rate limits per tenant and per SMTP server for the whole group (services/sender/throttle.py),
and the relays, routed by From domain with failover (services/sender/relay_config.py and
relays.py; without them mail goes to SMTP_HOST:SMTP_PORT). Settings that cannot be used stop
the start with exit code 2 and the reason.

This module is the sender's one wiring point: `sender_worker` builds every adapter the worker
talks to (clients, send ledger, feeds, held gauge) around the SMTP transport, retry policy,
rate limiter and List-Unsubscribe signer that `main` builds from the settings.

The cyclic garbage collector runs relaxed while the sender works (see
services/common/gc_tuning.py).

Test sends (TestEmailRequested) are mailed by a second worker on its own thread (see
services/sender/proof_mail.py) over the same relays; if it fails, the whole process stops
(exit code 1) rather than silently dropping test sends.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

from services.common.gc_tuning import relaxed_gc
from services.common.kafka import Stopping
from services.common.logs import configure_logging
from services.common.observability import standard_checks, start_observability
from services.common.settings import SenderSettings, Settings, load_or_exit
from services.sender.clients import delivery_producer, recipients_consumer
from services.sender.control import ControlBoard, ControlFeed
from services.sender.decisions import Bounds
from services.sender.do_not_mail import DoNotMailFeed, DoNotMailList
from services.sender.held_gauge import HeldGauge
from services.sender.ledger import SendLedger
from services.sender.list_unsubscribe import ListUnsubscribe
from services.sender.mailer import SEND_BOUNDS
from services.sender.marks import MailMarks
from services.sender.proof_mail import TestSendWorker
from services.sender.relay_config import RelayConfigError
from services.sender.relays import transport_factory
from services.sender.retries import RetryPolicy
from services.sender.throttle import RateLimiter
from services.sender.transport import MailTransport
from services.sender.worker import SenderWorker

# How long the test-send thread may take to finish its request in flight after a stop: one
# request is at most 25 SMTP transactions with their own timeouts, plus a flush.
TEST_SENDS_STOP_SECONDS = 60.0


def sender_worker(settings: Settings, stop: threading.Event, transport: MailTransport, *,
                  policy: RetryPolicy, limiter: RateLimiter,
                  list_unsubscribe: ListUnsubscribe | None, concurrency: int = 8,
                  bounds: Bounds = SEND_BOUNDS, marks: MailMarks | None = None) -> SenderWorker:
    """The sender's worker with its adapters (`stop` also ends the send ledger's wait for an
    absent database). Tests call it with a transport, policy and limiter of their own."""
    return SenderWorker(
        settings,
        consumer=recipients_consumer(settings),
        producer=delivery_producer(settings),
        ledger=SendLedger(settings.database_url, stop=stop),
        transport=transport,
        control=ControlFeed(settings, ControlBoard()),
        do_not_mail=DoNotMailFeed(settings, DoNotMailList()),
        held=HeldGauge(settings.kafka_bootstrap_servers),
        policy=policy,
        limiter=limiter,
        list_unsubscribe=list_unsubscribe,
        concurrency=concurrency,
        bounds=bounds,
        marks=marks,
    )


def main() -> int:
    log = configure_logging("sender")
    stop = threading.Event()

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        # Only set the flag: a signal handler interrupts arbitrary code, logging included.
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    settings = load_or_exit(SenderSettings, log)
    try:
        transports = transport_factory(settings)
    except RelayConfigError as exc:
        log.error("relay configuration refused", error=str(exc))
        return 2
    try:
        limiter = RateLimiter.from_settings(settings)
        marks = MailMarks.from_settings(settings)
    except ValueError as exc:
        log.error("invalid settings", error=str(exc))
        return 2
    start_observability(settings, "sender", standard_checks(settings))
    concurrency = settings.sender_concurrency
    failed = threading.Event()

    def run_test_sends() -> None:
        try:
            TestSendWorker(settings, transports).run(stop)
        except Exception:
            log.exception("test-send worker failed; stopping the sender")
            failed.set()
            stop.set()

    test_sends = threading.Thread(target=run_test_sends, name="sender-test-sends", daemon=True)
    test_sends.start()
    try:
        worker = sender_worker(settings, stop, transports(concurrency),
                               policy=RetryPolicy.from_settings(settings),
                               limiter=limiter,
                               list_unsubscribe=ListUnsubscribe.from_settings(settings),
                               concurrency=concurrency, marks=marks)
        with relaxed_gc():
            worker.run(stop)
    except Stopping as exc:  # asked to stop while the send ledger waited for the database
        log.warning("stopping before the first batch", waiting_for=str(exc))
    finally:
        stop.set()
        test_sends.join(TEST_SENDS_STOP_SECONDS)
    if failed.is_set():
        return 1
    log.info("exiting after stop request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
