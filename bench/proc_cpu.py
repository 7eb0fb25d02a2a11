"""CPU time used so far, from /proc: of a process (all its threads, /proc/<pid>/stat) or of
one of its threads (/proc/<pid>/task/<tid>/stat). Linux only; the bench runs its services on
this machine."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def stat_fields(stat: str) -> list[str]:
    """The fields of a stat line after the command name (which may hold spaces and ")")."""
    return stat.rsplit(")", 1)[1].split()


def ticks_to_seconds(ticks: int) -> float:
    return ticks / _TICKS_PER_SECOND


def stat_cpu_seconds(stat: str) -> float:
    """User + system CPU seconds of a stat line: utime and stime, the 12th and 13th fields
    after the command name, in clock ticks."""
    fields = stat_fields(stat)
    return ticks_to_seconds(int(fields[11]) + int(fields[12]))


def cpu_seconds(pid: int, tid: int | None = None) -> float | None:
    """User + system CPU seconds of process `pid` (or of its thread `tid`) so far; None if it
    is gone or /proc does not tell."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        return stat_cpu_seconds(Path(path).read_text())
    except (OSError, ValueError, IndexError):
        return None


def postgres_cpu_seconds(postmaster: int) -> float | None:
    """CPU of the whole server so far: the postmaster, its live children (backends, writers),
    and the children it already reaped (cutime + cstime), so a backend that ends between two
    readings is still counted. None if the server is gone."""
    try:
        stat = Path(f"/proc/{postmaster}/stat").read_text()
        children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
    except OSError:
        return None
    ticks = sum(int(f) for f in stat_fields(stat)[11:15])  # utime, stime, cutime, cstime
    total = ticks_to_seconds(ticks)
    for child in children:
        used = cpu_seconds(int(child))
        total += used or 0.0  # a child gone since the listing is in cutime next time
    return total


class CpuMeter:
    """CPU seconds each named process (and PostgreSQL's server, when its postmaster is given)
    uses between `__init__` and `used()`."""

    def __init__(self, pids: Mapping[str, int], postmaster: int | None) -> None:
        self.pids, self.postmaster = dict(pids), postmaster
        self.before = self._now()

    def _now(self) -> dict[str, float | None]:
        now = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        if self.postmaster:
            now["postgres"] = postgres_cpu_seconds(self.postmaster)
        return now

    def used(self) -> dict[str, float | None]:
        after = self._now()
        return {name: _delta(self.before.get(name), seconds) for name, seconds in after.items()}


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else round(after - before, 2)


def per_mail_us(used: Mapping[str, float | None], mails: int,
                leave_out: tuple[str, ...] = ("smtp_sink",)) -> tuple[float | None, dict[str, float]]:
    """Microseconds of CPU per mail of every process but `leave_out` (the sink is not the
    pipeline), in all and per process; None in all when a process's figure is missing."""
    counted = {name: seconds for name, seconds in used.items() if name not in leave_out}
    by_process = {name: round(seconds / mails * 1e6, 1)
                  for name, seconds in counted.items() if seconds is not None and mails}
    if not mails or any(seconds is None for seconds in counted.values()):
        return None, by_process
    return round(sum(s for s in counted.values() if s is not None) / mails * 1e6, 1), by_process
