"""The command gateway: upstream services POST commands over HTTP and follow their outcome.

Guarantee: a 202 means the command is stored in the PostgreSQL outbox (services/api/outbox.py)
and will reach campaign.commands, in order, whatever Kafka is doing; a 4xx means nothing was
stored. A command id sent again with the same command is accepted again without a second copy
(idempotent retries); with a different command it is a 409. The outcome is read from the read
models: the events the command caused (accepted) or its CommandRejected reason (rejected).

PostgreSQL unreachable: POST /commands answers 503 with `Retry-After`, a JSON `detail` and the
`command_id`, and publishes nothing, even when Kafka is up. Publishing straight to Kafka would
break both other promises: the outbox may hold earlier, unpublished commands of the same
campaign (accepted during a Kafka outage) that this one would overtake, and with no stored
row a retry of the same command id could not be recognised and would be published again.
The 503 can be ambiguous only when the connection drops during the commit: the row may then
be stored. Retrying with the same `command_id` (the one in the 503 body when the caller sent
none) is always safe: it is accepted once, never twice. A 202 for a stored command whose
publication could not be checked (the database went away after the commit) says `pending`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, Literal

import psycopg
from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from projections.schedules import CampaignSchedule, ScheduleState, campaign_schedules, command_outcome
from schemas.envelope import Envelope
from services.api import outbox, queries
from services.api.commands import CommandInvalid, CommandRequest, build_envelope
from services.api.deps import DB_RETRY_AFTER_S, TENANT_ERRORS, DbPool, ErrorDetail, Pool, Tenant
from services.api.sse import RECONNECT_MS, format_event
from services.common.settings import Settings
from services.common.topics import COMMANDS, topic_name

# How long a POST waits for the relay to publish before answering "pending": long enough for
# a healthy broker's acknowledgement, short enough that an outage does not hold callers.
PUBLISH_WAIT_S = 2.0
PUBLISH_POLL_S = 0.05
# How often the outcome stream looks at the read models.
OUTCOME_POLL_S = 0.5

CommandState = Literal["pending", "published", "accepted", "rejected"]
FINAL_STATES = frozenset({"accepted", "rejected"})

gateway_router = APIRouter(tags=["commands"], responses=TENANT_ERRORS)


class CommandAccepted(BaseModel):
    """`pending`: stored, not yet on Kafka (it is unreachable); `published`: on the topic."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "command_id": "7d3c7c2e-5f7e-4a53-9a1e-3f2b8d1c0a11", "status": "published",
        "status_url": "/commands/7d3c7c2e-5f7e-4a53-9a1e-3f2b8d1c0a11"}]})

    command_id: uuid.UUID
    status: Literal["pending", "published"]
    status_url: str


class Schedule(BaseModel):
    """A scheduled send: `scheduled` (waiting for `send_at`), `missed` (found too late, or its
    audience no longer valid: not sent, `reason` says why; ForceScheduledSend sends it),
    `fired` (the send started; a forced miss keeps `missed_at` and `reason`) or `cancelled`."""

    send_at: datetime
    state: ScheduleState
    missed_at: datetime | None
    reason: str | None


def schedule_out(schedule: CampaignSchedule | None) -> Schedule | None:
    if schedule is None:
        return None
    return Schedule(send_at=schedule.send_at, state=schedule.state, missed_at=schedule.missed_at,
                    reason=schedule.reason)


class CausedEvent(BaseModel):
    """`caused_by`: set on what the command's schedule caused later (the CampaignScheduled
    event's id), e.g. the CampaignScheduleMissed of a schedule found too late."""

    event_id: str
    type: str
    occurred_at: datetime
    caused_by: str | None


class CommandStatus(BaseModel):
    """Where a command stands: pending (in the outbox) -> published (on campaign.commands) ->
    accepted (it caused `events`) or rejected (with `reason`). An accepted ScheduleCampaign
    carries its `schedule`: whether it is still waiting, fired, was cancelled, or was missed
    and why; `events` then include what the schedule caused."""

    command_id: uuid.UUID
    status: CommandState
    type: str | None
    aggregate_id: str | None
    accepted_at: datetime | None
    published_at: datetime | None
    events: list[CausedEvent]
    reason: str | None
    schedule: Schedule | None


def is_settled(status: CommandStatus) -> bool:
    """Nothing more will come of the command: rejected, or accepted and, for a schedule, it
    fired, was missed or was cancelled."""
    waiting = status.schedule is not None and status.schedule.state == "scheduled"
    return status.status in FINAL_STATES and not waiting


