"""`make bench` (`python -m bench.run`): one campaign through the running pipeline, measured,
then the SMTP sink's raw capacity for comparison.

Size: BENCH_RECIPIENTS=N recipients (default 20,000); BENCH_SCALE=small means 2,000.
The platform is started if it is not running (`Stack.up()` is idempotent), on the `make up`
ports; the run uses a fresh tenant, list and campaign id, so it never touches other data.

Figures (bench/results/latest.json and bench/results/<UTC start>.json):
- recipients: N distinct contacts, one list, one campaign.
- csv_import_rows_per_s: rows / seconds of `import_contacts` on an N-row CSV, by the
  importer's own clock: from opening the file until every row is acknowledged by the broker.
- e2e_seconds: monotonic clock, from just before SendCampaign is published to the first
  read-model poll (every 0.1 s) that shows the campaign 'completed'. Late by at most one poll.
- send_rate: N / e2e_seconds (mails per second through the whole pipeline: command handler,
  hydrator, sender with its ledger and SMTP, projector).
- e2e_event_seconds: the same start to the read model's completed_at, which is an event time
  (the last delivery's occurred_at): end to end without the final projection step.
- first_delivery_seconds: the wall clock just before SendCampaign was published to the
  occurred_at of the campaign's first delivery event: the start-up share of end to end.
- hydration_seconds: CampaignSendRequested.occurred_at (command handler) to
  CampaignHydrated.occurred_at (hydrator), both read back from campaign.events by a
  throwaway consumer keyed on the campaign id.
- projection_lag_p50_ms / _p99_ms (+ _max_ms): per recipient, campaign_recipients.updated_at
  minus the occurred_at of its first delivery event on campaign.deliveries. updated_at is the
  projector's now(), i.e. the start of the transaction that applied the row: a lower bound of
  when the row became visible (the transaction's own duration is not in it).
- projection_visible_lag_p50_ms / _p99_ms: the matching upper bound: the first bench poll
  whose sent + failed counter included the row's transaction, minus occurred_at (see
  bench.figures.projection_lag). The truth lies between the two.
- campaign_cpu_seconds: per service (and the broker, and PostgreSQL: the postmaster with all
  its backends), user + system CPU seconds from just
  before SendCampaign to completion (/proc/<pid>/stat): where the machine's cores went.
- peak_rss_mb: per service (command_handler, hydrator, sender, projector, completion, api,
  smtp_sink, and the
  Kafka broker), VmHWM from /proc/<pid>/status. The peak is reset right before the CSV import
  and read right after completion, so it is this campaign's peak (`peak_rss_scope` says
  "since process start" if the kernel refused the reset).
- raw_smtp_rate: N messages of the same shape (built by the sender's MIME builder, distinct
  X-Campaign-ID) sent by plain smtplib clients straight to the same sink, over as many reused
  connections as the sender uses (its SENDER_CONCURRENCY), no Kafka: accepted / seconds.
- send_to_raw_ratio: send_rate / raw_smtp_rate: the share of the sink's capacity the pipeline
  achieves.
- cpu_us_per_mail (+ _by_process): campaign_cpu_seconds of every process but the sink, per
  mail, in microseconds.
- raw_smtp_rate_c, send_rate_c, send_to_raw_ratio_c, cpu_us_per_mail_c (issue 18): a separate
  step, see bench/c_sink.py: the same size of campaign and raw run against Postfix's C
  smtp-sink, the box's SMTP ceiling.
- projection_rate, raw_copy_rate (a logged COPY into a table like campaign_recipients; the
  unlogged one is raw_copy_rate_unlogged), projection_to_copy_ratio (issue 5): a separate step, see
  bench/projection.py: the real Projector's cold drain of BENCH_PROJECTION_EVENTS delivery
  events (default 200,000; BENCH_SCALE=small: 20,000) on fresh topics, in events/s, against a
  psycopg COPY of the same rows, in rows/s; details under "projection".
- scaleout_rate_1/_2/_4 (issue 4): a separate step, see bench/scaleout.py: recipients/s of 1,
  2 and 4 sender processes against their own sink adding 20 ms per message, each sender with
  `scaleout_concurrency` SMTP connections (2: why, in that module) and the same recipients
  per sender; `scaleout_efficiency_N` = rate_N / (N x rate_1), target >= 0.85.
- sender_peak_rss_mb_<N> (issue 4): a separate step, see bench/sender_memory.py: VmHWM of one
  real sender process mailing N recipients on fresh topics, N = 20,000 and 200,000
  (BENCH_SCALE=small: 2,000 and 20,000); `sender_rss_growth` = largest / smallest peak.

Warm-up: before the measured campaign, a small one (BENCH_WARMUP recipients, default 6,000;
BENCH_SCALE=small: 200; 0 turns it off) of its own fresh tenant runs to completion, unmeasured
but reported (`warmup_recipients`, `warmup_seconds`). Why: right after `make up` the broker's JIT
is still compiling (a cold broker spent ~13 s of CPU on the first 20,000-recipient campaign, a
warm one ~7 s) and the hydrator's first campaign includes its start-up catch-up (hydration
8.3 s instead of ~1.3 s); the figures are meant to describe the running system, not its first
minute. `warmup_seconds` shows the cold cost.

- metrics_on_send_rate, metrics_off_send_rate, metrics_on_off_ratio (issue 15): a separate
  step, see bench/metrics_cost.py: one sender with metrics on (scraped every second) and off
  (CAMPAIGN_METRICS=off), alternating, best run of each; target ratio >= 0.97.

- tracker_hits_per_s, bare_hits_per_s, tracker_to_bare_ratio, tracker_p50_ms, tracker_p99_ms,
  tracker_cpu_us_per_hit, ... (issue 16): a separate step, see bench/tracker.py: the real
  tracker process against a bare endpoint of the same web stack, loaded from a separate
  process; full speed (16 in flight) and at 2,000 hits/s, TRACKER_STEP_SECONDS a run (3 s
  with BENCH_SCALE=small, else 10 s), best of 3 alternating rounds; targets ratio >= 0.5 and
  p99 < 20 ms at 2,000 hits/s.
- engagement_projection_lag_p50_ms / _p99_ms / _max_ms (issue 16): a separate step, see
  bench/engagement_lag.py: 500 hits/s (300 with BENCH_SCALE=small) for 10 s (5 s) through
  the real tracker while the engagement projector runs on fresh topics; per hit, the first
  50 ms poll showing its row minus the hit's occurred_at (an upper bound); target p99 < 1 s.

- send_rate_latency_20ms (+ _sink, _target; issue 18): a separate step, see
  bench/latency_sink.py: a campaign (BENCH_LATENCY_RECIPIENTS, default 8,000; small: 1,000)
  through the running pipeline into our sink answering each message 20 ms late, over the
  sender's connections; target >= 0.85 x connections / 20 ms (340/s with 8).
- hydrator_peak_rss_mb_5m (+ hydrator_ingest_peak_rss_mb_5m, the rest under "audience_5m";
  issue 18): the audience step again at 5,000,000 contacts (BENCH_AUDIENCE_5M_CONTACTS to
  change it); left out under BENCH_SCALE=small. Target <= 300 MB.

BENCH_SKIP="c_sink,latency,projection,audience,audience_5m,scaleout,sender_memory,metrics,
tracker,engagement" (any
of them) leaves those separate steps out, for a quick loop on the campaign figures; the JSON lists them under
`skipped_steps` and their figures are absent.

Checks (exit status 1 when one fails; the JSON is written either way): the sink recorded
exactly N messages with the campaign's X-Campaign-ID, to N distinct recipients; the read model
counts N sent; the raw run's N messages were all accepted and recorded; the projection step's
read model counts exactly its backlog as sent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from confluent_kafka import KafkaException
from rich.console import Console

from bench import (
    c_sink,
    campaign,
    engagement_lag,
    figures,
    hydration,
    latency_sink,
    projection,
    raw_smtp,
)
from bench import tracker as tracker_bench
from bench.event_log import read_campaign_messages
from bench.metrics_cost import measure_metrics_cost
from bench.proc_cpu import CpuMeter, per_mail_us
from bench.process_memory import environment_of, peak_rss_mb, reset_peak_rss
from bench.report import machine_info, render_table, write_results
from bench.scaleout import measure_scaleout
from bench.sender_memory import measure_sender_memory, sizes_wanted
from bench.stats import rate
from services.common.settings import Settings
from services.common.topics import DELIVERIES, EVENTS, topic_name
from services.platform.stack import SERVICES, Stack

# The brief's sizes: a full run and a quick one (BENCH_SCALE=small).
DEFAULT_RECIPIENTS = 20_000
SMALL_RECIPIENTS = 2_000
# The sender's default pool size (services/sender/__main__.py), used when the running
# sender's environment does not say otherwise.
DEFAULT_SENDER_CONCURRENCY = 8
# Overall bound on the campaign: generous (a healthy pipeline needs a fraction), it only
# guards against a pipeline that crawls without stalling outright.
BASE_TIMEOUT_SECONDS = 300.0
SECONDS_PER_RECIPIENT_ALLOWED = 0.05
# Reading the campaign's facts back from Kafka after the run: guards against a broker that
# stops answering mid-read.
READ_BACK_TIMEOUT_SECONDS = 120.0
# Producer clocks and the bench's clock are the same machine's, but the broker looks records
# up by timestamp: start a little earlier so no record of this run is missed.
READ_BACK_MARGIN = timedelta(seconds=5)
# Log lines shown per service when the campaign fails: enough for the last errors.
LOG_TAIL_LINES = 8
# The warm-up campaign's size (see the module docstring): enough mails for the broker's JIT
# to compile the produce/fetch paths and for the hydrator to finish its start-up. 2,000 left
# the broker mid-way: quick runs (BENCH_SKIP=projection,audience,scaleout,sender_memory),
# alternated, four on a fresh platform and four on a restarted one: send/raw 0.784-0.884
# (mean 0.835) after 2,000, 0.856-0.906 (mean 0.881) after 6,000, which costs ~3 s more.
DEFAULT_WARMUP_RECIPIENTS = 6_000
SMALL_WARMUP_RECIPIENTS = 200
MEASURED_PROCESSES = ("command_handler", "hydrator", "sender", "projector", "completion", "api",
                      "smtp_sink")
# The separate steps after the campaign, in the order they run (BENCH_SKIP names them).
SEPARATE_STEPS = ("c_sink", "latency", "projection", "audience", "audience_5m", "scaleout",
                  "sender_memory", "metrics", "tracker", "engagement")
# The second audience size of issue 18 (peak RSS at 5M contacts).
AUDIENCE_5M_CONTACTS = 5_000_000
# The tracker step (issue 16): seconds per run, and the paced run's rate (the target).
TRACKER_STEP_SECONDS = 10.0
SMALL_TRACKER_STEP_SECONDS = 3.0
TRACKER_RATE = 2_000.0
# The engagement lag step: seconds of hits and their rate. 500/s, not more: at 1,000/s the
# 2-core machine runs out of CPU (the tracker alone tops out near 1,600/s) and the lag
# measured is the machine's queue, not the projector's.
ENGAGEMENT_STEP_SECONDS = 10.0
SMALL_ENGAGEMENT_STEP_SECONDS = 5.0
ENGAGEMENT_RATE = 500.0
SMALL_ENGAGEMENT_RATE = 300.0


def skipped_steps(env: dict[str, str]) -> tuple[str, ...]:
    """The separate steps BENCH_SKIP leaves out (and the 5M audience under BENCH_SCALE=small);
    an unknown name is an error, not a no-op."""
    names = tuple(part.strip() for part in env.get("BENCH_SKIP", "").split(",") if part.strip())
    unknown = [name for name in names if name not in SEPARATE_STEPS]
    if unknown:
        raise ValueError(f"BENCH_SKIP: unknown step(s) {unknown}; known: {list(SEPARATE_STEPS)}")
    if env.get("BENCH_SCALE", "").lower() == "small" and "audience_5m" not in names:
        names = (*names, "audience_5m")  # five million contacts is not a quick run
    return names


def recipients_wanted() -> int:
    if "BENCH_RECIPIENTS" in os.environ:
        return int(os.environ["BENCH_RECIPIENTS"])
    if os.environ.get("BENCH_SCALE", "").lower() == "small":
        return SMALL_RECIPIENTS
    return DEFAULT_RECIPIENTS


def warmup_wanted(env: dict[str, str]) -> int:
    """BENCH_WARMUP recipients (0: no warm-up); a bad value is an error, not a default."""
    if "BENCH_WARMUP" in env:
        value = int(env["BENCH_WARMUP"])
        if value < 0:
            raise ValueError(f"BENCH_WARMUP must be >= 0, got {value}")
        return value
    if env.get("BENCH_SCALE", "").lower() == "small":
        return SMALL_WARMUP_RECIPIENTS
    return DEFAULT_WARMUP_RECIPIENTS


def campaign_timeout(count: int) -> float:
    """How long a campaign of `count` recipients may take before the run gives up."""
    return BASE_TIMEOUT_SECONDS + SECONDS_PER_RECIPIENT_ALLOWED * count


def warm_up(settings: Settings, count: int, console: Console) -> float:
    """Run a `count`-recipient campaign of a fresh tenant to completion; its seconds from
    SendCampaign to completed. Raises campaign.CampaignFailed like the measured one."""
    ids = campaign.BenchIds.fresh()
    imported = campaign.import_people(campaign.contacts(ids, count), ids, settings)
    if imported.imported != count:
        raise campaign.CampaignFailed(f"warm-up import: {imported.imported} of {count} rows")
    run = campaign.run_campaign(ids, settings, recipients=count, timeout=campaign_timeout(count),
                                console=console)
    return run.e2e_seconds


def service_pids(stack: Stack) -> dict[str, int]:
    pids: dict[str, int] = {}
    for name in MEASURED_PROCESSES:
        pid = stack.pid(name)
        if pid is not None:
            pids[name] = pid
    pids.update(stack.kafka.pids())
    return pids


def sender_concurrency(pids: dict[str, int]) -> int:
    """The running sender's pool size: its own environment says what it was started with."""
    env = environment_of(pids["sender"]) if "sender" in pids else {}
    value = env.get("SENDER_CONCURRENCY") or os.environ.get("SENDER_CONCURRENCY")
    return int(value) if value else DEFAULT_SENDER_CONCURRENCY


