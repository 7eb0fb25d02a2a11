"""How many times the supervisor started each program: the file the watchdog
(services/platform/watchdog.py) keeps, read by `make status` and by each supervised service's
restarts gauge (metrics.SERVICE_RESTARTS).

Format: `{"<program>": {"starts": n, "crashes": n, "watchdog": n}}`, written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

RESTARTS_FILE = "restarts.json"
# Set by services/platform/supervision.py in each program's environment (supervisord itself
# sets SUPERVISOR_PROCESS_NAME).
RESTARTS_FILE_ENV = "RESTART_COUNTS_FILE"


def restarts(counts: Mapping[str, int]) -> int:
    """Restarts of one program since supervisord started it first."""
    return max(0, counts.get("starts", 0) - 1)


def read_file(path: Path) -> dict[str, dict[str, int]]:
    """The counts, or {} when the file is missing or unreadable (not supervised, or not yet)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_counts(folder: Path) -> dict[str, dict[str, int]]:
    return read_file(folder / RESTARTS_FILE)


def my_restarts(path: Path | None, name: str) -> int:
    """The restarts of program `name` in the counts file at `path` (0 when not supervised);
    the file is read on every call."""
    if path is None or not name:
        return 0
    return restarts(read_file(path).get(name, {}))
