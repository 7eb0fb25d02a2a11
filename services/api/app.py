"""The read API and command gateway: `create_app(settings, api_keys)` wires the routes to a
PostgreSQL pool (and, for the gateway, to the command outbox and its relay).

Every route resolves the tenant from the bearer key first and reads only that tenant's rows, so
another tenant's campaign id answers 404 exactly like an unknown one. The dashboard page itself
holds no data and needs no key; its script sends the key as a header (see dashboard.html).

PostgreSQL unreachable: every route that needs it answers 503 with a JSON `detail` and a
`Retry-After` header (never a 500 with a stack trace); see services/api/gateway.py for what
that means for a command. The API starts only with its database reachable (the pool opens
before the first request is served).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import psycopg
from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, ConfigDict

from projections.segment_counts import CountsUnavailable, count_segment, segment_definitions
from schemas.base import EntityId
from services.api import queries
from services.api.auth import ApiKeys
from services.api.campaign_copies import copies_router
from services.api.campaign_cursor import MAX_CURSOR_LENGTH, CursorInvalid, decode_cursor, encode_cursor
from services.api.contacts import contacts_router
from services.api.deps import (
    TENANT_ERRORS,
    DbPool,
    ErrorDetail,
    PathId,
    Pool,
    Tenant,
    database_unavailable,
)
from services.api.engagement import engagement_router
from services.api.gateway import Schedule, gateway_router, schedule_out
from services.api.imports import imports_router
from services.api.lists import lists_router
from services.api.outbox import OutboxRelay
from services.api.segment_preview import preview_router
from services.api.sse import progress_events
from services.api.unsubscribe import unsubscribe_router
from services.common.heartbeat import BEAT_INTERVAL_SECONDS, Heartbeat
from services.common.settings import Settings
from services.console import console_router

DASHBOARD = Path(__file__).with_name("dashboard.html")
# Connections shared by all requests; a request holds one only for its few statements.
POOL_MAX_SIZE = 10
# How long a request waits for a free connection before failing (guards a stuck database).
POOL_TIMEOUT_S = 3.0
MAX_PAGE = 1000
# GET /campaigns: a page's default size, and its hard maximum (each campaign costs its rate
# and schedule look-ups).
DEFAULT_CAMPAIGN_PAGE = 100
MAX_CAMPAIGN_PAGE = 500


CampaignStatus = Literal["draft", "scheduled", "sending", "paused", "completed", "cancelled"]
RecipientStatus = Literal["excluded", "queued", "retrying", "sent", "failed", "skipped"]


class Campaign(BaseModel):
    """A campaign's progress; rates are recipients settled (sent, failed or skipped) per
    second. `total` is the queued audience (None until hydrated); `excluded` recipients were
    never part of it; `pending` = total - sent - failed - skipped, of which `retrying` wait for
    a retry; `ambiguous` counts possible duplicate mailings (connection lost after DATA).
    `schedule`: its scheduled send, if it was scheduled (a missed one returns the campaign to
    `draft`; `schedule.state` is then `missed` and `schedule.reason` says why)."""

    model_config = ConfigDict(frozen=True)

    campaign_id: str
    name: str | None
    status: CampaignStatus
    total: int | None
    queued: int
    sent: int
    failed: int
    pending: int | None
    percent: float | None
    started_at: datetime | None
    completed_at: datetime | None
    rate_last_minute: float | None
    average_rate: float | None
    eta_seconds: float | None
    eta_at: datetime | None
    as_of: datetime
    skipped: int
    excluded: int
    retrying: int
    ambiguous: int
    paused_at: datetime | None
    resumed_at: datetime | None
    pause_reason: str | None
    paused_automatically: bool | None
    cancelled_at: datetime | None
    # Hand-picked ids that named no contact of this tenant (the first 1,000, sorted) and how
    # many there were; None until hydrated.
    unknown_contact_ids: list[str] | None
    unknown_contact_count: int | None
    schedule: Schedule | None


class CampaignList(BaseModel):
    """A page of campaigns; `next_cursor`: pass it as `cursor` (with the same filters) for
    the next page; None on the last page."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "campaigns": [], "next_cursor": "eyJhdCI6bnVsbCwiaWQiOiJjbXAtMSIsImYiOltudWxsLG51bGxdfQ"}]})

    campaigns: list[Campaign]
    next_cursor: str | None = None


