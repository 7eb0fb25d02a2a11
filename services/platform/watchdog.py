"""The supervisor's watchdog: restarts a supervised service that is alive but stuck, and
counts every (re)start for `make status`.

It runs as a supervisord event listener (`python -m services.platform.watchdog <state dir>
<program>...`, the programs it watches),
fed PROCESS_STATE and TICK_5 events on stdin (stdout is the protocol channel: it logs to
stderr only). On each tick it compares every watched program's heartbeat file
(services/common/heartbeat.py) with its start time; `stuck` decides, the listener carries it
out through supervisord's XML-RPC interface: SIGKILL (which also ends a SIGSTOPped process),
after which supervisord starts the program again as after any crash.

Guarantee: a RUNNING program whose heartbeat is older than `stale_after` (or that has not
beaten `start_grace` after starting) is restarted within one tick of that; programs without
a heartbeat file configured are never touched.
"""

from __future__ import annotations

import json
import sys
import time
import xmlrpc.client
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from services.common.logs import configure_logging
from services.common.restart_counts import RESTARTS_FILE
from services.common.settings import WatchdogSettings, load_or_exit

# supervisord's fault code while it stops every program (supervisor.xmlrpc.Faults).
SHUTDOWN_STATE = 6


@dataclass(frozen=True)
class ProgramView:
    """What the watchdog knows of one program at a tick."""

    name: str
    state: str  # supervisord's state name: RUNNING, STARTING, BACKOFF, EXITED, ...
    started_at: float  # epoch seconds of its current start
    beat_at: float | None  # epoch seconds of its heartbeat file's last touch, None if absent


START_RESOLUTION_S = 1.0


def stuck(programs: Iterable[ProgramView], now: float, *, stale_after: float,
          start_grace: float) -> list[str]:
    """Names of the RUNNING programs to restart: no beat since this start for longer than
    `start_grace`, or a last beat older than `stale_after`."""
    found = []
    for program in programs:
        if program.state != "RUNNING":
            continue
        # supervisord reports the start in whole seconds: a beat within that second may be the
        # killed predecessor's last one, so only a later beat counts as this start's.
        if program.beat_at is None or program.beat_at < program.started_at + START_RESOLUTION_S:
            if now - program.started_at > start_grace:
                found.append(program.name)
        elif now - program.beat_at > stale_after:
            found.append(program.name)
    return found


def count_event(counts: Mapping[str, Mapping[str, int]], event: str,
                fields: Mapping[str, str]) -> dict[str, dict[str, int]]:
    """Counters after one PROCESS_STATE event: `starts` (every spawn), `crashes` (exits
    supervisord did not ask for, and spawns that failed)."""
    name = fields.get("processname", "")
    updated = {k: dict(v) for k, v in counts.items()}
    mine = updated.setdefault(name, {"starts": 0, "crashes": 0, "watchdog": 0})
    if event == "PROCESS_STATE_STARTING":
        mine["starts"] += 1
    elif event == "PROCESS_STATE_EXITED" or event == "PROCESS_STATE_BACKOFF":
        mine["crashes"] += 1
    return updated


def _write_counts(folder: Path, counts: Mapping[str, Any]) -> None:
    tmp = folder / (RESTARTS_FILE + ".tmp")
    tmp.write_text(json.dumps(counts, sort_keys=True))
    tmp.replace(folder / RESTARTS_FILE)


def _fields(payload: str) -> dict[str, str]:
    header, _, _ = payload.partition("\n")
    return dict(token.split(":", 1) for token in header.split() if ":" in token)


class Watchdog:
    """The listener's state: where heartbeats are, and the counters it keeps."""

    def __init__(self, supervisor_dir: Path, heartbeat_dir: Path, rpc: Any, watched: Iterable[str],
                 *, stale_after: float, start_grace: float) -> None:
        self.supervisor_dir = supervisor_dir
        self.watched = frozenset(watched)
        self.heartbeat_dir = heartbeat_dir
        self.rpc = rpc
        self.stale_after = stale_after
        self.start_grace = start_grace
        self.log = structlog.get_logger().bind(component="watchdog")
        self.counts: dict[str, dict[str, int]] = {}
        _write_counts(supervisor_dir, self.counts)  # a new supervisord counts afresh

    def on_event(self, event: str, payload: str) -> None:
        if event.startswith("PROCESS_STATE_"):
            self.counts = count_event(self.counts, event, _fields(payload))
            _write_counts(self.supervisor_dir, self.counts)
        elif event.startswith("TICK_"):
            self.tick()

    def tick(self) -> None:
        now = time.time()
        try:
            infos = self.rpc.supervisor.getAllProcessInfo()
        except xmlrpc.client.Fault as fault:
            if fault.faultCode == SHUTDOWN_STATE:
                return  # supervisord is stopping every program: nothing to watch any more
            raise
        views = [self._view(info) for info in infos]
        watched = [v for v in views if v.name in self.watched]
        for name in stuck(watched, now, stale_after=self.stale_after, start_grace=self.start_grace):
            view = next(v for v in watched if v.name == name)
            self.log.warning("heartbeat stale: restarting", program=name,
                             beat_age_s=None if view.beat_at is None else round(now - view.beat_at, 1),
                             up_s=round(now - view.started_at, 1))
            # A stuck process cannot shut down gracefully (a stopped one would not even see
            # SIGTERM); every service is exactly-once under SIGKILL, and supervisord restarts it.
            try:
                self.rpc.supervisor.signalProcess(name, "KILL")
            except Exception as exc:  # it exited by itself meanwhile: supervisord restarts it
                self.log.warning("kill failed", program=name, error=str(exc))
            mine = self.counts.setdefault(name, {"starts": 0, "crashes": 0, "watchdog": 0})
            mine["watchdog"] = mine.get("watchdog", 0) + 1
            _write_counts(self.supervisor_dir, self.counts)

    def _view(self, info: Mapping[str, Any]) -> ProgramView:
        name = str(info["name"])
        try:
            beat_at: float | None = (self.heartbeat_dir / name).stat().st_mtime
        except OSError:
            beat_at = None
        return ProgramView(name, str(info["statename"]), float(info["start"]), beat_at)


def main(argv: list[str]) -> int:
    from supervisor import childutils

    settings = load_or_exit(WatchdogSettings, configure_logging("watchdog"))
    state_dir = Path(argv[0]) if argv else Path(".state")
    watchdog = Watchdog(
        state_dir / "supervisor", state_dir / "heartbeats", childutils.getRPCInterface({
            "SUPERVISOR_SERVER_URL": settings.supervisor_server_url,
            "SUPERVISOR_USERNAME": settings.supervisor_username,
            "SUPERVISOR_PASSWORD": settings.supervisor_password.get_secret_value()}),
        argv[1:],
        stale_after=settings.watchdog_stale_seconds, start_grace=settings.watchdog_start_grace_seconds,
    )
    while True:
        headers, payload = childutils.listener.wait(sys.stdin, sys.stdout)
        try:
            watchdog.on_event(headers["eventname"], payload)
        except Exception:  # a failed tick must not end the listener; the next one tries again
            watchdog.log.exception("watchdog event failed", supervisor_event=headers.get("eventname"))
        childutils.listener.ok(sys.stdout)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
