"""The engagement reads: a campaign's opens, clicks, bounces, complaints and unsubscribes
(counts and rates of sent), per link, per minute of event time, and one recipient's history.

Guarantee: every read is scoped to the caller's tenant (projections/engagement_queries.py
filters by it, row-level security too): another tenant's campaign is a 404, like a missing
one. Counts are what the engagement projector committed: each distinct event once.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel

from projections import engagement_queries as eq
from services.api import queries
from services.api.deps import DbPool, ErrorDetail, PathId, Pool, Tenant

engagement_router = APIRouter(tags=["engagement"])
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorDetail, "description": "No such campaign for this tenant"}}


class EngagementCounts(BaseModel):
    opens_unique_human: int
    opens_unique_machine: int
    opens_total_human: int
    opens_total_machine: int
    clicks_unique_human: int
    clicks_unique_machine: int
    clicks_total_human: int
    clicks_total_machine: int
    bounces_hard: int
    bounces_soft: int
    complaints: int
    unsubscribes: int


class EngagementRates(BaseModel):
    """Each count divided by sent (None while nothing was sent)."""

    opens_unique_human: float | None
    opens_unique_machine: float | None
    opens_total_human: float | None
    opens_total_machine: float | None
    clicks_unique_human: float | None
    clicks_unique_machine: float | None
    clicks_total_human: float | None
    clicks_total_machine: float | None
    bounces_hard: float | None
    bounces_soft: float | None
    complaints: float | None
    unsubscribes: float | None


class CampaignEngagementOut(BaseModel):
    campaign_id: str
    sent: int
    counts: EngagementCounts
    rates: EngagementRates


class LinkClicksOut(BaseModel):
    link_index: int
    url: str
    unique_human: int
    unique_machine: int
    total_human: int
    total_machine: int


class LinkList(BaseModel):
    campaign_id: str
    links: list[LinkClicksOut]


class EngagementMinute(BaseModel):
    minute: datetime
    opens_human: int
    opens_machine: int
    clicks_human: int
    clicks_machine: int
    bounces_hard: int
    bounces_soft: int
    complaints: int
    unsubscribes: int


class EngagementTimeline(BaseModel):
    campaign_id: str
    minutes: list[EngagementMinute]


class RecipientEvent(BaseModel):
    kind: str
    occurred_at: datetime
    machine: bool
    machine_reason: str | None
    agent: str | None
    link_index: int | None
    url: str | None
    detail: str | None


class RecipientEngagement(BaseModel):
    campaign_id: str
    contact_id: str
    events: list[RecipientEvent]
    soft_bounces_in_a_row: int
    soft_bounce_streak_limit: int


def _known(conn: Any, tenant: str, campaign_id: str) -> None:
    if eq.campaign_sent(conn, tenant, campaign_id) is None:
        raise HTTPException(404, "campaign not found")


def engagement_out(pool: Pool, tenant: str, campaign_id: str) -> CampaignEngagementOut | None:
    """The campaign's engagement as the API answers it (also what the dashboard streams)."""
    with queries.tenant_snapshot(pool, tenant) as conn:
        found = eq.campaign_engagement(conn, tenant, campaign_id)
    if found is None:
        return None
    return CampaignEngagementOut(
        campaign_id=campaign_id, sent=found.sent,
        counts=EngagementCounts(**found.counts), rates=EngagementRates(**found.rates))


@engagement_router.get("/campaigns/{campaign_id}/engagement",
                       response_model=CampaignEngagementOut, responses=_NOT_FOUND)
def get_engagement(campaign_id: PathId, tenant: Tenant, pool: DbPool) -> CampaignEngagementOut:
    """Opens and clicks (unique and total, human and machine), bounces and complaints."""
    found = engagement_out(pool, tenant, campaign_id)
    if found is None:
        raise HTTPException(404, "campaign not found")
    return found


@engagement_router.get("/campaigns/{campaign_id}/engagement/links",
                       response_model=LinkList, responses=_NOT_FOUND)
def get_links(campaign_id: PathId, tenant: Tenant, pool: DbPool) -> LinkList:
    """Clicks per tracked link (its place in the mail)."""
    with queries.tenant_snapshot(pool, tenant) as conn:
        _known(conn, tenant, campaign_id)
        links = eq.link_clicks(conn, tenant, campaign_id)
    return LinkList(campaign_id=campaign_id, links=[LinkClicksOut(**link) for link in links])


@engagement_router.get("/campaigns/{campaign_id}/engagement/timeline",
                       response_model=EngagementTimeline, responses=_NOT_FOUND)
def get_timeline(campaign_id: PathId, tenant: Tenant, pool: DbPool) -> EngagementTimeline:
    """Events per minute of event time."""
    with queries.tenant_snapshot(pool, tenant) as conn:
        _known(conn, tenant, campaign_id)
        minutes = eq.engagement_minutes(conn, tenant, campaign_id)
    return EngagementTimeline(campaign_id=campaign_id,
                              minutes=[EngagementMinute(**m) for m in minutes])


@engagement_router.get("/campaigns/{campaign_id}/recipients/{contact_id}/engagement",
                       response_model=RecipientEngagement, responses=_NOT_FOUND)
def get_recipient_engagement(campaign_id: PathId, contact_id: PathId, tenant: Tenant,
                             pool: DbPool) -> RecipientEngagement:
    """One recipient's events for the campaign, oldest first, and its soft-bounce streak."""
    with queries.tenant_snapshot(pool, tenant) as conn:
        _known(conn, tenant, campaign_id)
        events = eq.recipient_history(conn, tenant, campaign_id, contact_id)
        streak = eq.soft_bounce_streak(conn, tenant, contact_id)
    return RecipientEngagement(
        campaign_id=campaign_id, contact_id=contact_id,
        events=[RecipientEvent(**e) for e in events], soft_bounces_in_a_row=streak,
        soft_bounce_streak_limit=eq.SOFT_BOUNCE_STREAK_LIMIT)
