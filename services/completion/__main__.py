"""`python -m services.completion`: track campaign completion until SIGTERM or SIGINT.

COMPLETION_TRACKER_TRANSACTIONAL_ID, when set, is the producer's transactional id: a restarted
instance with the same id aborts the transaction its predecessor left open at once.
AUTOPAUSE_FAILURE_RATE (default 0.5; "off" disables) and AUTOPAUSE_MIN_DELIVERIES (default
100) configure the failure-rate guard that pauses a campaign failing too often.
"""

from __future__ import annotations

import os
import signal
import threading

from services.common.logs import configure_logging
from services.common.observability import standard_checks, start_observability
from services.common.settings import Settings
from services.completion.service import SERVICE, CompletionService
from services.completion.tracker import FailureGuard


def main() -> None:
    log = configure_logging(SERVICE)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    rate = os.environ.get("AUTOPAUSE_FAILURE_RATE", "0.5").strip()
    guard = FailureGuard(
        min_deliveries=int(os.environ.get("AUTOPAUSE_MIN_DELIVERIES", "100")),
        failure_rate=None if rate in ("", "off") else float(rate),
    )
    settings = Settings()
    start_observability(settings, SERVICE, standard_checks(settings, database=False))
    service = CompletionService(
        settings,
        transactional_id=os.environ.get("COMPLETION_TRACKER_TRANSACTIONAL_ID") or None,
        logger=log.bind(component=SERVICE),
        guard=guard,
    )
    service.run(stop)


if __name__ == "__main__":
    main()