def show_logs(stack: Stack, console: Console) -> None:
    """The last lines of each service's log: where a failed run's cause usually is."""
    for name in ("command_handler", "hydrator", "sender", "projector", "smtp_sink"):
        path = stack.log_file(name)
        try:
            with path.open(errors="replace") as fh:
                tail = list(deque(fh, maxlen=LOG_TAIL_LINES))
        except OSError:
            continue
        console.rule(f"{path}")
        for line in tail:
            console.print(line.rstrip(), markup=False, highlight=False)


def main() -> int:
    console = Console()
    started = datetime.now(UTC)
    count = recipients_wanted()
    # Knobs are checked before any work: a typo fails now, not after the campaign.
    skip = skipped_steps(dict(os.environ))
    small = os.environ.get("BENCH_SCALE", "").lower() == "small"
    latency_count = latency_sink.recipients_wanted(dict(os.environ))
    audience_5m_count = int(os.environ.get("BENCH_AUDIENCE_5M_CONTACTS", AUDIENCE_5M_CONTACTS))
    memory_sizes = sizes_wanted(dict(os.environ))
    warmup_count = warmup_wanted(dict(os.environ))
    stack = Stack(Settings().state_dir)
    console.rule(f"[bold]bench: {count:,} recipients")
    stack.up()
    if not all(stack.pid(name) for name in SERVICES):
        console.print("[red]a service did not start; see .state/logs/[/]")
        return 2
    settings = stack.settings()
    warmup_seconds: float | None = None
    if warmup_count:
        console.print(f"warm-up: a {warmup_count:,}-recipient campaign (not measured) …")
        try:
            warmup_seconds = warm_up(settings, warmup_count, console)
        except campaign.CampaignFailed as exc:
            console.print(f"[bold red]warm-up campaign failed:[/] {exc}")
            show_logs(stack, console)
            return 2
        console.print(f"warm-up completed in {warmup_seconds:.2f} s")
    ids = campaign.BenchIds.fresh()
    pids = service_pids(stack)
    connections = sender_concurrency(pids)
    people = campaign.contacts(ids, count)
    sink_offset = figures.sink_size(stack.sink_records)

    peak_reset = reset_peak_rss(pids)
    imported = campaign.import_people(people, ids, settings)
    console.print(f"imported {imported.imported:,} contacts into {ids.tenant_id}/{ids.list_id}"
                  f" in {imported.seconds:.2f} s ({imported.rows_per_second:,.0f} rows/s)")
    if imported.imported != count:
        console.print(f"[red]import: {imported.imported} of {count} rows imported;"
                      f" rejected: {imported.rejected[:3]}[/]")
        return 1

    read_since = datetime.now(UTC) - READ_BACK_MARGIN
    meter = CpuMeter(pids, postmaster_pid(stack))
    try:
        run = campaign.run_campaign(ids, settings, recipients=count,
                                    timeout=campaign_timeout(count), console=console)
    except campaign.CampaignFailed as exc:
        console.print(f"[bold red]campaign {ids.campaign_id} failed:[/] {exc}")
        show_logs(stack, console)
        return 2
    peaks = {name: peak_rss_mb(pid) for name, pid in pids.items()}
    cpu_used = meter.used()
    cpu_per_mail, cpu_per_mail_by_process = per_mail_us(cpu_used, count)
    console.print(f"campaign {ids.campaign_id} completed in {run.e2e_seconds:.2f} s")

    since_ms = int(read_since.timestamp() * 1000)
    events = read_campaign_messages(settings, topic_name(EVENTS, settings), ids.campaign_id,
                                    since_ms=since_ms, timeout=READ_BACK_TIMEOUT_SECONDS,
                                    enough=figures.has_hydration_facts)
    deliveries = figures.first_deliveries(read_campaign_messages(
        settings, topic_name(DELIVERIES, settings), ids.campaign_id, since_ms=since_ms,
        timeout=READ_BACK_TIMEOUT_SECONDS))
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        projected = figures.recipient_rows(conn, ids.tenant_id, ids.campaign_id)
    lag = figures.projection_lag(deliveries.first_at, projected, run.polls)

    console.print(f"raw SMTP: {count:,} messages over {connections} connections …")
    mails = raw_smtp.build_messages(people, campaign.template(), ids.raw_campaign_id)
    raw = raw_smtp.send_all(mails, settings.smtp_host, settings.smtp_port, connections)
    sink_records = figures.sink_records_since(stack.sink_records, sink_offset)
    in_sink = figures.count_in_sink(sink_records, ids.campaign_id)
    raw_in_sink = figures.count_in_sink(sink_records, ids.raw_campaign_id)

    # A separate step (issue 18): the same campaign and a raw run against a C SMTP sink.
    c_sink_figures: dict[str, Any] = {}
    c_sink_failures: list[str] = []
    try:
        if "c_sink" not in skip:
            console.print(f"C sink: {count:,} recipients into Postfix's smtp-sink, then raw …")
            c_sink_figures, c_sink_failures = c_sink.measure(
                stack, settings, pids, postmaster_pid(stack), count, connections, console,
                campaign_timeout(count))
    except (c_sink.CSinkMissing, campaign.CampaignFailed, RuntimeError, OSError) as exc:
        console.print(f"[bold red]C sink step failed:[/] {exc}")
        c_sink_failures = [f"C sink step failed: {exc}"]

    # A separate step (issue 18): the same pipeline into a sink answering 20 ms late.
    latency_figures: dict[str, Any] = {}
    latency_failures: list[str] = []
    try:
        if "latency" not in skip:
            console.print(f"latency: {latency_count:,} recipients into a sink answering 20 ms"
                          " late …")
            latency_figures, latency_failures = latency_sink.measure(
                stack, settings, latency_count, connections, console,
                campaign_timeout(latency_count))
    except (campaign.CampaignFailed, RuntimeError, OSError) as exc:
        console.print(f"[bold red]latency step failed:[/] {exc}")
        latency_failures = [f"latency step failed: {exc}"]

    # A separate step (issue 5): the projector alone, on its own backlog and fresh topics.
    projection_count = projection.events_wanted(dict(os.environ))
    projection_failures: list[str] = []
    projection_figures: dict[str, Any] = {"projection_rate": None, "raw_copy_rate": None,
                                          "projection_to_copy_ratio": None}
    try:
        if "projection" not in skip:
            proj = projection.measure(settings, projection_count, say=console.print)
            projection_figures = proj.figures()
            projection_failures = proj.failures
    except (projection.ProjectionBenchFailed, psycopg.Error, KafkaException) as exc:
        console.print(f"[bold red]projection step failed:[/] {exc}")
        projection_failures = [f"projection step failed: {exc}"]

    # A separate step (issue 3): audience at scale on fresh topics with its own hydrator.
    audience_count = hydration.contacts_wanted(dict(os.environ))
    audience_figures: dict[str, Any] = {}
    audience_failures: list[str] = []
    try:
        if "audience" not in skip:
            audience_settings = settings.replace(
                topic_prefix=f"{settings.topic_prefix}aud{ids.tenant_id[-8:]}.")
            audience_figures = hydration.measure_hydration(audience_settings, audience_count,
                                                           say=console.print)
            audience_failures = hydration.failures(audience_figures)
    except (RuntimeError, TimeoutError, KafkaException) as exc:
        console.print(f"[bold red]audience step failed:[/] {exc}")
        audience_failures = [f"audience step failed: {exc}"]

    # The audience step again at 5M contacts (issue 18: the hydrator's RSS bound there too).
    audience_5m_figures: dict[str, Any] = {}
    audience_5m_failures: list[str] = []
    try:
        if "audience_5m" not in skip:
            console.print(f"audience at {audience_5m_count:,} contacts …")
            audience_5m_figures = hydration.measure_hydration(
                settings.replace(topic_prefix=f"{settings.topic_prefix}a5m{ids.tenant_id[-8:]}."),
                audience_5m_count, say=console.print)
            audience_5m_failures = [f"5M {failure}"
                                    for failure in hydration.failures(audience_5m_figures)]
    except (RuntimeError, TimeoutError, KafkaException) as exc:
        console.print(f"[bold red]5M audience step failed:[/] {exc}")
        audience_5m_failures = [f"5M audience step failed: {exc}"]

    # A separate step (issue 4): 1, 2 and 4 sender processes against a sink adding 20 ms.
    scaleout_figures: dict[str, Any] = {}
    scaleout_failures: list[str] = []
    try:
        if "scaleout" not in skip:
            console.print("scale-out: 1, 2 and 4 senders against a sink adding 20 ms per"
                          " message …")
            scaleout_figures = measure_scaleout(settings, process_counts=(1, 2, 4),
                                                latency_ms=20.0)
    except (RuntimeError, TimeoutError, KafkaException, psycopg.Error) as exc:
        console.print(f"[bold red]scale-out step failed:[/] {exc}")
        scaleout_failures = [f"scale-out step failed: {exc}"]

    # A separate step (issue 4): one sender's peak RSS for a small and a large campaign.
    memory_figures: dict[str, Any] = {}
    memory_failures: list[str] = []
    try:
        if "sender_memory" not in skip:
            memory_figures = measure_sender_memory(settings, memory_sizes, say=console.print)
    except (RuntimeError, TimeoutError, KafkaException, psycopg.Error) as exc:
        console.print(f"[bold red]sender memory step failed:[/] {exc}")
        memory_failures = [f"sender memory step failed: {exc}"]

    # A separate step (issue 15): one sender's rate with metrics on and off, alternating.
    metrics_figures: dict[str, Any] = {}
    metrics_failures: list[str] = []
    try:
        if "metrics" not in skip:
            console.print("metrics cost: one sender, metrics on and off, alternating …")
            metrics_figures = measure_metrics_cost(settings)
    except (RuntimeError, TimeoutError, KafkaException, psycopg.Error) as exc:
        console.print(f"[bold red]metrics step failed:[/] {exc}")
        metrics_failures = [f"metrics step failed: {exc}"]

    # A separate step (issue 16): the tracker against a bare endpoint of its web stack.
    tracker_figures: dict[str, Any] = {}
    tracker_failures: list[str] = []
    try:
        if "tracker" not in skip:
            console.print("tracker: hits/s and latency against a bare endpoint …")
            tracker_figures = tracker_bench.measure(
                settings, SMALL_TRACKER_STEP_SECONDS if small else TRACKER_STEP_SECONDS,
                TRACKER_RATE)
            if tracker_figures["tracker_errors"]:
                tracker_failures = [f"tracker step: {tracker_figures['tracker_errors']}"
                                    " requests not answered 302"]
    except (RuntimeError, OSError, KafkaException, subprocess.SubprocessError) as exc:
        console.print(f"[bold red]tracker step failed:[/] {exc}")
        tracker_failures = [f"tracker step failed: {exc}"]

    # A separate step (issue 16): hits through the tracker into the engagement projection.
    engagement_figures: dict[str, Any] = {}
    engagement_failures: list[str] = []
    try:
        if "engagement" not in skip:
            console.print("engagement: projection lag of hits through the tracker …")
            engagement_figures = engagement_lag.measure(
                settings, SMALL_ENGAGEMENT_STEP_SECONDS if small else ENGAGEMENT_STEP_SECONDS,
                SMALL_ENGAGEMENT_RATE if small else ENGAGEMENT_RATE)
    except (RuntimeError, OSError, KafkaException, psycopg.Error,
            subprocess.SubprocessError) as exc:
        console.print(f"[bold red]engagement step failed:[/] {exc}")
        engagement_failures = [f"engagement step failed: {exc}"]

    send_rate = rate(count, run.e2e_seconds)
    completed_at = run.final.completed_at
    results: dict[str, Any] = {
        "recipients": count,
        "e2e_seconds": round(run.e2e_seconds, 3),
        "warmup_recipients": warmup_count,
        "warmup_seconds": _round(warmup_seconds, 3),
        "send_rate": _round(send_rate, 1),
        "raw_smtp_rate": round(raw.rate, 1),
        "send_to_raw_ratio": _round(send_rate / raw.rate if send_rate and raw.rate else None, 3),
        "hydration_seconds": _round(figures.hydration_seconds(events), 3),
        "first_delivery_seconds": _round(
            (min(deliveries.first_at.values()) - run.send_published_at).total_seconds()
            if deliveries.first_at else None, 3),
        "e2e_event_seconds": _round((completed_at - run.send_published_at).total_seconds()
                                    if completed_at else None, 3),
        "projection_lag_p50_ms": lag.p50_ms,
        "projection_lag_p99_ms": lag.p99_ms,
        "projection_lag_max_ms": lag.max_ms,
        "projection_lag_method": "campaign_recipients.updated_at (projector now() = transaction"
                                 " start) - first delivery event occurred_at; lower bound",
        "projection_visible_lag_p50_ms": lag.visible_p50_ms,
        "projection_visible_lag_p99_ms": lag.visible_p99_ms,
        "projection_visible_lag_method": "first 0.1 s read-model poll whose sent+failed includes"
                                         " the row's transaction - occurred_at; upper bound",
        **projection_figures,
        "peak_rss_mb": peaks,
        "campaign_cpu_seconds": cpu_used,
        "cpu_us_per_mail": cpu_per_mail,
        "cpu_us_per_mail_by_process": cpu_per_mail_by_process,
        "peak_rss_scope": "this campaign (VmHWM reset before import)" if peak_reset
                          else "since process start (VmHWM reset refused)",
        "campaign_csv_import_rows_per_s": round(imported.rows_per_second, 1),
        "campaign_csv_import_seconds": round(imported.seconds, 3),
        **hydration.headline(audience_figures),
        "hydrator_peak_rss_mb_5m": audience_5m_figures.get("hydrator_peak_rss_mb"),
        "hydrator_ingest_peak_rss_mb_5m": audience_5m_figures.get("hydrator_ingest_peak_rss_mb"),
        "hydrator_ingest_rate_5m": audience_5m_figures.get("hydrator_ingest_rate"),
        **latency_figures,
        **scaleout_figures,
        **memory_figures,
        **metrics_figures,
        **c_sink_figures,
        **tracker_figures,
        **engagement_figures,
        "skipped_steps": list(skip),
        "audience": audience_figures,
        "audience_5m": audience_5m_figures,
        "raw_smtp_seconds": round(raw.seconds, 3),
        "smtp_connections": connections,
        "checks": {
            "read_model_total": run.final.total,
            "read_model_sent": run.final.sent,
            "read_model_failed": run.final.failed,
            "sink_campaign_messages": in_sink.messages,
            "sink_campaign_recipients": in_sink.distinct_recipients,
            "sink_campaign_duplicates": in_sink.duplicates,
            "delivery_events": deliveries.events,
            "delivery_recipients": len(deliveries.first_at),
            "projected_rows_measured": lag.measured,
            "raw_accepted": raw.accepted,
            "raw_refused": raw.refused,
            "raw_errors": raw.errors[:5],
            "sink_raw_messages": raw_in_sink.messages,
        },
        "ids": {"tenant_id": ids.tenant_id, "list_id": ids.list_id,
                "campaign_id": ids.campaign_id, "raw_campaign_id": ids.raw_campaign_id},
        "machine": machine_info(started),
    }
    failures = (_failures(results, count) + projection_failures + audience_failures
                + scaleout_failures + memory_failures + metrics_failures + c_sink_failures
                + tracker_failures + engagement_failures + latency_failures
                + audience_5m_failures)
    results["ok"] = not failures
    results["failures"] = failures
    console.print(render_table(results))
    latest, stamped = write_results(results, started)
    console.print(f"written {latest} and {stamped.name}")
    for failure in failures:
        console.print(f"[bold red]MISMATCH[/]: {failure}")
    return 1 if failures else 0


