"""`python -m services.projector`: project the campaign topics into PostgreSQL until SIGTERM.

Wiring only: settings from the environment, migrations, topics, then `Projector.run`. On
SIGTERM or SIGINT the batch in flight commits (or rolls back) as one transaction, the consumer
leaves its group and the process exits 0.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

from projections.migrate import apply_migrations
from projections.projector import Projector
from services.common.logs import configure_logging
from services.common.settings import Settings
from services.common.topics import ensure_topics


def main() -> int:
    log = configure_logging("projector")
    settings = Settings()
    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("stop requested", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    applied = apply_migrations(settings.database_url)
    if applied:
        log.info("migrations applied", versions=applied)
    ensure_topics(settings)
    Projector(settings, logger=log).run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
