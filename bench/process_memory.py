"""Peak resident memory of the platform's processes, from /proc (Linux only).

VmHWM ("high water mark") is the largest resident set a process has had. The kernel lets the
owner of a process reset it (writing "5" to /proc/<pid>/clear_refs), so the bench resets it
right before its campaign and reads it right after: the figure is then the peak of this
campaign, not of whatever the service did since `make up`.
"""

from __future__ import annotations

from pathlib import Path

_PROC = Path("/proc")
# clear_refs code that resets the peak RSS counter (VmHWM) to the current RSS (Linux >= 4.0).
_RESET_PEAK_RSS = "5"
_KIB_PER_MIB = 1024


def reset_peak_rss(pids: dict[str, int]) -> bool:
    """Reset VmHWM of every process; False if the kernel refused for any of them (the peaks
    read later then cover the process's whole life)."""
    ok = True
    for pid in pids.values():
        try:
            (_PROC / str(pid) / "clear_refs").write_text(_RESET_PEAK_RSS)
        except OSError:
            ok = False
    return ok


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM of a process in MiB, or None if it is gone or /proc does not say."""
    try:
        status = (_PROC / str(pid) / "status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            kib = int(line.split()[1])  # "VmHWM:    123456 kB"
            return round(kib / _KIB_PER_MIB, 1)
    return None


def environment_of(pid: int) -> dict[str, str]:
    """The environment a process was started with ({} if unreadable)."""
    try:
        raw = (_PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {name: value for name, _, value in pairs}
