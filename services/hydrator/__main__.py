"""`python -m services.hydrator`: run the faust worker until SIGTERM (faust stops cleanly)."""

from __future__ import annotations

import logging
import os

import faust

from services.common.logs import json_log_handler
from services.common.settings import Settings
from services.hydrator.app import create_app


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
    app = create_app(Settings())
    worker = HydratorWorker(app, loglevel=os.environ.get("HYDRATOR_LOGLEVEL", "WARNING"), quiet=True)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
