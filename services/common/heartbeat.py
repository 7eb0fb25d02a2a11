"""A liveness signal a service's main loop refreshes, so a process that is alive but stuck
can be told from one that works.

`Heartbeat.beat()` touches the heartbeat file (its modification time is the signal) at most
once per `interval`, so a hot loop pays one clock read per call. The watchdog
(services/platform/watchdog.py) restarts a supervised process whose file went stale. Without
a file configured (HEARTBEAT_FILE unset: tests, a service run by hand) `beat()` only records
the time in the process, for the liveness probe.

Guarantee: a fresh file means the loop that calls `beat()` ran within `interval` of that
time; it says nothing about the work itself being right.
"""

from __future__ import annotations

import functools
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
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        if self.path is None:
            return
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

    def seconds_since_beat(self) -> float | None:
        """Seconds since this process last beat (None: never), within `interval`; the
        liveness probe of services/common/observability.py reads it."""
        if self._last == float("-inf"):
            return None
        return time.monotonic() - self._last

    def age(self) -> float | None:
        """Seconds since the last beat reached the file (None: no file, or never beaten)."""
        if self.path is None:
            return None
        try:
            return max(0.0, time.time() - self.path.stat().st_mtime)
        except OSError:
            return None


@functools.cache
def shared_heartbeat(path: str | None) -> Heartbeat:
    """The one Heartbeat of this process for `path`: every loop that beats it and the liveness
    probe that reads it (services/common/observability.py) see the same last beat."""
    return Heartbeat(path)
