"""The box's SMTP ceiling and the pipeline against it: Postfix's smtp-sink, a C SMTP server.

Our Python sink's capacity hides the pipeline's own ceiling (issue 18), so this step measures
against Postfix's `smtp-sink` (Debian package postfix; `make bench` installs it):
- raw_smtp_rate_c: `smtp-source` (C) sends N messages of the campaign's size over the sender's
  number of sessions, reused (-d), into a fresh smtp-sink: accepted / seconds, by the sink's
  own counter.
- send_rate_c: the same N-recipient campaign through the running pipeline while smtp-sink
  stands in for the platform's SMTP sink on its port (the Python sink is stopped for the run
  and started again after it); the sink's counter must show exactly N messages.
- cpu_us_per_mail_c (and _by_process): CPU of every pipeline process, the broker and
  PostgreSQL during that campaign, not the sink's, per mail.
- send_to_raw_ratio_c = send_rate_c / raw_smtp_rate_c.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

from rich.console import Console

from bench import campaign, raw_smtp
from bench.proc_cpu import CpuMeter, per_mail_us
from bench.raw_smtp import RawContact
from bench.stats import rate
from services.common.settings import Settings
from services.platform.stack import Stack

SINK_PROGRAM = "smtp_sink"  # the platform's Python sink under supervision
# smtp-sink's listen backlog: as many sessions as any client here opens at once, and more.
BACKLOG = 256
# Bounds the raw run: 20,000 messages take a few seconds; this only guards against a hang.
RAW_TIMEOUT_SECONDS = 120.0
# How long the sink is given to count the last message after the client is done.
COUNTER_SETTLE_SECONDS = 2.0
_COUNTER = re.compile(rb"mesg=(\d+)")


class CSinkMissing(RuntimeError):
    """smtp-sink or smtp-source is not installed (`make bench-tools` installs them)."""


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}")
                                  else None)
    if path is None:
        raise CSinkMissing(f"{name} not found: install Debian's postfix (make bench-tools)")
    return path


class PostfixSink:
    """A running smtp-sink on host:port that counts the messages it took (its -c counter)."""

    def __init__(self, host: str, port: int) -> None:
        argv = [tool("smtp-sink"), "-c"]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]  # smtp-sink refuses to run as root
        self.process = subprocess.Popen(  # noqa: S603 - a fixed local tool
            [*argv, f"{host}:{port}", str(BACKLOG)], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._last = 0
        self._output: list[bytes] = []
        self._reader = threading.Thread(target=self._read, args=(self.process.stdout,),
                                        name="smtp-sink-counter", daemon=True)
        self._reader.start()
        _wait_listening(host, port, self.process)

    def _read(self, stream: IO[bytes] | None) -> None:
        # The counter is rewritten in place ("\r"), so the last match is the count.
        descriptor = stream.fileno() if stream else -1
        for chunk in iter(lambda: os.read(descriptor, 4096) if descriptor >= 0 else b"", b""):
            self._output.append(chunk)
            found = _COUNTER.findall(chunk)
            if found:
                self._last = int(found[-1])

    @property
    def messages(self) -> int:
        return self._last

    def settled(self, expected: int) -> int:
        """The count once it reaches `expected` or stops for COUNTER_SETTLE_SECONDS."""
        deadline = time.monotonic() + COUNTER_SETTLE_SECONDS
        while self._last < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        return self._last

    def stop(self) -> str:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._reader.join(5)
        return b"".join(self._output)[-300:].decode(errors="replace")


def _wait_listening(host: str, port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"smtp-sink exited with {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"smtp-sink did not listen on {host}:{port} within 10 s")


@contextmanager
def postfix_sink(host: str, port: int) -> Iterator[PostfixSink]:
    sink = PostfixSink(host, port)
    try:
        yield sink
    finally:
        sink.stop()


@contextmanager
def platform_sink_stopped(stack: Stack) -> Iterator[None]:
    """The platform's Python sink stopped (its port free for another sink) for the block,
    started again after it, whatever happened."""
    rpc = stack.supervision().rpc()
    rpc.supervisor.stopProcess(SINK_PROGRAM, True)
    try:
        yield
    finally:
        rpc.supervisor.startProcess(SINK_PROGRAM, True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class RawC:
    accepted: int
    seconds: float

    @property
    def rate(self) -> float:
        return rate(self.accepted, self.seconds) or 0.0


def raw_rate(count: int, sessions: int, message_bytes: int) -> RawC:
    """smtp-source into a fresh smtp-sink: `count` messages of `message_bytes` over `sessions`
    reused sessions."""
    port = free_port()
    with postfix_sink("127.0.0.1", port) as sink:
        started = time.perf_counter()
        subprocess.run(  # noqa: S603 - a fixed local tool
            [tool("smtp-source"), "-d", "-s", str(sessions), "-m", str(count),
             "-l", str(message_bytes), "-f", "bench@example.org", "-t", "sink@example.org",
             f"127.0.0.1:{port}"], check=True, timeout=RAW_TIMEOUT_SECONDS,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seconds = time.perf_counter() - started
        return RawC(sink.settled(count), seconds)


def message_size(people: list[RawContact], ids: campaign.BenchIds) -> int:
    """Bytes of one campaign message as the sender builds it (the first contact's)."""
    return len(raw_smtp.build_messages(people[:1], campaign.template(), ids.raw_campaign_id)[0]
               .content)


def campaign_rate(stack: Stack, settings: Settings, pids: dict[str, int], postmaster: int | None,
                  count: int, console: Console, timeout: float) -> dict[str, Any]:
    """One fresh `count`-recipient campaign mailed into smtp-sink on the platform's SMTP port;
    the Python sink is stopped for it and started again after."""
    ids = campaign.BenchIds.fresh()
    people = campaign.contacts(ids, count)
    imported = campaign.import_people(people, ids, settings)
    if imported.imported != count:
        raise campaign.CampaignFailed(f"import: {imported.imported} of {count} rows")
    with platform_sink_stopped(stack), postfix_sink(settings.smtp_host,
                                                    settings.smtp_port) as sink:
        meter = CpuMeter({n: p for n, p in pids.items() if n != SINK_PROGRAM}, postmaster)
        run = campaign.run_campaign(ids, settings, recipients=count, timeout=timeout,
                                    console=console)
        used = meter.used()
        received = sink.settled(count)
    per_mail, by_process = per_mail_us(used, count)
    return {"send_rate_c": round(rate(count, run.e2e_seconds) or 0.0, 1),
            "e2e_seconds_c": round(run.e2e_seconds, 3),
            "cpu_us_per_mail_c": per_mail, "cpu_us_per_mail_c_by_process": by_process,
            "campaign_cpu_seconds_c": used,
            "checks_c": {"sink_messages": received, "read_model_sent": run.final.sent,
                         "read_model_total": run.final.total},
            "message_bytes": message_size(people, ids)}


def measure(stack: Stack, settings: Settings, pids: dict[str, int], postmaster: int | None,
            count: int, sessions: int, console: Console, timeout: float,
            ) -> tuple[dict[str, Any], list[str]]:
    """The step's figures and its failed checks, in words."""
    figures = campaign_rate(stack, settings, pids, postmaster, count, console, timeout)
    raw = raw_rate(count, sessions, figures["message_bytes"])
    figures.update({"raw_smtp_rate_c": round(raw.rate, 1), "raw_smtp_seconds_c": round(raw.seconds, 3),
                    "send_to_raw_ratio_c": round(figures["send_rate_c"] / raw.rate, 3)
                    if raw.rate else None})
    checks = figures["checks_c"]
    checks["raw_accepted"] = raw.accepted
    failures = []
    if checks["sink_messages"] != count or checks["read_model_sent"] != count:
        failures.append(f"C sink campaign: smtp-sink counted {checks['sink_messages']:,}, the read"
                        f" model {checks['read_model_sent']:,} sent; expected {count:,}")
    if raw.accepted != count:
        failures.append(f"C raw run: smtp-sink counted {raw.accepted:,} of {count:,}")
    return figures, failures