def _status(pool: Pool, tenant: str, command_id: uuid.UUID) -> CommandStatus | None:
    with queries.tenant_snapshot(pool, tenant) as conn:
        entry = outbox.entry_of(conn, tenant, command_id)
        events, reason = command_outcome(conn, tenant, str(command_id))
        # A schedule this command made (one at most: a campaign is scheduled once).
        scheduled = [e.aggregate_id for e in events
                     if e.type == "CampaignScheduled" and e.caused_by is None][:1]
        schedule = next(iter(campaign_schedules(conn, tenant, scheduled).values()), None)
    if entry is None and not events and reason is None:
        return None
    state: CommandState
    if reason is not None:
        state = "rejected"
    elif any(e.type != "CommandRejected" for e in events):
        state = "accepted"
    elif entry is None or entry.published_at is not None:
        state = "published"
    else:
        state = "pending"
    return CommandStatus(
        command_id=command_id, status=state,
        type=entry.command_type if entry else None,
        aggregate_id=entry.aggregate_id if entry else (events[0].aggregate_id if events else None),
        accepted_at=entry.accepted_at if entry else None,
        published_at=entry.published_at if entry else None,
        events=[CausedEvent(event_id=e.event_id, type=e.type, occurred_at=e.occurred_at,
                            caused_by=e.caused_by) for e in events],
        reason=reason,
        schedule=schedule_out(schedule),
    )


def _accept(pool: Pool, settings: Settings, envelope: Any) -> outbox.OutboxEntry:
    with pool.connection() as conn:
        return outbox.accept(conn, envelope, topic_name(COMMANDS, settings))


def _wait_published(pool: Pool, tenant: str, command_id: uuid.UUID) -> bool:
    deadline = time.monotonic() + PUBLISH_WAIT_S
    while True:
        with pool.connection() as conn:
            entry = outbox.entry_of(conn, tenant, command_id)
        if entry is not None and entry.published_at is not None:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(PUBLISH_POLL_S)


_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorDetail, "description": "No such command for this tenant"}}


@gateway_router.post(
    "/commands",
    status_code=202,
    response_model=CommandAccepted,
    responses={
        400: {"model": ErrorDetail, "description": "The body is not JSON"},
        409: {"model": ErrorDetail, "description": "The command id was already used for another command"},
        422: {"description": "Not a valid command; `detail` lists each fault with its path"},
        503: {"description": "The outbox (PostgreSQL) is unavailable; nothing was published. "
                             "Retry with the same command_id after Retry-After seconds"},
    },
)
async def post_command(body: CommandRequest, request: Request, tenant: Tenant,
                       pool: DbPool) -> Any:
    """Validate a command against its schema, store it in the outbox and publish it to
    campaign.commands (keyed by `aggregate_id`); returns its command id. Follow the outcome
    at `status_url` (poll) or `status_url + "/events"` (server-sent events)."""
    try:
        envelope = build_envelope(body, tenant)
    except CommandInvalid as exc:
        return JSONResponse({"detail": exc.errors}, status_code=422)
    return await submit_command(envelope, request, tenant, pool)


async def submit_command(envelope: Envelope, request: Request, tenant: str,
                         pool: Pool) -> CommandAccepted | JSONResponse:
    """Store a built command envelope in the outbox and wait (briefly) for its publication:
    the one way a route sends a command (POST /commands and the convenience routes)."""
    settings: Settings = request.app.state.settings
    try:
        await run_in_threadpool(_accept, pool, settings, envelope)
    except outbox.CommandIdConflict as exc:
        raise HTTPException(409, str(exc)) from None
    except psycopg.Error as exc:
        return JSONResponse(
            {"detail": f"the command outbox (database) is unavailable ({type(exc).__name__}); "
                       "retry later with the same command_id",
             "command_id": str(envelope.id)},
            status_code=503, headers={"Retry-After": str(DB_RETRY_AFTER_S)})
    relay = request.app.state.relay
    if relay is not None:
        relay.wake()
    try:
        published = await run_in_threadpool(_wait_published, pool, tenant, envelope.id)
    except psycopg.OperationalError:
        published = False  # stored (committed above); only its publication is not known here
    return CommandAccepted(command_id=envelope.id, status="published" if published else "pending",
                           status_url=f"/commands/{envelope.id}")


@gateway_router.get("/commands/{command_id}", response_model=CommandStatus, responses=_NOT_FOUND)
def get_command(command_id: uuid.UUID, tenant: Tenant, pool: DbPool) -> CommandStatus:
    """Where a command stands, with the events it caused or the reason it was rejected."""
    status = _status(pool, tenant, command_id)
    if status is None:
        raise HTTPException(404, "command not found")
    return status


@gateway_router.get(
    "/commands/{command_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "SSE: a `status` event (a CommandStatus) per change"},
               **_NOT_FOUND},
)
async def command_events(command_id: uuid.UUID, request: Request, tenant: Tenant,
                         pool: DbPool) -> StreamingResponse:
    """Server-sent `status` events whenever the command's status (or what it caused) changes;
    the stream ends once it is rejected, or accepted and, for a ScheduleCampaign, once the
    schedule fired, was missed (with the reason) or was cancelled."""
    if await run_in_threadpool(_status, pool, tenant, command_id) is None:
        raise HTTPException(404, "command not found")

    async def frames() -> AsyncIterator[str]:
        yield f"retry: {RECONNECT_MS}\n\n"
        last: dict[str, Any] | None = None
        event_id = 0
        while not await request.is_disconnected():
            status = await run_in_threadpool(_status, pool, tenant, command_id)
            body = None if status is None else status.model_dump(mode="json")
            if status is not None and body is not None and body != last:
                last, event_id = body, event_id + 1
                yield format_event("status", body, event_id)
                if is_settled(status):
                    return
            await asyncio.sleep(OUTCOME_POLL_S)

    return StreamingResponse(frames(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
