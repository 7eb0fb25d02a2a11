"""The pipeline against a slow relay: a campaign into a sink that waits 20 ms per message.

A relay's latency, not CPU, bounds a sender with C connections to about C / latency mails/s
(issue 18: with 20 ms and the default 8 connections, 400/s; target >= 0.85 of it, 340/s). This
step runs one fresh campaign of N recipients through the running pipeline while our Python
sink with SINK_LATENCY_MS=20 stands in for the platform's sink on its port (the platform's
sink is stopped for the run and started again after it):

- send_rate_latency_20ms: N / the campaign's e2e seconds (bench.campaign's clock: from just
  before SendCampaign to the read model showing it completed), every stage included.
- send_rate_latency_20ms_sink: N / (last message accepted by the sink - SendCampaign): the
  same without the final projection step.
- send_rate_latency_20ms_target: 0.85 x connections / latency.
The sink must have recorded exactly N messages of the campaign, to N distinct recipients, and
the read model must count N sent; otherwise the step fails.

Size: BENCH_LATENCY_RECIPIENTS (default 8,000: ~20 s at 400/s, so the start-up's second weighs
little; BENCH_SCALE=small: 1,000).
"""

from __future__ import annotations

import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from bench import campaign, figures
from bench.c_sink import platform_sink_stopped
from bench.scaleout import process_env, spawn, stop_processes, wait_listening
from bench.stats import rate
from services.common.settings import Settings
from services.platform.stack import Stack
from services.smtp_sink import header

LATENCY_MS = 20.0
DEFAULT_RECIPIENTS = 8_000
SMALL_RECIPIENTS = 1_000
# The bar: this share of what the connections allow at the sink's latency.
TARGET_SHARE = 0.85


def recipients_wanted(env: dict[str, str]) -> int:
    """BENCH_LATENCY_RECIPIENTS, else the default for the scale; a bad value is an error."""
    if "BENCH_LATENCY_RECIPIENTS" in env:
        value = int(env["BENCH_LATENCY_RECIPIENTS"])
        if value < 1:
            raise ValueError(f"BENCH_LATENCY_RECIPIENTS must be >= 1, got {value}")
        return value
    return SMALL_RECIPIENTS if env.get("BENCH_SCALE", "").lower() == "small" else DEFAULT_RECIPIENTS


def target_rate(connections: int, latency_ms: float = LATENCY_MS) -> float:
    return TARGET_SHARE * connections / (latency_ms / 1000)


def measure(stack: Stack, settings: Settings, count: int, connections: int, console: Console,
            timeout: float) -> tuple[dict[str, Any], list[str]]:
    """The step's figures and its failed checks, in words."""
    ids = campaign.BenchIds.fresh()
    people = campaign.contacts(ids, count)
    imported = campaign.import_people(people, ids, settings)
    if imported.imported != count:
        raise campaign.CampaignFailed(f"import: {imported.imported} of {count} rows")
    records = Path(tempfile.mkdtemp(prefix="latency-sink-")) / "sink.jsonl"
    with platform_sink_stopped(stack):
        sink = spawn("services.smtp_sink", process_env(settings, records, concurrency=connections,
                                                       latency_ms=LATENCY_MS))
        try:
            wait_listening(settings.smtp_port)
            run = campaign.run_campaign(ids, settings, recipients=count, timeout=timeout,
                                        console=console)
        finally:
            stop_processes([sink])
    accepted = [r for r in figures.sink_records_since(records, 0)
                if header(r, "X-Campaign-ID") == ids.campaign_id]
    distinct = len({tuple(r["rcpt_tos"]) for r in accepted})
    start = run.send_published_at.timestamp()
    last = max((datetime.fromisoformat(r["received_at"]).timestamp() for r in accepted),
               default=None)
    result = {
        "send_rate_latency_20ms": round(rate(count, run.e2e_seconds) or 0.0, 1),
        "send_rate_latency_20ms_sink": round(rate(count, last - start) or 0.0, 1)
        if last else None,
        "send_rate_latency_20ms_target": round(target_rate(connections), 1),
        "latency_step": {"recipients": count, "connections": connections,
                         "sink_latency_ms": LATENCY_MS, "e2e_seconds": round(run.e2e_seconds, 3),
                         "sink_messages": len(accepted), "sink_recipients": distinct,
                         "read_model_sent": run.final.sent},
    }
    failures = []
    if len(accepted) != count or distinct != count or run.final.sent != count:
        failures.append(f"latency step: the sink recorded {len(accepted):,} mails to {distinct:,}"
                        f" recipients, the read model {run.final.sent:,} sent; expected {count:,}")
    return result, failures
