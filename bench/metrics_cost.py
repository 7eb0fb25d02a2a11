"""The cost of the engine's metrics: one sender's send rate with metrics on and off, in the
same run (`make bench`'s "metrics" step; the issue's target: on / off >= 0.97).

On: the sender as deployed, serving METRICS_PORT, scraped every SCRAPE_SECONDS while it mails
(ten times Prometheus' usual 15 s). Off: CAMPAIGN_METRICS=off, every metric a no-op and no
endpoint. Each run is the scale-out harness (bench/scaleout.py) with one sender, its default 8
connections and no sink latency, so the sender's own CPU bounds the rate and the metrics'
share of it shows. The sender carries the per-mail metrics (deliveries, SMTP latency, records
consumed and produced); the other services count per batch or per campaign.

Runs alternate off, on, off, on, ... (ROUNDS each): a drift of the machine weighs on both
modes alike. A mode's figure is its best run: interference on a shared machine only ever
slows a run down.
"""

from __future__ import annotations

import functools
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bench.scaleout import free_port, sender_run
from services.common.settings import Settings

ROUNDS = 3
RECIPIENTS = 10_000
SENDER_CONCURRENCY = 8
SCRAPE_SECONDS = 1.0


def measure_metrics_cost(settings: Settings, *, recipients: int = RECIPIENTS,
                         rounds: int = ROUNDS) -> dict[str, Any]:
    """`metrics_on_send_rate`, `metrics_off_send_rate` (mails/s, best run of each) and their
    ratio `metrics_on_off_ratio`, with every run's rate."""
    runs: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(rounds):
        runs["off"].append(sender_run(settings, 1, recipients, 0.0, SENDER_CONCURRENCY,
                                      sender_env={"CAMPAIGN_METRICS": "off"}))
        port, scrapes = free_port(), list[int]()
        runs["on"].append(sender_run(settings, 1, recipients, 0.0, SENDER_CONCURRENCY,
                                     sender_env={"METRICS_PORT": str(port)},
                                     alongside=functools.partial(scraping, port, scrapes)))
        if not scrapes:
            raise RuntimeError(f"no scrape of the sender's /metrics on port {port} succeeded")
    on, off = max(runs["on"]), max(runs["off"])
    return {
        "metrics_recipients": recipients,
        "metrics_on_send_rate": round(on, 1),
        "metrics_off_send_rate": round(off, 1),
        "metrics_on_off_ratio": round(on / off, 3),
        "metrics_on_runs": [round(r, 1) for r in runs["on"]],
        "metrics_off_runs": [round(r, 1) for r in runs["off"]],
    }


@contextmanager
def scraping(port: int, sizes: list[int]) -> Iterator[None]:
    """GET /metrics every SCRAPE_SECONDS until left, appending each body's size to `sizes` (a
    scrape that fails is skipped, as Prometheus would)."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(SCRAPE_SECONDS):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    sizes.append(len(r.read()))
            except OSError:
                continue

    thread = threading.Thread(target=run, name="bench-scraper", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


if __name__ == "__main__":
    # Against the `make up` platform: python -m bench.metrics_cost
    import json

    from services.platform.stack import Stack

    stack = Stack(Settings().state_dir)
    stack.up()
    print(json.dumps(measure_metrics_cost(stack.settings()), indent=2))
