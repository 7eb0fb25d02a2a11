"""Engagement events as rows of engagement_events (migrations 0009, 0011), and their insert.

Guarantee: one row per distinct event: a hit is keyed by its request id (the tracker answers
each request once; a replay carries the same id), a bounce or complaint by its envelope id
(derived from the report's dedup key, schemas.bounces.bounce_event_id), an unsubscribe from a
campaign's mail by its envelope id (a one-click unsubscribe's is derived from its token).
`insert_rows` writes with ON CONFLICT DO NOTHING, so a redelivered record, or one a restart
reads again, adds nothing. `mark_click_bursts` then marks machine (reason BURST_REASON) every click inside a
burst over all of a recipient's clicks on one mail (services.engagement.machine.burst_clicks):
a burst found in some of the clicks is still one when more arrive, and marks are never lifted,
so the result depends only on the set of clicks, not on batches or their order (a rebuild
marks the same rows). Pure mapping apart from `insert_rows`, which runs in the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import psycopg

from projections.facts import RecipientFact
from schemas.base import Record
from schemas.bounces import EmailBounced, EmailComplained
from schemas.contacts import ContactDeleted, ContactUnsubscribed, ContactUpserted
from schemas.engagement import EmailOpened, LinkClicked
from schemas.envelope import Message
from services.engagement.machine import burst_clicks

# The machine reason of clicks marked by the burst rule (no single hit shows it).
BURST_REASON = "all_links_at_once"


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
    machine_reason: str | None = None
    links_in_mail: int | None = None


def _text(value: str) -> str:
    # PostgreSQL text cannot hold NUL: a row that cannot be written would stop the lane.
    return value.replace("\x00", "")


def engagement_row(item: Message[Record] | RecipientFact) -> EngagementRow | None:
    """The row an engagement, bounce, complaint or campaign unsubscribe event gives; None for
    any other record."""
    if isinstance(item, RecipientFact):
        return None
    env, payload = item.envelope, item.payload
    if isinstance(payload, LinkClicked):
        return EngagementRow(env.tenant_id, str(payload.request_id), payload.campaign_id,
                             payload.contact_id, "click", env.occurred_at, payload.machine,
                             payload.agent.value, payload.link_index, _text(payload.url), None,
                             payload.machine_reason, payload.links_in_mail)
    if isinstance(payload, EmailOpened):
        return EngagementRow(env.tenant_id, str(payload.request_id), payload.campaign_id,
                             payload.contact_id, "open", env.occurred_at, payload.machine,
                             payload.agent.value, None, None, None, payload.machine_reason)
    if isinstance(payload, EmailBounced):
        return EngagementRow(env.tenant_id, str(env.id), payload.campaign_id,
                             payload.contact_id, f"{payload.kind}_bounce", env.occurred_at,
                             False, None, None, None, payload.status or None)
    if isinstance(payload, ContactUnsubscribed):
        if payload.campaign_id is None:
            return None  # not from a campaign's mail: no campaign's engagement
        return EngagementRow(env.tenant_id, str(env.id), payload.campaign_id,
                             payload.contact_id, "unsubscribe", env.occurred_at, False, None,
                             None, None, payload.list_id)
    if isinstance(payload, EmailComplained):
        return EngagementRow(env.tenant_id, str(env.id), payload.campaign_id,
                             payload.contact_id, "complaint", env.occurred_at, False, None,
                             None, None, _text(payload.feedback_type))
    return None


def deleted_contacts(items: Iterable[Message[Record] | RecipientFact]) -> list[tuple[str, str]]:
    """The (tenant, contact) keys these records leave deleted: a ContactDeleted not followed by
    a ContactUpserted of the same contact (which makes it a live contact again). Pure."""
    deleted: dict[tuple[str, str], bool] = {}
    for item in items:
        if isinstance(item, RecipientFact):
            continue
        payload = item.payload
        if isinstance(payload, ContactDeleted | ContactUpserted):
            deleted[(item.envelope.tenant_id, payload.contact_id)] = isinstance(
                payload, ContactDeleted)
    return sorted(key for key, gone in deleted.items() if gone)


def engagement_rows(items: Iterable[Message[Record] | RecipientFact]) -> list[EngagementRow]:
    return [row for item in items if (row := engagement_row(item)) is not None]


_INSERT = """
INSERT INTO engagement_events (tenant_id, event_id, campaign_id, contact_id, kind, occurred_at,
                               machine, agent, link_index, url, detail, machine_reason,
                               links_in_mail)
SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[],
                     %s::timestamptz[], %s::bool[], %s::text[], %s::int[], %s::text[],
                     %s::text[], %s::text[], %s::int[])
ON CONFLICT (tenant_id, event_id) DO NOTHING
"""


def insert_rows(conn: psycopg.Connection[Any], rows: Sequence[EngagementRow]) -> int:
    """Insert `rows` in the caller's transaction; returns how many were new."""
    if not rows:
        return 0
    columns = [list(column) for column in zip(*rows, strict=True)]
    return conn.execute(_INSERT, columns).rowcount


_RECIPIENT_CLICKS = """
SELECT tenant_id, campaign_id, contact_id, event_id, extract(epoch FROM occurred_at)::float8,
       link_index, links_in_mail
FROM engagement_events
WHERE kind = 'click' AND (tenant_id, campaign_id, contact_id) IN (
    SELECT * FROM unnest(%s::text[], %s::text[], %s::text[]))
"""
_MARK_BURST = """
UPDATE engagement_events SET machine = true, machine_reason = %s
WHERE tenant_id = %s AND event_id = ANY(%s::text[]) AND NOT machine
"""


def mark_click_bursts(conn: psycopg.Connection[Any], rows: Sequence[EngagementRow]) -> int:
    """In the caller's transaction, after `insert_rows(rows)`: mark machine every click of the
    recipients clicking in `rows` that is part of a burst; returns how many it marked."""
    touched = sorted({(r.tenant_id, r.campaign_id, r.contact_id) for r in rows
                      if r.kind == "click"})
    if not touched:
        return 0
    clicks: dict[tuple[str, str, str], list[tuple[str, float, int, int]]] = {}
    found = conn.execute(_RECIPIENT_CLICKS, [list(c) for c in zip(*touched, strict=True)])
    for tenant, campaign, contact, event_id, at, link_index, links_in_mail in found:
        clicks.setdefault((tenant, campaign, contact), []).append(
            (event_id, at, link_index or 0, links_in_mail or 0))
    marked = 0
    for (tenant, _, _), mine in clicks.items():
        positions = burst_clicks([(at, link) for _, at, link, _ in mine],
                                 max(links for *_, links in mine))
        if positions:
            marked += conn.execute(_MARK_BURST, (BURST_REASON, tenant,
                                                 [mine[i][0] for i in positions])).rowcount
    return marked
