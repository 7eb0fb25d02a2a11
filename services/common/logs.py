"""structlog set-up shared by every service: one JSON object per line on stderr."""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys

import structlog


def configure_logging(service: str, level: str = "INFO") -> structlog.stdlib.BoundLogger:
    """Configure JSON-line logging and return a logger bound to the service name.
    `kill -USR1 <pid>` then prints every thread's stack to stderr: what a stuck service
    waits on (the chaos tests ask for it before they give up on a service)."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # Libraries' stdlib records (uvicorn, psycopg, faust, ...) become JSON lines too.
    logging.basicConfig(level=level, handlers=[json_log_handler()], force=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        cache_logger_on_first_use=True,
    )
    logger: structlog.stdlib.BoundLogger = structlog.get_logger().bind(service=service)
    return logger


def json_log_handler() -> logging.Handler:
    """A stdlib handler that renders foreign log records (faust, aiokafka) as JSON lines too."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=structlog.processors.JSONRenderer(),
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
        )
    )
    return handler
