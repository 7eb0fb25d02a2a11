"""`python -m services.command_handler`: run until SIGTERM or SIGINT."""

from __future__ import annotations

import signal
import threading

from services.command_handler.handler import CommandHandler
from services.common.observability import standard_checks, start_observability
from services.common.settings import Settings


def main() -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    settings = Settings()
    start_observability(settings, "command_handler", standard_checks(settings, database=False))
    CommandHandler(settings).run(stop)


if __name__ == "__main__":
    main()
