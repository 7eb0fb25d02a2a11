"""CPU time used so far, from /proc: of a process (all its threads, /proc/<pid>/stat) or of
one of its threads (/proc/<pid>/task/<tid>/stat). Linux only; the bench runs its services on
this machine."""

from __future__ import annotations

import os
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
