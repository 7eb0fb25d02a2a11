"""Sender memory against campaign size: peak RSS of one real sender process mailing N
recipients, for several N (default 20,000 and 200,000; BENCH_SCALE=small: 2,000 and 20,000;
BENCH_SENDER_MEMORY_SIZES="a,b,..." to choose).

For each N, on fresh topics (own prefix, deleted afterwards): a sink process (no latency,
records to a file, nothing kept in memory), one `python -m services.sender` process (default
SENDER_CONCURRENCY) that has joined its group, then N RecipientQueued records produced in
slices while it runs, so it always has a backlog, as behind a fast hydrator. Until the sink has
accepted all N, the sender's VmRSS is sampled from /proc every SAMPLE_SECONDS; at the end its
VmHWM (the kernel's own peak, which no sample can miss) is the figure. Every recipient must be
accepted exactly once, else the step fails.

What "flat" means: the sender holds at most a few batches of recipients (the pipeline's
bound, services/sender/pipeline.py) plus the consumer's prefetch queue, whose size
librdkafka caps; none of it grows with N. `sender_rss_growth` = peak(largest N) /
peak(smallest N) should stay near 1; `sender_rss_by_progress_mb` shows the RSS at each
quarter of the largest run, where growth with the number mailed would show as a slope.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.scaleout import (
    delete_topics,
    fresh_settings,
    process_env,
    produce_records,
    recipient_records,
    spawn,
    stop_processes,
    wait_group,
    wait_listening,
)
from services.common.settings import Settings
from services.common.topics import ensure_topics

DEFAULT_SIZES = (20_000, 200_000)
SMALL_SIZES = (2_000, 20_000)
# The service default (services/sender/__main__.py): memory as deployed.
CONCURRENCY = 8
# How often RSS and progress are sampled: fine enough for the progress curve; the peak comes
# from VmHWM, not from the samples.
SAMPLE_SECONDS = 0.25
# Recipients built and produced at a time: the bench process itself stays small.
PRODUCE_SLICE = 10_000
# Guards against a run that never finishes (a sender that died or stalls): generous, a
# healthy sender mails 200,000 in a few minutes here.
BASE_TIMEOUT_SECONDS = 120.0
SECONDS_PER_RECIPIENT_ALLOWED = 0.02
_KIB_PER_MIB = 1024


class SenderMemoryFailed(RuntimeError):
    """A run did not deliver every recipient exactly once, or did not finish."""


@dataclass
class MemoryRun:
    """One sender mailing `recipients`: its peak and the sampled RSS curve."""

    recipients: int
    peak_rss_mb: float
    seconds: float
    # (recipients accepted so far, VmRSS MiB), one per sample.
    samples: list[tuple[int, float]] = field(default_factory=list)

    def rss_at(self, fraction: float) -> float | None:
        """VmRSS of the first sample at or past `fraction` of the recipients accepted."""
        wanted = fraction * self.recipients
        for accepted, rss in self.samples:
            if accepted >= wanted:
                return rss
        return None


def sizes_wanted(env: dict[str, str]) -> tuple[int, ...]:
    if env.get("BENCH_SENDER_MEMORY_SIZES"):
        sizes = tuple(int(part) for part in env["BENCH_SENDER_MEMORY_SIZES"].split(",") if part)
        if not sizes or min(sizes) < 1:
            raise ValueError("BENCH_SENDER_MEMORY_SIZES: positive recipient counts, e.g. 20000,200000")
        return sizes
    if env.get("BENCH_SCALE", "").lower() == "small":
        return SMALL_SIZES
    return DEFAULT_SIZES


def measure_sender_memory(settings: Settings, sizes: tuple[int, ...] = DEFAULT_SIZES, *,
                          say: Callable[[str], object] = print) -> dict[str, Any]:
    """`sender_peak_rss_mb_<N>` for every N, the growth ratio and the largest run's curve."""
    runs = []
    for count in sizes:
        say(f"sender memory: one sender mailing {count:,} recipients …")
        run = one_run(settings, count)
        say(f"  peak RSS {run.peak_rss_mb:.1f} MiB in {run.seconds:.1f} s")
        runs.append(run)
    figures: dict[str, Any] = {f"sender_peak_rss_mb_{r.recipients}": r.peak_rss_mb for r in runs}
    smallest, largest = min(runs, key=lambda r: r.recipients), max(runs, key=lambda r: r.recipients)
    figures["sender_rss_growth"] = round(largest.peak_rss_mb / smallest.peak_rss_mb, 3)
    figures["sender_rss_by_progress_mb"] = {
        f"{int(q * 100)}%": largest.rss_at(q) for q in (0.25, 0.5, 0.75, 1.0)}
    figures["sender_memory_concurrency"] = CONCURRENCY
    return figures


