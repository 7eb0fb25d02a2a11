"""The bench's output: a rich table on the terminal, JSON files under bench/results/."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.table import Table

from services.platform.kafka import kafka_version

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Guards against a git that hangs (e.g. waiting on a lock): the commit is only a label.
GIT_TIMEOUT_SECONDS = 5.0


def machine_info(started: datetime) -> dict[str, Any]:
    """Where and when the figures were taken: they mean little without it."""
    return {
        "timestamp": started.isoformat(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "kafka_version": kafka_version(),
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=GIT_TIMEOUT_SECONDS,
                              cwd=Path(__file__).resolve().parent, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def write_results(results: dict[str, Any], started: datetime) -> tuple[Path, Path]:
    """bench/results/latest.json and a copy named by the run's UTC start time."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, sort_keys=False, default=str) + "\n"
    latest = RESULTS_DIR / "latest.json"
    stamped = RESULTS_DIR / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    latest.write_text(text)
    stamped.write_text(text)
    return latest, stamped


def _fmt(value: Any, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "[red]n/a[/]"
    if isinstance(value, bool):
        return "yes" if value else "[red]no[/]"
    if isinstance(value, int):
        return f"{value:,}{unit}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{unit}"
    return f"{value}{unit}"


def render_table(r: dict[str, Any]) -> Table:
    """Every figure of a run, grouped as measured."""
    table = Table(title=f"bench: {r['recipients']:,} recipients ({r['ids']['campaign_id']})")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("how", style="dim")
    rows: list[tuple[str, str, str]] = [
        ("recipients", _fmt(r["recipients"]), "distinct contacts in the list"),
        ("csv import (campaign)", _fmt(r["campaign_csv_import_rows_per_s"], " rows/s", 0),
         f"{r['campaign_csv_import_seconds']:.2f} s, importer's own clock, broker-acked"),
        ("end to end", _fmt(r["e2e_seconds"], " s", 2), "SendCampaign published -> read model completed"),
        ("warm-up campaign", _fmt(r["warmup_seconds"], " s", 2),
         f"{r['warmup_recipients']:,} recipients before the measured run, not measured"),
        ("send rate", _fmt(r["send_rate"], " mails/s", 0), "recipients / end to end"),
        ("first delivery", _fmt(r.get("first_delivery_seconds"), " s", 2),
         "send published -> first delivery event (event time)"),
        ("raw SMTP rate", _fmt(r["raw_smtp_rate"], " mails/s", 0),
         f"smtplib straight to the sink, {r['smtp_connections']} connections"),
        ("send / raw", _fmt(r["send_to_raw_ratio"], "", 3), "pipeline rate over sink capacity"),
        ("CPU per mail", _fmt(r.get("cpu_us_per_mail"), " us", 0),
         "every process but the sink, the broker and PostgreSQL included"),
        ("raw SMTP rate, C sink", _fmt(r.get("raw_smtp_rate_c"), " mails/s", 0),
         "Postfix smtp-source into smtp-sink, same size and sessions"),
        ("send rate, C sink", _fmt(r.get("send_rate_c"), " mails/s", 0),
         "the same campaign size into smtp-sink"),
        ("send / raw, C sink", _fmt(r.get("send_to_raw_ratio_c"), "", 3), "target >= 0.33"),
        ("CPU per mail, C sink", _fmt(r.get("cpu_us_per_mail_c"), " us", 0), "target <= 220 us"),
        ("send rate, sink +20 ms", _fmt(r.get("send_rate_latency_20ms"), " mails/s", 0),
         f"target >= {_fmt(r.get('send_rate_latency_20ms_target'), '', 0)}"
         " (0.85 x connections / 20 ms)"),
        ("hydration", _fmt(r["hydration_seconds"], " s", 3),
         "CampaignSendRequested -> CampaignHydrated (event times)"),
        ("last delivery", _fmt(r["e2e_event_seconds"], " s", 2),
         "send published -> read model completed_at (event time)"),
        ("projection lag p50", _fmt(r["projection_lag_p50_ms"], " ms"),
         "row updated_at (projector tx start) - delivery occurred_at"),
        ("projection lag p99", _fmt(r["projection_lag_p99_ms"], " ms"), "same, lower bound"),
        ("visible lag p50", _fmt(r["projection_visible_lag_p50_ms"], " ms"),
         "first poll showing the row's batch - occurred_at"),
        ("visible lag p99", _fmt(r["projection_visible_lag_p99_ms"], " ms"), "same, upper bound"),
    ]
    proj = r.get("projection") or {}
    rows += [
        ("projection rate", _fmt(r.get("projection_rate"), " events/s", 0),
         f"real Projector, cold drain of {proj.get('delivery_events', 0):,} EmailSent"
         f" ({_fmt(proj.get('drain_seconds'), ' s', 2)})"),
        ("raw COPY rate", _fmt(r.get("raw_copy_rate"), " rows/s", 0),
         f"psycopg COPY of the same rows into a logged table like the read model"
         f" ({_fmt(proj.get('copy_seconds'), ' s', 2)})"),
        ("raw COPY rate, unlogged", _fmt(r.get("raw_copy_rate_unlogged"), " rows/s", 0),
         "same COPY into an UNLOGGED twin (the baseline before this session)"),
        ("projection / COPY", _fmt(r.get("projection_to_copy_ratio"), "", 3),
         "issue 5 target >= 0.5"),
        ("projection / unlogged COPY", _fmt(r.get("projection_to_unlogged_copy_ratio"), "", 3),
         "for comparison with earlier runs"),
    ]
    rows += [
        ("csv import (audience)", _fmt(r.get("csv_import_rows_per_s"), " rows/s", 0),
         f"{_fmt(r.get('csv_import_rows'))} rows, issue 3 target >= 100,000"),
        ("hydration rate", _fmt(r.get("hydration_rate"), " recipients/s", 0),
         f"{_fmt(r.get('hydration_contacts'))} contacts, 10 lists + a segment; target >= 50,000"),
        ("raw produce rate", _fmt(r.get("raw_produce_rate"), " msgs/s", 0),
         "plain confluent-kafka producer, same count, same run"),
        ("hydrator ingest", _fmt(r.get("hydrator_ingest_rate"), " records/s", 0),
         "contacts.events -> local RocksDB replicas"),
        ("hydrator peak RSS", _fmt(r.get("hydrator_peak_rss_mb"), " MiB"),
         f"fan-out; ingest {_fmt(r.get('hydrator_ingest_peak_rss_mb'), ' MiB')}"),
        ("hydrator peak RSS, 5M", _fmt(r.get("hydrator_peak_rss_mb_5m"), " MiB"),
         f"fan-out; ingest {_fmt(r.get('hydrator_ingest_peak_rss_mb_5m'), ' MiB')};"
         " target <= 300"),
    ]
    connections = r.get("scaleout_concurrency")
    for n in (1, 2, 4):
        efficiency = r.get(f"scaleout_efficiency_{n}")
        how = (f"{connections} SMTP connections each, sink +20 ms per message"
               if n == 1 else f"{_fmt(efficiency, '', 3)} of {n} x rate_1; issue 4 target >= 0.85")
        rows.append((f"scale-out, {n} sender(s)", _fmt(r.get(f"scaleout_rate_{n}"), " mails/s", 0),
                     how))
    if r.get("metrics_on_off_ratio") is not None:
        rows += [
            ("sender, metrics on", _fmt(r.get("metrics_on_send_rate"), " mails/s", 0),
             f"{_fmt(r.get('metrics_recipients'))} recipients, /metrics scraped every second"),
            ("sender, metrics off", _fmt(r.get("metrics_off_send_rate"), " mails/s", 0),
             "CAMPAIGN_METRICS=off; best of alternating runs, as on"),
            ("metrics on / off", _fmt(r.get("metrics_on_off_ratio"), "", 3), "target >= 0.97"),
        ]
    memory = sorted((int(name.rsplit("_", 1)[1]), mb) for name, mb in r.items()
                    if name.startswith("sender_peak_rss_mb_"))
    for size, mb in memory:
        rows.append((f"sender peak RSS, {size:,} recipients", _fmt(mb, " MiB"),
                     "one sender process, VmHWM; issue 4: flat, not growing with size"))
    if memory:
        rows.append(("sender RSS growth", _fmt(r.get("sender_rss_growth"), "x", 3),
                     f"peak at {memory[-1][0]:,} / peak at {memory[0][0]:,} recipients"))
    scope = "VmHWM, " + r["peak_rss_scope"].split(" (")[0]
    for name, mb in r["peak_rss_mb"].items():
        rows.append((f"peak RSS {name}", _fmt(mb, " MiB"), scope))
    for name, seconds in (r.get("campaign_cpu_seconds") or {}).items():
        rows.append((f"CPU {name}", _fmt(seconds, " s", 2), "user + system during the campaign"))
    checks = r["checks"]
    rows += [
        ("read model sent / failed", f"{checks['read_model_sent']:,} / {checks['read_model_failed']:,}",
         "campaign_progress at completion"),
        ("sink: campaign mails", _fmt(checks["sink_campaign_messages"]),
         f"X-Campaign-ID; {checks['sink_campaign_duplicates']} duplicates"),
        ("sink: raw mails", _fmt(checks["sink_raw_messages"]), "X-Campaign-ID of the raw run"),
        ("delivery events", _fmt(checks["delivery_events"]),
         f"{checks['delivery_recipients']:,} distinct recipients"),
    ]
    for row in rows:
        table.add_row(*row)
    return table
