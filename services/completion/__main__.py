"""`python -m services.completion`: track campaign completion until SIGTERM or SIGINT.

COMPLETION_TRACKER_TRANSACTIONAL_ID, when set, is the producer's transactional id: a restarted
instance with the same id aborts the transaction its predecessor left open at once.
"""

from __future__ import annotations

import os
import signal
import threading

from services.common.logs import configure_logging
from services.common.settings import Settings
from services.completion.service import SERVICE, CompletionService


def main() -> None:
    log = configure_logging(SERVICE)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    service = CompletionService(
        Settings(),
        transactional_id=os.environ.get("COMPLETION_TRACKER_TRANSACTIONAL_ID") or None,
        logger=log.bind(component=SERVICE),
    )
    service.run(stop)


if __name__ == "__main__":
    main()