def _failures(results: dict[str, Any], count: int) -> list[str]:
    """Every check that does not hold, in words."""
    c = results["checks"]
    failures = []
    if c["sink_campaign_messages"] != count:
        failures.append(f"the sink recorded {c['sink_campaign_messages']:,} campaign messages,"
                        f" expected exactly {count:,}")
    if c["sink_campaign_recipients"] != count:
        failures.append(f"the sink saw {c['sink_campaign_recipients']:,} distinct campaign"
                        f" recipients, expected {count:,}")
    if c["read_model_sent"] != count or c["read_model_total"] != count:
        failures.append(f"read model: total {c['read_model_total']}, sent"
                        f" {c['read_model_sent']:,}, failed {c['read_model_failed']:,};"
                        f" expected {count:,} sent")
    if c["raw_accepted"] != count or c["sink_raw_messages"] != count:
        failures.append(f"raw run: {c['raw_accepted']:,} accepted, {c['sink_raw_messages']:,}"
                        f" recorded of {count:,}; errors {c['raw_errors']}")
    if results["hydration_seconds"] is None:
        failures.append("CampaignSendRequested or CampaignHydrated not found on campaign.events")
    if c["delivery_recipients"] != count:
        failures.append(f"campaign.deliveries names {c['delivery_recipients']:,} recipients,"
                        f" expected {count:,}")
    return failures


def postmaster_pid(stack: Stack) -> int | None:
    """The running PostgreSQL server's postmaster (first line of postmaster.pid)."""
    try:
        return int((stack.postgres.data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


if __name__ == "__main__":
    started_at = time.monotonic()
    code = main()
    print(f"bench finished in {time.monotonic() - started_at:.0f} s (exit {code})")
    sys.exit(code)