class Recipient(BaseModel):
    """A recipient's current status; `last_event_at` is the event time of that status."""

    contact_id: str
    email: str
    status: RecipientStatus
    attempts: int
    last_error: str | None
    updated_at: datetime
    ambiguous: int
    smtp_code: int | None
    reason: str | None
    last_event_at: datetime | None


class Attempt(BaseModel):
    attempt: int
    outcome: Literal["deferred", "sent", "failed"]
    smtp_code: int | None
    detail: str | None
    retry_at: datetime | None
    occurred_at: datetime | None


class RecipientDetail(BaseModel):
    """A recipient with every attempt: the deferred ones, then the terminal one."""

    recipient: Recipient
    attempts: list[Attempt]


class DailySends(BaseModel):
    day: date
    sent: int
    failed: int
    skipped: int


class DailySendsList(BaseModel):
    days: list[DailySends]


class SegmentCounts(BaseModel):
    """A segment of the tenant and how many contacts match it now (`as_of`). Each matching
    contact is in exactly one of: `mailable`, `deleted`, `suppressed`, `unsubscribed` (that
    precedence: a send to the segment would exclude it for that reason). A list-scoped
    unsubscribe does not count against a segment. `evaluated_in_python`: contacts whose values
    SQL could not read exactly as the hydrator does (decided by the Python evaluation)."""

    segment_id: str
    name: str
    criteria: dict[str, Any]
    defined_at: datetime
    changed_at: datetime
    matching: int
    mailable: int
    unsubscribed: int
    suppressed: int
    deleted: int
    evaluated_in_python: int
    as_of: datetime


class SegmentCountsList(BaseModel):
    segments: list[SegmentCounts]


class RecipientPage(BaseModel):
    recipients: list[Recipient]
    next_after: str | None  # pass as `after` for the next page; None on the last page


class Rejection(BaseModel):
    event_id: str
    command_id: str | None
    command_type: str | None
    reason: str
    occurred_at: datetime
    correlation_id: str


class RejectionList(BaseModel):
    rejections: list[Rejection]


def campaign_out(view: queries.CampaignView) -> Campaign:
    p = view.progress
    return Campaign(
        campaign_id=p.campaign_id,
        name=p.name,
        status=p.status,
        total=p.total,
        queued=p.queued,
        sent=p.sent,
        failed=p.failed,
        pending=p.pending,
        percent=view.percent,
        started_at=p.started_at,
        completed_at=p.completed_at,
        rate_last_minute=view.rate_last_minute,
        average_rate=view.average_rate,
        eta_seconds=view.eta_seconds,
        eta_at=view.eta_at,
        as_of=view.as_of,
        skipped=p.skipped,
        excluded=p.excluded,
        retrying=p.retrying,
        ambiguous=p.ambiguous,
        paused_at=p.paused_at,
        resumed_at=p.resumed_at,
        pause_reason=p.pause_reason,
        paused_automatically=p.paused_automatically,
        cancelled_at=p.cancelled_at,
        unknown_contact_ids=p.unknown_contact_ids,
        unknown_contact_count=p.unknown_contact_count,
        schedule=schedule_out(view.schedule),
    )


NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorDetail, "description": "No such campaign for this tenant"}}


def _not_found() -> HTTPException:
    return HTTPException(404, "campaign not found")


def _segments(pool: Pool, tenant: str, segment_id: str | None) -> list[SegmentCounts]:
    with queries.tenant_snapshot(pool, tenant) as conn:
        as_of = queries.snapshot_time(conn)
        found = []
        for definition in segment_definitions(conn, tenant, segment_id):
            counts = count_segment(conn, tenant, definition, as_of)
            found.append(SegmentCounts(
                segment_id=definition.segment_id, name=definition.name,
                criteria=definition.criteria.model_dump(mode="json"),
                defined_at=definition.defined_at, changed_at=definition.changed_at,
                matching=counts.matching, mailable=counts.mailable,
                unsubscribed=counts.unsubscribed, suppressed=counts.suppressed,
                deleted=counts.deleted, evaluated_in_python=counts.evaluated_in_python,
                as_of=as_of,
            ))
    return found


