"""A stop event for loop tests: it records the back-off pauses asked of it, never pauses."""

from __future__ import annotations

import threading


class RecordingStop(threading.Event):
    """A stop event that records the backoff pauses asked of it (and does not pause)."""

    def __init__(self) -> None:
        super().__init__()
        self.pauses: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.pauses.append(timeout)
        return False
