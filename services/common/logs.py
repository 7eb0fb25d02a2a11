"""structlog set-up shared by every service: one JSON object per line on stderr."""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys
import threading

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
    # An exception nobody caught (in the main thread or another) is a JSON line too, with
    # its traceback in the "exception" field, instead of Python's raw print.
    sys.excepthook = lambda kind, value, tb: logger.critical(
        "uncaught exception", exc_info=(kind, value, tb))
    threading.excepthook = lambda hook: logger.critical(
        "uncaught exception in a thread", thread=getattr(hook.thread, "name", None),
        exc_info=(hook.exc_type, hook.exc_value, hook.exc_traceback))
    return logger


class _SharedStderr(logging.Handler):
    """Writes each formatted record through structlog's own stderr logger: both take its lock
    for the file, so a library's line and the service's never interleave on one line (a
    StreamHandler has a lock of its own, and two threads' lines were seen spliced)."""

    def __init__(self) -> None:
        super().__init__()
        self._out = structlog.PrintLogger(file=sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._out.msg(self.format(record))
        except Exception:
            self.handleError(record)


def json_log_handler() -> logging.Handler:
    """A stdlib handler that renders foreign log records (faust, aiokafka) as JSON lines too."""
    handler = _SharedStderr()
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
