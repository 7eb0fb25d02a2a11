"""`python -m services.hydrator`: run the faust worker (and the gather loop in a thread)
until SIGTERM (faust stops cleanly)."""

from __future__ import annotations

import logging
import os

import faust

from services.common.logs import json_log_handler
from services.common.observability import standard_checks, start_observability
from services.common.settings import Settings
from services.hydrator.app import APP_NAME, create_app, instance_name
from services.hydrator.gather import start_gather


class HydratorWorker(faust.Worker):
    """faust's worker with every log line (faust's and aiokafka's too) rendered as JSON."""

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        super().on_setup_root_logger(logger, level)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.addHandler(json_log_handler())
        # faust's spinner set-up lowered the root logger to DEBUG (relying on the handler it
        # levelled, removed above): restore the requested level, or aiokafka logs every fetch.
        logger.setLevel(level)


def main() -> None:
    settings = Settings()
    app = create_app(settings)
    heartbeat = settings.heartbeat()

    @app.timer(interval=1.0)
    async def beat() -> None:
        # Runs on faust's event loop: it stops when that loop is stuck.
        heartbeat.beat()

    start_observability(settings, "hydrator", standard_checks(settings, database=False))
    gather, _ = start_gather(settings, settings.group(APP_NAME), instance_name())
    worker = HydratorWorker(app, loglevel=os.environ.get("HYDRATOR_LOGLEVEL", "WARNING"), quiet=True)
    try:
        worker.execute_from_commandline()
    finally:
        gather.stop()


if __name__ == "__main__":
    main()
