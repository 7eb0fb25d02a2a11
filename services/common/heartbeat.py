"""A liveness signal a service's main loop refreshes, so a process that is alive but stuck
can be told from one that works.

`Heartbeat.beat()` touches the heartbeat file (its modification time is the signal) at most
once per `interval`, so a hot loop pays one clock read per call. The watchdog
(services/platform/watchdog.py) restarts a supervised process whose file went stale. Without
a file configured (HEARTBEAT_FILE unset: tests, a service run by hand) `beat()` does nothing.

Guarantee: a fresh file means the loop that calls `beat()` ran within `interval` of that
time; it says nothing about the work itself being right.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

# At most one filesystem call a second: enough for a watchdog that waits tens of seconds.
BEAT_INTERVAL_SECONDS = 1.0


class Heartbeat:
    def __init__(self, path: Path | str | None, interval: float = BEAT_INTERVAL_SECONDS) -> None:
        self.path = Path(path) if path else None
        self.interval = interval
        self._last = float("-inf")

    def beat(self) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        try:
            os.utime(self.path)
        except FileNotFoundError:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.path.touch()
            except OSError:
                pass  # an unwritable state folder must not stop the service; the watchdog will tell
        except OSError:
            pass

    def age(self) -> float | None:
        """Seconds since the last beat reached the file (None: no file, or never beaten)."""
        if self.path is None:
            return None
        try:
            return max(0.0, time.time() - self.path.stat().st_mtime)
        except OSError:
            return None