async def _beat(heartbeat: Heartbeat) -> None:
    """The API's heartbeat, from its event loop: it stops when that loop is stuck."""
    while True:
        heartbeat.beat()
        await asyncio.sleep(BEAT_INTERVAL_SECONDS)


def create_app(
    settings: Settings,
    api_keys: ApiKeys,
    *,
    relay: bool = True,
    unsubscribe_secret: bytes | None = None,
    pool_timeout: float = POOL_TIMEOUT_S,
) -> FastAPI:
    """The ASGI app; the connection pool and the command outbox relay (unless `relay` is
    False: another process publishes the outbox) start and stop with the app's lifespan.
    Without `unsubscribe_secret`, /unsubscribe answers 503. `pool_timeout`: how long a
    request waits for a database connection before its 503."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool: Pool = ConnectionPool(
            settings.database_url, min_size=1, max_size=POOL_MAX_SIZE, timeout=pool_timeout, open=False,
            # A connection the server dropped (restart, failover) is replaced before a request
            # gets it, instead of failing that request.
            check=ConnectionPool.check_connection,
        )
        await run_in_threadpool(pool.open, True, POOL_TIMEOUT_S)
        app.state.pool = pool
        app.state.relay = OutboxRelay(settings) if relay else None
        if app.state.relay is not None:
            app.state.relay.start()
        beating = asyncio.create_task(_beat(settings.heartbeat()))
        try:
            yield
        finally:
            beating.cancel()
            if app.state.relay is not None:
                await run_in_threadpool(app.state.relay.stop)
            await run_in_threadpool(pool.close)

    app = FastAPI(
        title="Campaign engine read API",
        version="1",
        description="Tenant-scoped progress of e-mail campaigns, from the projector's read models.",
        lifespan=lifespan,
    )
    app.state.api_keys = api_keys
    app.state.settings = settings
    app.state.unsubscribe_secret = unsubscribe_secret
    app.include_router(gateway_router)
    app.include_router(unsubscribe_router)
    app.include_router(contacts_router, responses=TENANT_ERRORS)
    app.include_router(lists_router, responses=TENANT_ERRORS)
    app.include_router(copies_router, responses=TENANT_ERRORS)
    app.include_router(preview_router, responses=TENANT_ERRORS)
    app.include_router(engagement_router, responses=TENANT_ERRORS)
    app.include_router(imports_router, responses=TENANT_ERRORS)  # CSV upload jobs and their runner
    app.include_router(console_router)  # the console for people: services/console

    @app.exception_handler(psycopg.OperationalError)
    async def on_database_unreachable(request: Request, exc: psycopg.OperationalError) -> JSONResponse:
        # Connection refused or lost, pool timeout, server shutting down: the request can be
        # retried as it is. Other database errors are bugs and stay 500s.
        return database_unavailable()

    dashboard_html = DASHBOARD.read_text(encoding="utf-8")
    # The tenant's reads: each needs the key and the database.
    reads = APIRouter(responses=TENANT_ERRORS)

    @reads.get("/campaigns", response_model=CampaignList, responses={
        422: {"description": "A bad filter, limit or cursor; `detail` says which and why"}})
    def get_campaigns(
        tenant: Tenant,
        pool: DbPool,
        status: Annotated[CampaignStatus | None, Query(description="Only this status")] = None,
        name: Annotated[str | None, Query(
            min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$",
            description="Only names containing this (case-insensitive)",
            openapi_examples={"spring": {"value": "spring"}})] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_CAMPAIGN_PAGE,
                                    description=f"At most this many (1-{MAX_CAMPAIGN_PAGE})")
                         ] = DEFAULT_CAMPAIGN_PAGE,
        cursor: Annotated[str | None, Query(
            max_length=MAX_CURSOR_LENGTH,
            description="`next_cursor` of the previous page (same filters)")] = None,
    ) -> CampaignList:
        """The tenant's campaigns, newest first, with progress, rates and ETA; filtered by
        status and name, in pages (keyset: campaigns created meanwhile do not shift pages)."""
        filters: list[str | None] = [status, name]
        try:
            after = decode_cursor(cursor, filters) if cursor is not None else None
        except CursorInvalid as exc:
            raise HTTPException(422, [{"loc": ["query", "cursor"], "msg": str(exc),
                                       "type": "value_error"}]) from None
        with queries.tenant_snapshot(pool, tenant) as conn:
            views, position = queries.campaign_page(conn, tenant, status=status,
                                                    name_contains=name, after=after, limit=limit)
        return CampaignList(campaigns=[campaign_out(v) for v in views],
                            next_cursor=encode_cursor(position, filters) if position else None)

    @reads.get("/campaigns/{campaign_id}", response_model=Campaign, responses=NOT_FOUND)
    def get_campaign(campaign_id: PathId, tenant: Tenant, pool: DbPool) -> Campaign:
        """One campaign's progress: counters, rate over the last minute, average rate, ETA."""
        with queries.tenant_snapshot(pool, tenant) as conn:
            view = queries.tenant_campaign(conn, tenant, campaign_id)
        if view is None:
            raise _not_found()
        return campaign_out(view)

    @reads.get("/campaigns/{campaign_id}/recipients", response_model=RecipientPage, responses=NOT_FOUND)
    def get_recipients(
        campaign_id: PathId,
        tenant: Tenant,
        pool: DbPool,
        status: Annotated[RecipientStatus | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        after: Annotated[EntityId | None, Query(description="contact_id to continue after")] = None,
    ) -> RecipientPage:
        """Recipients ordered by contact_id (keyset paging: pass `next_after` as `after`)."""
        with queries.tenant_snapshot(pool, tenant) as conn:
            if queries.campaign_progress(conn, campaign_id, tenant) is None:
                raise _not_found()
            rows, more = queries.recipients_page(
                conn, tenant, campaign_id, status=status, after=after, limit=limit
            )
        recipients = [Recipient(**_fields(r)) for r in rows]
        return RecipientPage(recipients=recipients, next_after=rows[-1].contact_id if more else None)

    @reads.get(
        "/campaigns/{campaign_id}/recipients/{contact_id}",
        response_model=RecipientDetail,
        responses={404: {"model": ErrorDetail,
                         "description": "No such recipient of this tenant's campaign"}},
    )
    def get_recipient(
        campaign_id: PathId, contact_id: PathId, tenant: Tenant, pool: DbPool
    ) -> RecipientDetail:
        """One recipient's status with the history of its attempts."""
        with queries.tenant_snapshot(pool, tenant) as conn:
            row = queries.recipient(conn, tenant, campaign_id, contact_id)
            history = queries.attempts(conn, tenant, campaign_id, contact_id) if row else []
        if row is None:
            raise HTTPException(404, "recipient not found")
        return RecipientDetail(
            recipient=Recipient(**_fields(row)), attempts=[Attempt(**_fields(a)) for a in history]
        )

    @reads.get("/daily-sends", response_model=DailySendsList)
    def get_daily_sends(
        tenant: Tenant,
        pool: DbPool,
        since: Annotated[date | None, Query(description="first UTC day, inclusive")] = None,
        until: Annotated[date | None, Query(description="last UTC day, inclusive")] = None,
    ) -> DailySendsList:
        """The tenant's sent, failed and skipped recipients per UTC day of the event."""
        with queries.tenant_snapshot(pool, tenant) as conn:
            rows = queries.daily_sends(conn, tenant, since, until)
        return DailySendsList(days=[DailySends(**_fields(r)) for r in rows])

    segment_errors: dict[int | str, dict[str, Any]] = {
        503: {"model": ErrorDetail,
              "description": "Database unreachable, or contacts projected before segment counts "
                             "existed (rebuild the projections)"},
    }

    @reads.get("/segments", response_model=SegmentCountsList, responses=segment_errors)
    def get_segments(tenant: Tenant, pool: DbPool) -> Any:
        """The tenant's segments (deleted ones left out), by id, each with how many of the
        tenant's contacts match it now and how many of those may be mailed."""
        try:
            return SegmentCountsList(segments=_segments(pool, tenant, None))
        except CountsUnavailable as exc:
            return JSONResponse({"detail": str(exc)}, status_code=503)

    @reads.get("/segments/{segment_id}", response_model=SegmentCounts,
             responses={404: {"model": ErrorDetail, "description": "No such segment for this tenant"},
                        **segment_errors})
    def get_segment(segment_id: PathId, tenant: Tenant, pool: DbPool) -> Any:
        """One segment with its counts (see GET /segments)."""
        try:
            found = _segments(pool, tenant, segment_id)
        except CountsUnavailable as exc:
            return JSONResponse({"detail": str(exc)}, status_code=503)
        if not found:
            raise HTTPException(404, "segment not found")
        return found[0]

    @reads.get("/campaigns/{campaign_id}/rejections", response_model=RejectionList, responses=NOT_FOUND)
    def get_rejections(campaign_id: PathId, tenant: Tenant, pool: DbPool) -> RejectionList:
        """Commands refused for this campaign, with the reason, oldest first. A campaign that
        was never created but had commands refused (e.g. a send for an unknown id) is found."""
        with queries.tenant_snapshot(pool, tenant) as conn:
            rows = queries.rejections(conn, tenant, campaign_id)
            if not rows and queries.campaign_progress(conn, campaign_id, tenant) is None:
                raise _not_found()
        return RejectionList(rejections=[Rejection(**_fields(r)) for r in rows])

    def _one(tenant: str, pool: Pool, campaign_id: str) -> list[dict[str, Any]]:
        with queries.tenant_snapshot(pool, tenant) as conn:
            view = queries.tenant_campaign(conn, tenant, campaign_id)
        return [] if view is None else [campaign_out(view).model_dump(mode="json")]

    def _all(tenant: str, pool: Pool) -> list[dict[str, Any]]:
        with queries.tenant_snapshot(pool, tenant) as conn:
            views = queries.tenant_campaigns(conn, tenant)
        return [campaign_out(v).model_dump(mode="json") for v in views]

    sse_doc: dict[int | str, dict[str, Any]] = {
        200: {"content": {"text/event-stream": {}}, "description": "SSE: `progress` events"},
    }

    @reads.get(
        "/campaigns/{campaign_id}/events",
        response_class=StreamingResponse,
        responses={**sse_doc, **NOT_FOUND},
    )
    async def campaign_events(
        campaign_id: PathId, request: Request, tenant: Tenant, pool: DbPool
    ) -> StreamingResponse:
        """Server-sent events: `progress` (a Campaign) whenever the numbers change, polled
        every 0.5 s, and a final `completed` once the campaign is completed or cancelled."""
        if not await run_in_threadpool(_one, tenant, pool, campaign_id):
            raise _not_found()

        async def poll() -> list[dict[str, Any]]:
            return await run_in_threadpool(_one, tenant, pool, campaign_id)

        return _sse(progress_events(poll, request.is_disconnected, end_when_terminal=True))

    @reads.get("/events", response_class=StreamingResponse, responses=sse_doc)
    async def tenant_events(request: Request, tenant: Tenant, pool: DbPool) -> StreamingResponse:
        """Server-sent `progress` events for every campaign of the tenant (new ones included);
        never ends by itself. The dashboard uses this one stream instead of one per campaign."""

        async def poll() -> list[dict[str, Any]]:
            return await run_in_threadpool(_all, tenant, pool)

        return _sse(progress_events(poll, request.is_disconnected, end_when_terminal=False))

    @app.get("/dashboard", response_class=HTMLResponse)
    def dashboard() -> HTMLResponse:
        """The live dashboard (static; open it as /dashboard#key=<API key>)."""
        return HTMLResponse(dashboard_html, headers={"Cache-Control": "no-cache"})

    app.include_router(reads)
    return app


def _sse(frames: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        frames,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _fields(row: Any) -> dict[str, Any]:
    return {name: getattr(row, name) for name in row.__slots__}
