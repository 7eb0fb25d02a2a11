"""CPU per mail of one real sender process, old code against new, alternated in one session.

`python -m bench.sender_cpu [--count N] [--rounds R] [--warm W] [--tree NAME=PATH ...]
[--sink python|c] [--profile OPTIONS]`

Each run, on fresh topics (own prefix, deleted afterwards) of the platform Settings() point at:
N RecipientQueued records of the bench campaign's shape (bench/campaign.py: personalised
subject, text and HTML bodies, a city attribute, hashed contact ids; List-Unsubscribe on, as on
the platform) are produced first (a backlog, as behind a fast hydrator); then a sink process
(`python -m services.smtp_sink`, recording to a file) and one `python -m services.sender`
process started from the tree under test (its own checkout, e.g. `git archive HEAD` into
/tmp/s-head with the venv symlinked). CPU (user + system, all threads, from /proc) is read when
the sink has accepted W mails (start-up, imports and the group join are over) and again when
it has accepted all N; the figure is the difference over the mails accepted in between. Per
thread group, in microseconds per mail: the main thread (consumer loop, decode, ledger,
publish), the other Python threads (SMTP threads, feeds), librdkafka's threads (`rdk:*`),
threads that ended meanwhile; `.sys` is the system-time part of a group, `switches/mail` the
context switches of all threads. The sink's CPU per mail is printed as a control (it does the
same work whatever the sender's code). Every recipient must be accepted exactly once, else the
run fails: a figure over lost mail would mean nothing. With `--sink c` Postfix's smtp-sink
(C; Debian's postfix, `make bench-tools`) takes the mail instead: the pipeline's real ceiling,
and a sink that never makes the sender wait, so its CPU per mail is not the Python sink's
pace; smtp-sink records nothing, so its counter must reach exactly N and stay there (no
copy), and its own CPU is the control. With --profile, py-spy samples the
sender over the measured part (its own overhead then inflates the figures).

Trees are alternated within each round (A B, then B A in the next round, ...), so a drift in
the machine's load weighs on both alike. Not part of `make bench`: a developer's tool for
before/after figures of a change to the sender.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from bench.c_sink import COUNTER_SETTLE_SECONDS, PostfixSink
from bench.campaign import BenchIds, contacts, template
from bench.proc_cpu import stat_cpu_seconds, stat_fields, ticks_to_seconds
from bench.scaleout import (
    REPO_ROOT,
    delete_topics,
    fresh_settings,
    process_env,
    produce_records,
    spawn,
    stop_processes,
    wait_listening,
)
from bench.sender_memory import LineCounter, check_exactly_once
from schemas.envelope import encode, wrap
from schemas.events import RecipientQueued
from services.common.settings import Settings
from services.common.topics import ensure_topics

# The service default (services/sender/__main__.py).
CONCURRENCY = 8
# How often the sink's record count is read: the CPU snapshot lags the threshold by at most
# this, a few mails at full speed (counted exactly: the figure divides by the mails between).
POLL_SECONDS = 0.02
# Guards against a run that never finishes (a sender that died or stalls).
RUN_TIMEOUT_SECONDS = 300.0


@dataclass(frozen=True)
class Sample:
    """CPU seconds of a process so far, split by thread group, and mails accepted then."""

    accepted: int
    threads: dict[str, float]

    @property
    def total(self) -> float:
        return sum(v for k, v in self.threads.items() if "." not in k)


def thread_cpu(pid: int) -> dict[str, float]:
    """User + system CPU seconds of each thread group of process `pid` (live threads only;
    threads that ended are in no group, hence the `total` from the process's own stat)."""
    groups: dict[str, float] = defaultdict(float)
    system: dict[str, float] = defaultdict(float)  # the system time alone, by group
    switches: dict[str, float] = defaultdict(float)  # context switches (not seconds), by group
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat_fields(stat)
        seconds = stat_cpu_seconds(stat)
        if task.name == str(pid):
            group = "main"
        elif name.startswith("rdk:"):
            group = "librdkafka"
        else:
            group = "python-threads"
        groups[group] += seconds
        system[group] += ticks_to_seconds(int(fields[12]))
        try:
            status = (task / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if "ctxt_switches:" in line:  # voluntary and nonvoluntary
                switches[group] += int(line.split()[1])
    # The process's own figure includes threads that have ended already.
    total = stat_cpu_seconds(Path(f"/proc/{pid}/stat").read_text())
    groups["ended-threads"] = max(0.0, total - sum(groups.values()))
    return {**groups, **{f"{group}.sys": seconds for group, seconds in system.items()},
            **{f"{group}.switches": count for group, count in switches.items()}}


def backlog(count: int) -> list[tuple[bytes, bytes]]:
    """(key, value) of `count` RecipientQueued of one bench-shaped campaign."""
    ids = BenchIds.fresh()
    content = template()
    out = []
    for person in contacts(ids, count):
        recipient = RecipientQueued(
            campaign_id=ids.campaign_id, contact_id=person.contact_id, email=person.email,
            first_name=person.first_name, last_name=person.last_name,
            attributes=person.attributes, template=content)
        envelope = wrap(recipient, tenant_id=ids.tenant_id, aggregate_id=ids.campaign_id)
        out.append((f"{ids.tenant_id}:{person.contact_id}".encode(), encode(envelope)))
    return out


def one_run(base: Settings, tree: Path, count: int, warm: int,
            profile: list[str] | None = None, c_sink: bool = False) -> tuple[Sample, Sample, float]:
    """(sample at `warm` accepted, sample at `count`, sink CPU per mail in between). With
    `profile` (py-spy record options and `-o FILE`), py-spy samples the sender in between;
    with `c_sink`, Postfix's smtp-sink takes the mail."""
    settings = fresh_settings(base, "sendercpu")
    ensure_topics(settings)
    folder = Path(tempfile.mkdtemp(prefix="sender-cpu-"))
    records = folder / "sink.jsonl"
    env = {**process_env(settings, records, concurrency=CONCURRENCY, latency_ms=0.0),
           # As on the platform (services/platform/stack.py): every mail carries
           # List-Unsubscribe headers.
           "UNSUBSCRIBE_SECRET": "bench-sender-cpu", "PYTHONPATH": str(tree)}
    produce_records(settings, backlog(count))
    started: list[subprocess.Popen[bytes]] = []
    lines = LineCounter(records)
    postfix: PostfixSink | None = None
    try:
        if c_sink:
            postfix = PostfixSink(settings.smtp_host, settings.smtp_port)
            sink = postfix.process
        else:
            sink = spawn("services.smtp_sink", env)
            wait_listening(settings.smtp_port)
        started.append(sink)
        sender = subprocess.Popen([str(tree / ".venv/bin/python"), "-m", "services.sender"],
                                  env=env, cwd=tree, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        started.append(sender)
        deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
        first: Sample | None = None
        sink_first = 0.0
        def accepted_so_far() -> int:
            return postfix.messages if postfix is not None else lines.count()

        while (accepted := accepted_so_far()) < count:
            if first is None and accepted >= warm:
                first = Sample(accepted, thread_cpu(sender.pid))
                sink_first = Sample(0, thread_cpu(sink.pid)).total
                if profile is not None:
                    spy = tree / ".venv/bin/py-spy"
                    started.append(subprocess.Popen(
                        [str(spy), "record", "--pid", str(sender.pid), *profile],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            if time.monotonic() > deadline or any(p.poll() is not None for p in started):
                raise RuntimeError(f"{accepted:,} of {count:,} accepted when the run ended")
            time.sleep(POLL_SECONDS)
        last = Sample(accepted, thread_cpu(sender.pid))
        sink_last = Sample(0, thread_cpu(sink.pid)).total
        if profile is not None and len(started) > 2:
            started[2].send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            started[2].wait(30)
        if postfix is not None:
            # A copy would show as a count past N once the sender's last mails are in.
            time.sleep(COUNTER_SETTLE_SECONDS)
            if postfix.messages != count:
                raise RuntimeError(f"smtp-sink took {postfix.messages:,} of {count:,} mails")
    finally:
        if postfix is not None:
            started.remove(postfix.process)
            stop_processes(started)
            postfix.stop()
        else:
            stop_processes(started)
        delete_topics(settings)
    if postfix is None:
        check_exactly_once(records, count)
    shutil.rmtree(folder, ignore_errors=True)
    if first is None:
        raise RuntimeError("the run finished before the first sample")
    return first, last, (sink_last - sink_first) / (last.accepted - first.accepted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=15_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warm", type=int, default=1_000)
    parser.add_argument("--tree", action="append", default=[],
                        help="NAME=PATH of a checkout with .venv (default: this one)")
    parser.add_argument("--sink", choices=("python", "c"), default="python",
                        help="the sink taking the mail: ours, or Postfix's smtp-sink (C)")
    parser.add_argument("--profile", help="py-spy record options for the measured part, e.g. "
                        "'--gil -f raw -o /tmp/gil.txt' (each run overwrites the file)")
    args = parser.parse_args()
    trees = [tuple(t.split("=", 1)) for t in args.tree] or [("this", str(REPO_ROOT))]
    results: dict[str, list[float]] = defaultdict(list)
    for round_number in range(args.rounds):
        order = trees if round_number % 2 == 0 else list(reversed(trees))
        for name, path in order:
            profile = shlex.split(args.profile) if args.profile else None
            first, last, sink = one_run(Settings(), Path(path), args.count, args.warm, profile,
                                         c_sink=args.sink == "c")
            mails = last.accepted - first.accepted
            per_mail = (last.total - first.total) / mails * 1e6
            results[name].append(per_mail)
            switches = sum(last.threads.get(f"{g}.switches", 0.0)
                           - first.threads.get(f"{g}.switches", 0.0)
                           for g in ("main", "python-threads", "librdkafka")) / mails
            parts = f"switches/mail {switches:.1f}  " + "  ".join(
                f"{group} {(last.threads.get(group, 0.0) - first.threads.get(group, 0.0)) / mails * 1e6:4.0f}"
                for group in ("main", "main.sys", "python-threads", "python-threads.sys", "librdkafka",
                      "librdkafka.sys", "ended-threads"))
            print(f"round {round_number + 1} {name:>8}: sender {per_mail:4.0f} us/mail ({parts})"
                  f"  sink {sink * 1e6:4.0f} us/mail  over {mails:,} mails", flush=True)
    for name, figures in results.items():
        print(f"{name:>8}: " + ", ".join(f"{f:.0f}" for f in figures) + " us/mail")


if __name__ == "__main__":
    main()
