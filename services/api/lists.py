"""The lists API: create, rename and delete a tenant's contact lists, and read them with
their member counts.

Guarantees:
- Writes are commands, never read-model rows: CreateList / RenameList / DeleteList are
  stored in the command outbox and published to campaign.commands like POST /commands
  (services/api/gateway.py `submit_command`); the 202 carries the command's `status_url`,
  where its outcome (accepted, or rejected with the reason: the list exists, is unknown, or
  was deleted) shows once the command handler decided and the projector applied it.
- Reads come from the read models (`analyst_lists`), scoped to the caller's tenant: another
  tenant's list answers 404 exactly like a missing one, and a command naming it is rejected
  as unknown (the handler keys lists by tenant + id).
- Deleting a list is final (schemas/lists.py): it leaves GET /lists, a send, schedule or
  exclusion naming it is rejected (a deleted list sends to nobody), its id is not reused,
  and its memberships stay on contacts.events as history.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from schemas.base import EntityId, Record
from schemas.envelope import wrap
from schemas.lists import CreateList, DeleteList, ListName, RenameList
from services.api import queries
from services.api.deps import DbPool, ErrorDetail, Tenant
from services.api.gateway import CommandAccepted, submit_command

lists_router = APIRouter(tags=["lists"])
ListPath = Annotated[EntityId, Path(description="A list id (the rule of every id: PathId)",
                                    openapi_examples={"newsletter": {"value": "newsletter"}})]

_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorDetail, "description": "No such list for this tenant (or deleted)"}}
_COMMAND: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorDetail, "description": "The body is not JSON"},
    409: {"model": ErrorDetail, "description": "The command id was already used for another command"},
    422: {"description": "Invalid input; `detail` lists each fault with its path"},
    503: {"model": ErrorDetail, "description": "The outbox (PostgreSQL) is unavailable; nothing"
                                               " was stored. Retry with the same command_id"},
}
_COMMAND_ID = Field(default=None, description="Makes a retried request idempotent",
                    examples=["7d3c7c2e-5f7e-4a53-9a1e-3f2b8d1c0a11"])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NewList(_Strict):
    list_id: EntityId = Field(examples=["newsletter"])
    name: ListName = Field(examples=["Monthly newsletter"])
    command_id: uuid.UUID | None = _COMMAND_ID


class ListRename(_Strict):
    name: ListName = Field(examples=["Newsletter (monthly)"])
    command_id: uuid.UUID | None = _COMMAND_ID


class ListView(BaseModel):
    """A list that is not deleted, with its members; `mailable` members are neither
    unsubscribed (from it or from everything), suppressed nor deleted. An implicit list
    (named by memberships only, never created) has no `name` or `created_at`."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "list_id": "newsletter", "name": "Monthly newsletter",
        "created_at": "2030-03-01T09:00:00Z", "members": 1200, "mailable": 1150,
        "unsubscribed": 40, "suppressed": 10}]})

    list_id: str
    name: str | None
    created_at: datetime | None
    members: int
    mailable: int
    unsubscribed: int
    suppressed: int


class ListViews(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"lists": [
        {"list_id": "newsletter", "name": "Monthly newsletter",
         "created_at": "2030-03-01T09:00:00Z", "members": 1200, "mailable": 1150,
         "unsubscribed": 40, "suppressed": 10},
        {"list_id": "vip", "name": None, "created_at": None, "members": 12, "mailable": 12,
         "unsubscribed": 0, "suppressed": 0}]}]})

    lists: list[ListView]


def _view(row: queries.ListRow) -> ListView:
    return ListView(list_id=row.list_id, name=row.name, created_at=row.created_at,
                    members=row.members, mailable=row.mailable, unsubscribed=row.unsubscribed,
                    suppressed=row.suppressed)


async def _command(request: Request, tenant: str, pool: Any, list_id: str, payload: Record,
                   command_id: uuid.UUID | None) -> CommandAccepted | JSONResponse:
    envelope = wrap(payload, tenant_id=tenant, aggregate_id=list_id, message_id=command_id)
    return await submit_command(envelope, request, tenant, pool)


@lists_router.get("/lists", response_model=ListViews)
def get_lists(tenant: Tenant, pool: DbPool) -> ListViews:
    """The tenant's lists (created and implicit; deleted ones left out), by id, with counts."""
    with queries.tenant_snapshot(pool, tenant) as conn:
        rows = queries.tenant_lists(conn, tenant)
    return ListViews(lists=[_view(r) for r in rows])


@lists_router.get("/lists/{list_id}", response_model=ListView, responses=_NOT_FOUND)
def get_list(list_id: ListPath, tenant: Tenant, pool: DbPool) -> ListView:
    """One list with its counts."""
    with queries.tenant_snapshot(pool, tenant) as conn:
        rows = queries.tenant_lists(conn, tenant, list_id)
    if not rows:
        raise HTTPException(404, "list not found")
    return _view(rows[0])


@lists_router.post("/lists", status_code=202, response_model=CommandAccepted, responses=_COMMAND)
async def create_list(body: NewList, request: Request, tenant: Tenant,
                      pool: DbPool) -> CommandAccepted | JSONResponse:
    """CreateList: a new list, or a name for an implicit one (its members stay). Rejected
    when the list exists or was deleted (ids are not reused)."""
    return await _command(request, tenant, pool, body.list_id,
                          CreateList(list_id=body.list_id, name=body.name), body.command_id)


@lists_router.patch("/lists/{list_id}", status_code=202, response_model=CommandAccepted,
                    responses=_COMMAND)
async def rename_list(list_id: ListPath, body: ListRename, request: Request, tenant: Tenant,
                      pool: DbPool) -> CommandAccepted | JSONResponse:
    """RenameList; rejected when the list is unknown (never created, deleted, another
    tenant's)."""
    return await _command(request, tenant, pool, list_id,
                          RenameList(list_id=list_id, name=body.name), body.command_id)


@lists_router.delete("/lists/{list_id}", status_code=202, response_model=CommandAccepted,
                     responses=_COMMAND)
async def delete_list(
    list_id: ListPath, request: Request, tenant: Tenant, pool: DbPool,
    command_id: Annotated[uuid.UUID | None, Query(description="Makes a retry idempotent")] = None,
) -> CommandAccepted | JSONResponse:
    """DeleteList, for good: later sends naming the list are rejected; campaigns already
    sending keep the audience fixed when they started; the id is never reused."""
    return await _command(request, tenant, pool, list_id, DeleteList(list_id=list_id),
                          command_id)
