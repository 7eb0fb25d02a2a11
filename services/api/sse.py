"""Server-sent events of campaign progress, fed by polling the read models.

A `progress` event goes out whenever a campaign's numbers change (status, total, queued, sent,
failed, skipped, excluded, retrying, ambiguous, start, pause or completion), and at least every
REFRESH_INTERVAL otherwise so that rates and ETA stay current; a per-campaign stream ends with
one `completed` event once the campaign is completed or cancelled. Delivery: best effort and
latest-state: a client that reconnects gets the current numbers first, so nothing is lost that
matters.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

# How stale a dashboard may be: one cheap indexed query per stream per interval.
POLL_INTERVAL = 0.5
# Re-send unchanged progress this often: keeps rate/ETA fresh while a campaign stalls, and
# keeps idle proxies and load balancers from closing a quiet stream.
REFRESH_INTERVAL = 5.0
# How long a browser waits before reconnecting after the stream drops.
RECONNECT_MS = 2000

TERMINAL_STATUSES = frozenset({"completed", "cancelled"})
_CHANGE_FIELDS = ("status", "total", "queued", "sent", "failed", "skipped", "excluded", "retrying",
                  "ambiguous", "started_at", "paused_at", "completed_at")

Poll = Callable[[], Awaitable[list[dict[str, Any]]]]


def format_event(event: str, data: dict[str, Any], event_id: int) -> str:
    """One SSE frame; the JSON is on one line, so one `data:` field suffices."""
    return f"event: {event}\nid: {event_id}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def progress_events(
    poll: Poll,
    is_disconnected: Callable[[], Awaitable[bool]],
    *,
    end_when_terminal: bool,
    poll_interval: float = POLL_INTERVAL,
    refresh_interval: float = REFRESH_INTERVAL,
) -> AsyncIterator[str]:
    """SSE frames for the campaigns `poll` returns, until the client leaves (or, with
    `end_when_terminal`, until the single polled campaign is completed or cancelled)."""
    yield f"retry: {RECONNECT_MS}\n\n"
    seen: dict[str, tuple[Any, ...]] = {}
    sent_at: dict[str, float] = {}
    event_id = 0
    while not await is_disconnected():
        campaigns = await poll()
        if end_when_terminal and not campaigns:
            return  # the campaign vanished (a read-model rebuild): the client reconnects
        now = time.monotonic()
        for campaign in campaigns:
            key = campaign["campaign_id"]
            numbers = tuple(campaign.get(name) for name in _CHANGE_FIELDS)
            if seen.get(key) != numbers or now - sent_at.get(key, now) >= refresh_interval:
                event_id += 1
                seen[key], sent_at[key] = numbers, now
                yield format_event("progress", campaign, event_id)
            if end_when_terminal and campaign["status"] in TERMINAL_STATUSES:
                event_id += 1
                yield format_event("completed", campaign, event_id)
                return
        await asyncio.sleep(poll_interval)