def one_run(base: Settings, count: int) -> MemoryRun:
    settings = fresh_settings(base, "benchmem")
    ensure_topics(settings)
    folder = Path(tempfile.mkdtemp(prefix="sender-memory-"))
    records = folder / "sink.jsonl"
    env = process_env(settings, records, concurrency=CONCURRENCY, latency_ms=0.0)
    started: list[subprocess.Popen[bytes]] = []
    producer_errors: list[BaseException] = []
    counter = LineCounter(records)
    try:
        started.append(spawn("services.smtp_sink", env))
        wait_listening(settings.smtp_port)
        sender = spawn("services.sender", env)
        started.append(sender)
        wait_group(settings, 1)
        begin = time.monotonic()
        feeder = threading.Thread(target=_produce_all, args=(settings, count, producer_errors),
                                  name="sender-memory-producer", daemon=True)
        feeder.start()
        samples: list[tuple[int, float]] = []
        deadline = begin + BASE_TIMEOUT_SECONDS + SECONDS_PER_RECIPIENT_ALLOWED * count
        while (accepted := counter.count()) < count:
            if producer_errors:
                raise SenderMemoryFailed(f"producing recipients failed: {producer_errors[0]}")
            if time.monotonic() > deadline or any(p.poll() is not None for p in started):
                raise SenderMemoryFailed(f"{accepted:,} of {count:,} accepted when the run ended")
            rss = _status_mb(sender.pid, "VmRSS")
            if rss is not None:
                samples.append((accepted, rss))
            time.sleep(SAMPLE_SECONDS)
        seconds = time.monotonic() - begin
        final = _status_mb(sender.pid, "VmRSS")
        if final is not None:
            samples.append((count, final))
        peak = _status_mb(sender.pid, "VmHWM")
        feeder.join(60)
    finally:
        stop_processes(started)
        delete_topics(settings)
    check_exactly_once(records, count)
    shutil.rmtree(folder, ignore_errors=True)  # hundreds of MiB at 200,000; kept on failure
    if peak is None:
        raise SenderMemoryFailed("the sender's VmHWM could not be read from /proc")
    return MemoryRun(count, peak, seconds, samples)


class LineCounter:
    """Complete records in a growing JSONL file, counted incrementally (a 200,000-record file
    is not re-read at every poll)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self._lines = 0

    def count(self) -> int:
        try:
            with self._path.open("rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return 0
        complete = data.rfind(b"\n") + 1  # a line being written is counted once it ends
        self._lines += data.count(b"\n", 0, complete)
        self._offset += complete
        return self._lines


def _produce_all(settings: Settings, count: int, errors: list[BaseException]) -> None:
    campaign = f"memory-{os.urandom(4).hex()}"
    try:
        for start in range(0, count, PRODUCE_SLICE):
            size = min(PRODUCE_SLICE, count - start)
            produce_records(settings, recipient_records(size, start=start, campaign=campaign))
    except BaseException as exc:  # surfaced by the sampling loop, not lost in the thread
        errors.append(exc)


def check_exactly_once(records: Path, count: int) -> None:
    """Every recipient accepted exactly once: N records to N distinct addresses."""
    recipients: set[str] = set()
    accepted = 0
    with records.open("rb") as handle:
        for line in handle:
            if line.strip():
                accepted += 1
                recipients.update(json.loads(line)["rcpt_tos"])
    if accepted != count or len(recipients) != count:
        raise SenderMemoryFailed(f"{accepted:,} mails to {len(recipients):,} recipients,"
                                 f" {count:,} expected exactly once")


def _status_mb(pid: int, field_name: str) -> float | None:
    """A size field of /proc/<pid>/status (VmRSS, VmHWM) in MiB, None if unreadable."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith(f"{field_name}:"):
            return round(int(line.split()[1]) / _KIB_PER_MIB, 1)
    return None


if __name__ == "__main__":
    print(json.dumps(measure_sender_memory(Settings(), sizes_wanted(dict(os.environ))), indent=2))
