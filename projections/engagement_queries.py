"""Tenant-scoped reads of the engagement read model (the analyst_* views of migrations 0009
and 0011).

Every function takes the tenant and filters by it, also where row-level security would
(defence in depth, as projections/queries.py). Rates are of `sent` (campaigns.sent: what the
sender delivered to the relay); None while nothing was sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

# Soft bounces in a row after which a contact counts as failing (analyst_soft_bounce_streaks).
SOFT_BOUNCE_STREAK_LIMIT = 3

COUNT_COLUMNS = (
    "opens_unique_human", "opens_unique_machine", "opens_total_human", "opens_total_machine",
    "clicks_unique_human", "clicks_unique_machine", "clicks_total_human",
    "clicks_total_machine", "bounces_hard", "bounces_soft", "complaints", "unsubscribes",
)


@dataclass(frozen=True, slots=True)
class CampaignEngagement:
    campaign_id: str
    sent: int
    counts: dict[str, int]

    @property
    def rates(self) -> dict[str, float | None]:
        return {name: (round(value / self.sent, 4) if self.sent else None)
                for name, value in self.counts.items()}


def campaign_sent(conn: psycopg.Connection[Any], tenant: str, campaign_id: str) -> int | None:
    """The campaign's sent count, or None if the tenant has no such campaign."""
    row = conn.execute("SELECT sent FROM campaigns WHERE tenant_id = %s AND campaign_id = %s",
                       (tenant, campaign_id)).fetchone()
    return None if row is None else int(row[0])


def campaign_engagement(conn: psycopg.Connection[Any], tenant: str,
                        campaign_id: str) -> CampaignEngagement | None:
    sent = campaign_sent(conn, tenant, campaign_id)
    if sent is None:
        return None
    row = conn.execute(
        f"SELECT {', '.join(COUNT_COLUMNS)} FROM analyst_campaign_engagement"
        " WHERE tenant_id = %s AND campaign_id = %s", (tenant, campaign_id)).fetchone()
    values = row or (0,) * len(COUNT_COLUMNS)
    return CampaignEngagement(campaign_id, sent,
                              dict(zip(COUNT_COLUMNS, map(int, values), strict=True)))


def link_clicks(conn: psycopg.Connection[Any], tenant: str,
                campaign_id: str) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT link_index, url, unique_human, unique_machine, total_human, total_machine"
        " FROM analyst_campaign_link_clicks WHERE tenant_id = %s AND campaign_id = %s"
        " ORDER BY link_index", (tenant, campaign_id)).fetchall()
    keys = ("link_index", "url", "unique_human", "unique_machine", "total_human",
            "total_machine")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def engagement_minutes(conn: psycopg.Connection[Any], tenant: str,
                       campaign_id: str) -> list[dict[str, Any]]:
    keys = ("minute", "opens_human", "opens_machine", "clicks_human", "clicks_machine",
            "bounces_hard", "bounces_soft", "complaints", "unsubscribes")
    rows = conn.execute(
        f"SELECT {', '.join(keys)} FROM analyst_campaign_engagement_minutes"
        " WHERE tenant_id = %s AND campaign_id = %s ORDER BY minute",
        (tenant, campaign_id)).fetchall()
    return [dict(zip(keys, row, strict=True)) for row in rows]


def recipient_history(conn: psycopg.Connection[Any], tenant: str, campaign_id: str,
                      contact_id: str) -> list[dict[str, Any]]:
    keys = ("kind", "occurred_at", "machine", "machine_reason", "agent", "link_index", "url",
            "detail")
    rows = conn.execute(
        f"SELECT {', '.join(keys)} FROM analyst_recipient_engagement"
        " WHERE tenant_id = %s AND campaign_id = %s AND contact_id = %s"
        " ORDER BY occurred_at, event_id", (tenant, campaign_id, contact_id)).fetchall()
    return [dict(zip(keys, row, strict=True)) for row in rows]


def soft_bounce_streak(conn: psycopg.Connection[Any], tenant: str, contact_id: str) -> int:
    row = conn.execute(
        "SELECT soft_bounces_in_a_row FROM analyst_soft_bounce_streaks"
        " WHERE tenant_id = %s AND contact_id = %s", (tenant, contact_id)).fetchone()
    return 0 if row is None else int(row[0])
