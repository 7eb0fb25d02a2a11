"""`python -m services.sender`: run one sender until SIGTERM or SIGINT.

A stop signal ends fetching; the batch in flight is still mailed, settled, published and
committed, then the process exits 0. SENDER_CONCURRENCY sets the number of SMTP connections;
SENDER_RETRY_BASE_SECONDS, SENDER_RETRY_MAX_DELAY_SECONDS, SENDER_MAX_ATTEMPTS and
SENDER_MAX_AGE_SECONDS the retry policy of transient failures (see services/sender/retries.py);
SENDER_TENANT_RATE and SENDER_SMTP_RATE (e.g. "100/s,5000/min") the rate limits per tenant and
per SMTP server, for the whole group (see services/sender/throttle.py).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType

from services.common.logs import configure_logging
from services.common.settings import Settings
from services.sender.worker import SenderWorker


def main() -> int:
    log = configure_logging("sender")
    stop = threading.Event()

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        # Only set the flag: a signal handler interrupts arbitrary code, logging included.
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    concurrency = int(os.environ.get("SENDER_CONCURRENCY", "8"))
    SenderWorker(Settings(), concurrency=concurrency).run(stop)
    log.info("exiting after stop request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
