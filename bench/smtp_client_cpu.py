"""CPU per mail of the sender's SMTP client and of the SMTP sink, with and without PIPELINING.

`python -m bench.smtp_client_cpu [--count N] [--connections C] [--rounds R] [--raw]`

No Kafka, no ledger: mails of the bench campaign's shape (built beforehand by the sender's
MIME builder, as bench/raw_smtp.py does) go from C threads, each holding one of the sender's
`SmtpConnection`s, to a sink process (`python -m services.smtp_sink`, recording to a file as
on the platform). Each round starts a fresh sink with SINK_PIPELINING=1, then one with
SINK_PIPELINING=0, alternating, so both modes see the same machine load over the run. CPU is
user + system time: the sink's from /proc/<pid>/stat, this process's from getrusage (the
client threads; the main thread only waits meanwhile), both read just before the first mail
and just after the last reply. With --raw, plain smtplib clients (bench/raw_smtp.py, which
never pipelines) are measured against both sinks too: advertising PIPELINING must not slow
them down.

Every mail must come back SENT and the sink's file must hold exactly N records, else the run
stops with an error: a figure over lost mail would mean nothing.
"""

from __future__ import annotations

import argparse
import functools
import os
import queue
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench import campaign, raw_smtp
from bench.proc_cpu import stat_cpu_seconds
from services.sender.mime import OutgoingMail
from services.sender.replies import Verdict
from services.sender.smtp_pool import SMTP_TIMEOUT_SECONDS, SmtpConnection
from services.smtp_sink.records import count_records

REPO_ROOT = Path(__file__).resolve().parents[1]
# How long a fresh sink process may take to listen: guards against a sink that died at
# start-up (bad config, port taken) hanging the bench.
SINK_START_TIMEOUT_S = 20.0
# How long the sink may take to exit after SIGTERM before it is killed: guards against a
# wedged sink hanging the bench.
SINK_STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Figures:
    """One measured run: CPU of each side per mail, and the rate."""

    client: str  # "sender" (SmtpConnection) or "smtplib" (bench/raw_smtp.py)
    pipelining: bool  # the sink advertised PIPELINING
    mails: int
    seconds: float
    client_cpu_s: float
    sink_cpu_s: float

    @property
    def rate(self) -> float:
        return self.mails / self.seconds

    def line(self) -> str:
        return (f"{self.client:8} pipelining={'on ' if self.pipelining else 'off'} "
                f"{self.rate:8.0f} mails/s  client {self.client_cpu_s / self.mails * 1e6:6.0f} us/mail"
                f"  sink {self.sink_cpu_s / self.mails * 1e6:6.0f} us/mail")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (/proc/<pid>/stat)."""
    return stat_cpu_seconds(Path(f"/proc/{pid}/stat").read_text())


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def sink_process(pipelining: bool, records: Path) -> Iterator[tuple[int, int]]:
    """A sink process on a free port: yields (pid, port); stopped (SIGTERM) afterwards."""
    port = free_port()
    env = {**os.environ, "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(port),
           "SINK_RECORD_PATH": str(records), "SINK_PIPELINING": "1" if pipelining else "0",
           "LOG_LEVEL": "WARNING"}
    process = subprocess.Popen([sys.executable, "-m", "services.smtp_sink"], cwd=REPO_ROOT,
                               env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + SINK_START_TIMEOUT_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the sink did not start on port {port}") from None
                time.sleep(0.05)
        yield process.pid, port
    finally:
        process.terminate()
        try:
            process.wait(SINK_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def send_with_sender(mails: list[OutgoingMail], port: int, connections: int) -> list[str]:
    """Every mail through `connections` of the sender's SmtpConnections, one thread each;
    returns the problems (empty when every mail was SENT)."""
    work: queue.SimpleQueue[OutgoingMail] = queue.SimpleQueue()
    for mail in mails:
        work.put(mail)
    problems: list[str] = []
    # Sessions set up before the clock starts: what is measured is the mail, not the EHLO.
    pool = [SmtpConnection("127.0.0.1", port, "bench.localhost", SMTP_TIMEOUT_SECONDS)
            for _ in range(connections)]
    for connection in pool:
        connection._session()

    def client(connection: SmtpConnection) -> None:
        while True:
            try:
                mail = work.get_nowait()
            except queue.Empty:
                return
            attempt = connection.transmit(mail)
            if attempt.verdict is not Verdict.SENT:
                problems.append(f"{mail.message_id}: {attempt.reply}")

    run_threads([functools.partial(client, connection) for connection in pool])
    for connection in pool:
        connection.close()
    return problems


def send_with_smtplib(mails: list[OutgoingMail], port: int, connections: int) -> list[str]:
    result = raw_smtp.send_all(mails, "127.0.0.1", port, connections)
    return [*result.errors, *([f"{result.refused} refused"] if result.refused else [])]


def run_threads(targets: list[Callable[[], None]]) -> None:
    threads = [threading.Thread(target=target) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def measure(client: str, pipelining: bool, mails: list[OutgoingMail], connections: int,
            workdir: Path) -> Figures:
    records = workdir / f"{client}-{'on' if pipelining else 'off'}-{time.monotonic_ns()}.jsonl"
    send = send_with_sender if client == "sender" else send_with_smtplib
    with sink_process(pipelining, records) as (pid, port):
        sink_before, own_before, started = process_cpu_seconds(pid), own_cpu_seconds(), time.perf_counter()
        problems = send(mails, port, connections)
        seconds = time.perf_counter() - started
        own_cpu, sink_cpu = own_cpu_seconds() - own_before, process_cpu_seconds(pid) - sink_before
    recorded = count_records(records)
    records.unlink(missing_ok=True)
    if problems or recorded != len(mails):
        raise SystemExit(f"{client} pipelining={pipelining}: {recorded} of {len(mails)} recorded;"
                         f" problems: {problems[:5]}")
    return Figures(client, pipelining, len(mails), seconds, own_cpu, sink_cpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000, help="mails per run")
    parser.add_argument("--connections", type=int, default=8, help="client connections/threads")
    parser.add_argument("--rounds", type=int, default=3, help="runs per mode")
    parser.add_argument("--raw", action="store_true", help="also measure plain smtplib clients")
    args = parser.parse_args(argv)
    if args.count < 1 or args.connections < 1 or args.rounds < 1:
        parser.error("--count, --connections and --rounds must be at least 1")
    ids = campaign.BenchIds.fresh()
    mails = raw_smtp.build_messages(campaign.contacts(ids, args.count), campaign.template(),
                                    ids.raw_campaign_id)
    clients = ["sender", "smtplib"] if args.raw else ["sender"]
    results: list[Figures] = []
    with tempfile.TemporaryDirectory(prefix="smtp-client-cpu-") as tmp:
        for _ in range(args.rounds):
            for client in clients:
                for pipelining in (True, False):
                    figures = measure(client, pipelining, mails, args.connections, Path(tmp))
                    print(figures.line(), flush=True)
                    results.append(figures)
    print("\nmedians over", args.rounds, "rounds:")
    for client in clients:
        for pipelining in (True, False):
            runs = [f for f in results if f.client == client and f.pipelining == pipelining]
            print(" ", Figures(client, pipelining, runs[0].mails, _median([f.seconds for f in runs]),
                               _median([f.client_cpu_s for f in runs]),
                               _median([f.sink_cpu_s for f in runs])).line())
    return 0


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


if __name__ == "__main__":
    sys.exit(main())
