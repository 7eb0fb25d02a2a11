"""The sender's SMTP threads: a fixed set of long-lived threads taking jobs from one queue.

Guarantees:
- Jobs start in the order they were put, each on exactly one thread; at most `threads` run
  at once (one per SMTP connection of the pool).
- `shutdown(cancel=True)` drops the jobs not started yet and waits for the ones running, as
  `ThreadPoolExecutor.shutdown(wait=True, cancel_futures=True)` does: a mail already handed
  to the relay is never cut off, a mail not started is never started after it returns.
- A job must not raise (the send pipeline wraps each mail and records its exception for the
  driving thread); if one does anyway, its thread logs it and goes on with the next job.

Why not a `ThreadPoolExecutor`: `submit` builds a Future (with its own Condition) and a work
item per mail, and setting each result wakes that Condition's waiters: a few microseconds of
the sender's main thread and of the SMTP threads per mail, for a result the pipeline only
needs counted per chunk.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger("sender")

Job = tuple[Callable[..., None], tuple[Any, ...]]


class MailLanes:
    """`threads` daemon threads named `<name>_<n>` running jobs from one FIFO queue."""

    def __init__(self, threads: int, *, name: str = "sender-smtp") -> None:
        if threads < 1:
            raise ValueError("mail lanes need at least one thread")
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"{name}_{n}", daemon=True)
                         for n in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Callable[..., None], *args: Any) -> None:
        """Queue `job(*args)` for the next free thread."""
        if self._closed:
            raise RuntimeError("mail lanes are shut down")
        self._jobs.put((job, args))

    def shutdown(self, *, cancel: bool = True) -> None:
        """Stop the threads once the jobs running (and, unless `cancel`, the jobs queued)
        have finished; returns when every thread has ended."""
        self._closed = True
        if cancel:
            while True:
                try:
                    self._jobs.get_nowait()
                except queue.Empty:
                    break
        for _ in self._threads:
            self._jobs.put(None)  # one stop mark per thread, behind any job still queued
        for thread in self._threads:
            thread.join()

    def _run(self) -> None:
        jobs = self._jobs
        while (job := jobs.get()) is not None:
            function, args = job
            try:
                function(*args)
            except BaseException:  # a bug in a job must not take a lane down with it
                log.exception("mail job raised")
