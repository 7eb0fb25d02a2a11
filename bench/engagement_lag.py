"""Engagement projection lag: hits at a steady rate through the real tracker while the real
engagement projector runs, and how long each hit takes to become a visible row.

`python -m bench.engagement_lag [SECONDS] [RATE]` (defaults 10 s, 500 hits/s) against the
Kafka and PostgreSQL of KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL, on fresh topics (prefix
`englag<hex>.`, deleted afterwards, as are its rows, positions and consumer group).

What runs: the tracker as its own process (`python -m services.tracker`, as bench.tracker
starts it), the load client as another (bench.tracker's open loop: RATE clicks a second,
keep-alive, over TOKENS recipients), and the engagement projector (`EngagementProjector.run`,
the projector service's engagement lane) on a thread of this process.

Lag per hit: the first poll (every POLL_SECONDS) of engagement_events that shows its row,
minus the hit's occurred_at (the tracker's clock when it took the request): an upper bound,
late by at most one poll and the poll's own query. Figures:
`engagement_projection_lag_p50_ms`, `_p99_ms`, `_max_ms`, the hits the client made, the
records on the topic and the rows projected (equal when nothing was lost).
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from bench.scaleout import free_port
from bench.stats import percentile
from bench.tracker import (
    delete_topics,
    load_step,
    records_on_topic,
    start_tracker,
    wait_serving,
    write_tokens,
)
from projections.engagement_projector import (
    ENGAGEMENT_POSITIONS_NAME,
    ENGAGEMENT_TOPICS,
    EngagementProjector,
    engagement_projector_for,
)
from projections.migrate import apply_migrations
from services.common.settings import Settings, load
from services.common.topics import ensure_topics

DEFAULT_SECONDS = 10.0
DEFAULT_RATE = 500.0
# How often the bench looks for new rows: the figures' resolution.
POLL_SECONDS = 0.05
# Bounds the consumer group's first assignment (a broker that never assigns is a failure).
ASSIGN_TIMEOUT_SECONDS = 60.0
# After the load: how long the projector may take to show the last rows before the bench
# gives up (guards against a projector that stopped).
SETTLE_TIMEOUT_SECONDS = 30.0


class EngagementLagFailed(RuntimeError):
    """The step could not measure (the projector never caught up); the message says why."""


def main(argv: list[str]) -> int:
    seconds = float(argv[1]) if len(argv) > 1 else DEFAULT_SECONDS
    rate = float(argv[2]) if len(argv) > 2 else DEFAULT_RATE
    print(json.dumps(measure(load(Settings), seconds, rate), indent=2))
    return 0


class RowWatcher:
    """Polls engagement_events for one tenant's rows; remembers when each was first seen."""

    def __init__(self, database_url: str, tenant: str) -> None:
        self.database_url = database_url
        self.tenant = tenant
        self.seen: dict[str, tuple[datetime, float]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="row-watcher", daemon=True)

    def _watch(self) -> None:
        # Only rows of transactions newer than the last seen: one projector writes them, so
        # its transaction ids grow in commit order, and a poll stays cheap as the rows add up
        # (a full read of every row each poll took CPU from the projector it measures).
        newest = 0
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            while not self.stop.is_set():
                rows = conn.execute(
                    "SELECT event_id, occurred_at, xmin::text::bigint FROM engagement_events"
                    " WHERE tenant_id = %s AND xmin::text::bigint > %s",
                    (self.tenant, newest)).fetchall()
                now = time.time()
                for event_id, occurred_at, xid in rows:
                    self.seen.setdefault(event_id, (occurred_at, now))
                    newest = max(newest, xid)
                self.stop.wait(POLL_SECONDS)

    def lags_ms(self) -> list[float]:
        return [(seen - occurred.timestamp()) * 1000 for occurred, seen in self.seen.values()]


def measure(settings: Settings, seconds: float, rate: float) -> dict[str, Any]:
    """Run the step; the figures (see the module docstring)."""
    isolated = settings.replace(topic_prefix=f"englag{uuid.uuid4().hex[:8]}.")
    tenant = f"englag-{uuid.uuid4().hex[:8]}"
    apply_migrations(isolated.database_url)
    ensure_topics(isolated, specs=ENGAGEMENT_TOPICS)
    projector = engagement_projector_for(isolated)
    stop = threading.Event()
    lane = threading.Thread(target=projector.run, args=(stop,), name="engagement-lane")
    watcher = RowWatcher(isolated.database_url, tenant)
    tracker_port, metrics_port = free_port(), free_port()
    try:
        with tempfile.TemporaryDirectory() as folder:
            tokens = write_tokens(Path(folder) / "tokens", tenant, "cmp-englag")
            tracker = start_tracker(isolated, tracker_port, metrics_port)
            try:
                wait_serving(tracker_port)
                projector.start()
                lane.start()
                _wait_assigned(projector)
                watcher.thread.start()
                run = load_step(f"http://127.0.0.1:{tracker_port}", tokens, "open", rate, seconds)
            finally:
                tracker.terminate()
                tracker.wait(15)
        on_topic = records_on_topic(isolated)
        deadline = time.monotonic() + SETTLE_TIMEOUT_SECONDS
        while len(watcher.seen) < on_topic and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
        if len(watcher.seen) < on_topic:
            raise EngagementLagFailed(f"{len(watcher.seen)} of {on_topic} hits projected"
                                      f" after {SETTLE_TIMEOUT_SECONDS:.0f} s")
    finally:
        watcher.stop.set()
        if watcher.thread.is_alive():
            watcher.thread.join(10)
        stop.set()
        if lane.is_alive():
            lane.join(30)
        _clean(isolated, tenant)
    lags = watcher.lags_ms()
    return {
        "engagement_projection_lag_p50_ms": round(percentile(lags, 50) or 0.0, 1),
        "engagement_projection_lag_p99_ms": round(percentile(lags, 99) or 0.0, 1),
        "engagement_projection_lag_max_ms": round(max(lags, default=0.0), 1),
        "engagement_projection_lag_method": "first 50 ms poll showing the row - hit occurred_at"
                                            " (tracker clock); upper bound",
        "engagement_hits_per_s_target": rate,
        "engagement_hits_per_s_achieved": round(run["rate"], 1),
        "engagement_hits_made": run["requests"],
        "engagement_hit_errors": run["errors"],
        "engagement_records_on_topic": on_topic,
        "engagement_rows_projected": len(watcher.seen),
        "engagement_step_seconds": seconds,
    }


def _wait_assigned(projector: EngagementProjector) -> None:
    """Until the lane owns its partitions: hits made before would measure the group's join."""
    deadline = time.monotonic() + ASSIGN_TIMEOUT_SECONDS
    while not projector.owned_partitions:
        if time.monotonic() > deadline:
            raise EngagementLagFailed("the engagement projector was never assigned partitions")
        time.sleep(POLL_SECONDS)


def _clean(settings: Settings, tenant: str) -> None:
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM engagement_events WHERE tenant_id = %s", (tenant,))
        conn.execute("DELETE FROM projector_positions WHERE consumer_group = %s",
                     (settings.group(ENGAGEMENT_POSITIONS_NAME),))
    delete_topics(settings, ENGAGEMENT_TOPICS)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
