"""`python -m services.hydrator`: run the faust worker (and the gather loop in a thread)
until SIGTERM (faust stops cleanly)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from typing import Any

import faust

from services.common.logs import configure_logging, json_log_handler
from services.common.observability import standard_checks, start_observability
from services.common.settings import HydratorSettings, load_or_exit
from services.hydrator.app import APP_NAME, build
from services.hydrator.gather import start_gather


class HydratorWorker(faust.Worker):
    """faust's worker with every log line (faust's and aiokafka's too) rendered as JSON, and
    no terminal spinner (its backspaces and cursor escapes would land in the log)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spinner = None

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        super().on_setup_root_logger(logger, level)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.addHandler(json_log_handler())
        logger.setLevel(level)


# glibc's mallopt parameter and the arena cap: each thread (faust's, librdkafka's, RocksDB's,
# the replicas' and fan-outs' workers) would otherwise get its own malloc arena, and memory
# freed in one is rarely handed back, so peak RSS grows with the threads.
M_ARENA_MAX = -8
ARENA_MAX = 2


def cap_malloc_arenas() -> bool:
    """Cap glibc's malloc arenas at ARENA_MAX; False (nothing done) without glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    return bool(mallopt(M_ARENA_MAX, ARENA_MAX))


# Allocations of tracked objects, less deallocations, between two young-generation
# collections (Python's default: 700). A replica batch holds ~5,000 consumer messages and
# their contacts alive at once: at 700 each batch was swept several times over and pushed
# into the old generation, whose full sweeps of the whole heap took a quarter of the ingest.
GC_YOUNG_THRESHOLD = 50_000


def tune_garbage_collector() -> None:
    """Everything allocated so far (modules, pydantic schemas, the app) is kept out of every
    later collection, and young collections are rarer (GC_YOUNG_THRESHOLD)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def main() -> None:
    cap_malloc_arenas()  # first, before threads start allocating
    settings = load_or_exit(HydratorSettings, configure_logging("hydrator"))
    hydrator = build(settings)
    app = hydrator.app
    tune_garbage_collector()
    heartbeat = settings.heartbeat()

    @app.timer(interval=1.0)
    async def beat() -> None:
        # Runs on faust's event loop: it stops when that loop is stuck.
        heartbeat.beat()

    start_observability(settings, "hydrator", standard_checks(settings, database=False))
    gather, _ = start_gather(settings, settings.group(APP_NAME), settings.hydrator_instance)
    worker = HydratorWorker(app, loglevel=settings.hydrator_loglevel, quiet=True)
    hydrator.start_head_start()  # the replicas' catch-up while faust starts and joins
    try:
        worker.execute_from_commandline()
    finally:
        gather.stop()


if __name__ == "__main__":
    main()
