"""Turning what the bench observed into figures: hydration time, projection lag, sink counts.

Everything here is pure (values in, values out) except `recipient_rows` and `sink_records_since`,
which read the read model and the sink's record file.
"""

from __future__ import annotations

import bisect
import json
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from bench.stats import percentile
from schemas.base import Record
from schemas.envelope import Message
from schemas.events import CampaignHydrated, CampaignSendRequested, EmailFailed, EmailSent
from services.smtp_sink import header

_MS = 1000.0


def hydration_seconds(events: list[Message[Record]]) -> float | None:
    """CampaignSendRequested.occurred_at -> CampaignHydrated.occurred_at (first of each), in
    seconds; None if either is missing."""
    requested = next((m.envelope.occurred_at for m in events
                      if isinstance(m.payload, CampaignSendRequested)), None)
    hydrated = next((m.envelope.occurred_at for m in events
                     if isinstance(m.payload, CampaignHydrated)), None)
    if requested is None or hydrated is None:
        return None
    return (hydrated - requested).total_seconds()


def has_hydration_facts(events: list[Message[Record]]) -> bool:
    """Stop condition for reading campaign.events: both facts seen."""
    kinds = {type(m.payload) for m in events}
    return CampaignSendRequested in kinds and CampaignHydrated in kinds


@dataclass(frozen=True)
class Deliveries:
    """The campaign's delivery events: the first one per recipient, and how many in all."""

    first_at: dict[str, datetime]  # contact id -> occurred_at of its first delivery event
    events: int
    sent: int  # recipients whose first delivery event is EmailSent
    failed: int


def first_deliveries(messages: list[Message[Record]]) -> Deliveries:
    """The projector applies a recipient's first delivery and ignores later copies, so the
    first one (in offset order: the topic is keyed by campaign, one partition) is the one whose
    projection the lag measures."""
    first_at: dict[str, datetime] = {}
    outcome: Counter[str] = Counter()
    events = 0
    for message in messages:
        payload = message.payload
        if not isinstance(payload, EmailSent | EmailFailed):
            continue
        events += 1
        if payload.contact_id not in first_at:
            first_at[payload.contact_id] = message.envelope.occurred_at
            outcome["sent" if isinstance(payload, EmailSent) else "failed"] += 1
    return Deliveries(first_at, events, outcome["sent"], outcome["failed"])


def recipient_rows(
    conn: psycopg.Connection[Any], tenant_id: str, campaign_id: str
) -> dict[str, datetime]:
    """contact id -> updated_at of the campaign's recipients that reached sent or failed.

    updated_at is set by the projector's `now()` when it moves the row out of 'queued' (and
    never again: a row leaves 'queued' once): the start of the projector transaction that
    applied the recipient's delivery.
    """
    rows = conn.execute(
        "SELECT contact_id, updated_at FROM campaign_recipients"
        " WHERE campaign_id = %s AND tenant_id = %s AND status IN ('sent', 'failed')",
        (campaign_id, tenant_id),
    ).fetchall()
    return {contact_id: updated_at for contact_id, updated_at in rows}


@dataclass(frozen=True)
class ProjectionLag:
    """Per-recipient lag figures in ms; see `projection_lag`."""

    measured: int  # recipients with both a delivery event and a projected row
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    visible_p50_ms: float | None
    visible_p99_ms: float | None


def projection_lag(
    deliveries: dict[str, datetime],
    projected: dict[str, datetime],
    polls: list[tuple[datetime, int]],
) -> ProjectionLag:
    """Two honest views of the delay from a delivery event to its read-model row.

    - lag: updated_at - occurred_at. updated_at is PostgreSQL's now() in the projector, i.e.
      the START of the transaction that applied the row, so this leaves out that transaction's
      own duration and commit: a lower bound on when the row became visible.
    - visible lag: rows with the same updated_at were committed by one transaction; taking
      those transactions in order, the counter sent + failed reaches the running total of
      their rows exactly when each commits. The first bench poll that showed at least that
      total happened after the commit, so poll time - occurred_at is an upper bound (late by at
      most one poll interval plus the poll's own round trip).
    """
    common = [c for c in projected if c in deliveries]
    lags = [(projected[c] - deliveries[c]).total_seconds() * _MS for c in common]

    batch_size = Counter(projected[c] for c in projected)
    poll_times = [at for at, _ in polls]
    poll_done = [done for _, done in polls]
    # The counter only grows, but make the search safe for a poll list that is not monotonic.
    for i in range(1, len(poll_done)):
        poll_done[i] = max(poll_done[i], poll_done[i - 1])
    seen_at: dict[datetime, datetime] = {}
    running = 0
    for batch_start in sorted(batch_size):
        running += batch_size[batch_start]
        index = bisect.bisect_left(poll_done, running)
        if index < len(poll_times):
            seen_at[batch_start] = poll_times[index]
    visible = [(seen_at[projected[c]] - deliveries[c]).total_seconds() * _MS
               for c in common if projected[c] in seen_at]
    return ProjectionLag(
        measured=len(common),
        p50_ms=_round(percentile(lags, 50)),
        p99_ms=_round(percentile(lags, 99)),
        max_ms=_round(max(lags) if lags else None),
        visible_p50_ms=_round(percentile(visible, 50)),
        visible_p99_ms=_round(percentile(visible, 99)),
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


@dataclass(frozen=True)
class SinkCount:
    """What the sink recorded under one X-Campaign-ID."""

    messages: int
    distinct_recipients: int

    @property
    def duplicates(self) -> int:
        return self.messages - self.distinct_recipients


def sink_size(path: Path) -> int:
    """Bytes in the sink's record file now (0 if none): later reads start there."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def sink_records_since(path: Path, offset: int) -> list[dict[str, Any]]:
    """Complete records appended to the sink's JSONL file after byte `offset`: the sink only
    appends, so this is everything accepted since then, without re-reading older runs."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return []
    complete, _, _partial = data.rpartition(b"\n")  # a line being written is not a record yet
    return [json.loads(line) for line in complete.split(b"\n") if line.strip()]


def count_in_sink(records: list[dict[str, Any]], campaign_id: str) -> SinkCount:
    mine = [r for r in records if header(r, "X-Campaign-ID") == campaign_id]
    return SinkCount(len(mine), len({tuple(r["rcpt_tos"]) for r in mine}))
