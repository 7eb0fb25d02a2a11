"""`python -m services.command_handler`: run until SIGTERM or SIGINT.

COMMAND_HANDLER_INSTANCE (default "0") names this instance: its static group membership and
its transactional id, so a restarted instance takes over at once (see handler.py). Run one
instance; a second one needs another name.
"""

from __future__ import annotations

import signal
import threading

from services.command_handler.handler import CommandHandler
from services.common.logs import configure_logging
from services.common.observability import standard_checks, start_observability
from services.common.settings import CommandHandlerSettings, load_or_exit


def main() -> None:
    settings = load_or_exit(CommandHandlerSettings, configure_logging("command-handler"))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    start_observability(settings, "command_handler", standard_checks(settings, database=False))
    CommandHandler(settings, instance=settings.command_handler_instance).run(stop)


if __name__ == "__main__":
    main()
