"""`python -m services.completion`: track campaign completion until SIGTERM or SIGINT.

COMPLETION_TRACKER_INSTANCE (default "0") names this instance: its static group membership and
its transactional id, so a restarted instance takes over at once (see service.py). Run one
instance; a second one needs another name. COMPLETION_TRACKER_TRANSACTIONAL_ID, when set,
overrides the transactional id.
AUTOPAUSE_FAILURE_RATE (default 0.5; "off" disables) and AUTOPAUSE_MIN_DELIVERIES (default
100) configure the failure-rate guard that pauses a campaign failing too often.
"""

from __future__ import annotations

import signal
import threading

from services.common.logs import configure_logging
from services.common.observability import standard_checks, start_observability
from services.common.settings import CompletionSettings, load_or_exit
from services.completion.service import SERVICE, CompletionService
from services.completion.tracker import FailureGuard


def main() -> None:
    log = configure_logging(SERVICE)
    settings = load_or_exit(CompletionSettings, log)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    rate = settings.autopause_failure_rate
    guard = FailureGuard(min_deliveries=settings.autopause_min_deliveries,
                         failure_rate=None if rate == "off" else rate)
    start_observability(settings, SERVICE, standard_checks(settings, database=False))
    service = CompletionService(
        settings,
        transactional_id=settings.completion_tracker_transactional_id or None,
        instance=settings.completion_tracker_instance,
        logger=log.bind(component=SERVICE),
        guard=guard,
    )
    service.run(stop)


if __name__ == "__main__":
    main()
