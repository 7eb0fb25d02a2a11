"""POST /campaigns/{id}/duplicate: a convenience route for the DuplicateCampaign command.

Guarantee: exactly what POST /commands does with `{"type": "DuplicateCampaign",
"aggregate_id": <new id>, "payload": {"source_campaign_id": <id>, "name": ...}}` (stored in
the outbox, then published; see services/api/gateway.py), plus the new campaign's id, drawn
when the caller gives none. The outcome (CampaignCreated, or the rejection: unknown source,
another tenant's source, the new id taken) is at `status_url`.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from schemas.base import EntityId
from schemas.commands import DuplicateCampaign
from schemas.envelope import wrap
from services.api.deps import DbPool, ErrorDetail, PathId, Tenant
from services.api.gateway import CommandAccepted, submit_command

copies_router = APIRouter(tags=["campaigns"])


class DuplicateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    new_campaign_id: EntityId | None = Field(
        default=None, description="The copy's id (default: drawn)", examples=["cmp-autumn"])
    name: str | None = Field(default=None, min_length=1, max_length=200,
                             description='Default: the source\'s name + " (copy)"',
                             examples=["Autumn newsletter"])
    command_id: uuid.UUID | None = Field(default=None,
                                         description="Makes a retried request idempotent")


class DuplicateAccepted(CommandAccepted):
    """The command's acceptance and the id the copy will have."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "command_id": "7d3c7c2e-5f7e-4a53-9a1e-3f2b8d1c0a11", "status": "published",
        "status_url": "/commands/7d3c7c2e-5f7e-4a53-9a1e-3f2b8d1c0a11",
        "campaign_id": "cmp-autumn"}]})

    campaign_id: str


_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorDetail, "description": "The body is not JSON"},
    409: {"model": ErrorDetail, "description": "The command id was already used for another command"},
    422: {"description": "Invalid input; `detail` lists each fault with its path"},
}


@copies_router.post("/campaigns/{campaign_id}/duplicate", status_code=202,
                    response_model=DuplicateAccepted, responses=_RESPONSES)
async def duplicate_campaign(campaign_id: PathId, body: DuplicateRequest, request: Request,
                             tenant: Tenant, pool: DbPool) -> DuplicateAccepted | JSONResponse:
    """Copy a campaign's content and tracking flags into a new draft (DuplicateCampaign)."""
    copy_id = body.new_campaign_id or f"cmp-{uuid.uuid4().hex[:12]}"
    envelope = wrap(DuplicateCampaign(source_campaign_id=campaign_id, name=body.name),
                    tenant_id=tenant, aggregate_id=copy_id, message_id=body.command_id)
    accepted = await submit_command(envelope, request, tenant, pool)
    if isinstance(accepted, JSONResponse):
        return accepted
    return DuplicateAccepted(**accepted.model_dump(), campaign_id=copy_id)
