"""Engagement events as rows of engagement_events (migration 0009), and their insert.

Guarantee: one row per distinct event: a hit is keyed by its request id (the tracker answers
each request once; a replay carries the same id), a bounce or complaint by its envelope id
(derived from the report's dedup key, schemas.bounces.bounce_event_id). `insert_rows` writes
with ON CONFLICT DO NOTHING, so a redelivered record, or one a restart reads again, adds
nothing. Pure mapping apart from `insert_rows`, which runs in the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import psycopg

from projections.facts import RecipientFact
from schemas.base import Record
from schemas.bounces import EmailBounced, EmailComplained
from schemas.engagement import EmailOpened, LinkClicked
from schemas.envelope import Message


class EngagementRow(NamedTuple):
    tenant_id: str
    event_id: str
    campaign_id: str
    contact_id: str
    kind: str
    occurred_at: datetime
    machine: bool
    agent: str | None
    link_index: int | None
    url: str | None
    detail: str | None


def _text(value: str) -> str:
    # PostgreSQL text cannot hold NUL: a row that cannot be written would stop the lane.
    return value.replace("\x00", "")


def engagement_row(item: Message[Record] | RecipientFact) -> EngagementRow | None:
    """The row an engagement, bounce or complaint event gives; None for any other record."""
    if isinstance(item, RecipientFact):
        return None
    env, payload = item.envelope, item.payload
    if isinstance(payload, LinkClicked):
        return EngagementRow(env.tenant_id, str(payload.request_id), payload.campaign_id,
                             payload.contact_id, "click", env.occurred_at, payload.machine,
                             payload.agent.value, payload.link_index, _text(payload.url), None)
    if isinstance(payload, EmailOpened):
        return EngagementRow(env.tenant_id, str(payload.request_id), payload.campaign_id,
                             payload.contact_id, "open", env.occurred_at, payload.machine,
                             payload.agent.value, None, None, None)
    if isinstance(payload, EmailBounced):
        return EngagementRow(env.tenant_id, str(env.id), payload.campaign_id,
                             payload.contact_id, f"{payload.kind}_bounce", env.occurred_at,
                             False, None, None, None, payload.status or None)
    if isinstance(payload, EmailComplained):
        return EngagementRow(env.tenant_id, str(env.id), payload.campaign_id,
                             payload.contact_id, "complaint", env.occurred_at, False, None,
                             None, None, _text(payload.feedback_type))
    return None


def engagement_rows(items: Iterable[Message[Record] | RecipientFact]) -> list[EngagementRow]:
    return [row for item in items if (row := engagement_row(item)) is not None]


_INSERT = """
INSERT INTO engagement_events (tenant_id, event_id, campaign_id, contact_id, kind, occurred_at,
                               machine, agent, link_index, url, detail)
SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[],
                     %s::timestamptz[], %s::bool[], %s::text[], %s::int[], %s::text[],
                     %s::text[])
ON CONFLICT (tenant_id, event_id) DO NOTHING
"""


def insert_rows(conn: psycopg.Connection[Any], rows: Sequence[EngagementRow]) -> int:
    """Insert `rows` in the caller's transaction; returns how many were new."""
    if not rows:
        return 0
    columns = [list(column) for column in zip(*rows, strict=True)]
    return conn.execute(_INSERT, columns).rowcount
