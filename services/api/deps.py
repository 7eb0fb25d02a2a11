"""Request dependencies shared by the API's routers: the caller's tenant, the pool, and the
one rule for every id a path or a query names.

Guarantee: a route that takes its ids as `PathId` / `QueryId` never passes a value to SQL that
is not a valid entity id (schemas.base.EntityId: the ids every event carries); anything else
(a control character, a NUL PostgreSQL text cannot hold, a space, 200 characters) is answered
422 with the parameter's location and the pattern it breaks, before any query runs.
"""

from __future__ import annotations

from typing import Annotated, Any

import psycopg
from fastapi import Depends, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg_pool import ConnectionPool
from pydantic import BaseModel

from schemas.base import EntityId
from services.api.auth import ApiKeys

Pool = ConnectionPool[psycopg.Connection[Any]]

_bearer = HTTPBearer(auto_error=False, description="A tenant's API key")


def _tenant(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    keys: ApiKeys = request.app.state.api_keys
    tenant = keys.tenant_for(credentials.credentials) if credentials else None
    if tenant is None:
        raise HTTPException(401, "missing or unknown API key", headers={"WWW-Authenticate": "Bearer"})
    return tenant


def pool_of(request: Request) -> Pool:
    """The app's read-model connection pool (the console shares it)."""
    pool: Pool = request.app.state.pool
    return pool


Tenant = Annotated[str, Depends(_tenant)]
DbPool = Annotated[Pool, Depends(pool_of)]

# Ids of campaigns, contacts, segments: the same pattern as the events that name them, so an
# id that no event could carry is refused up front instead of reaching PostgreSQL.
_ID_DOC = "An id: a letter or digit, then up to 127 of letters, digits, '_', '.', ':', '-'"
PathId = Annotated[EntityId, Path(description=_ID_DOC)]
QueryId = Annotated[EntityId | None, Query(description=_ID_DOC)]


# What a 503 (database unreachable) tells callers to wait before retrying: about the time a
# restarting PostgreSQL needs, and the pool's first reconnection attempts.
DB_RETRY_AFTER_S = 5


def database_unavailable() -> JSONResponse:
    """The answer to any request that needed PostgreSQL while it was unreachable."""
    return JSONResponse(
        {"detail": "the database is unavailable; retry later"}, status_code=503,
        headers={"Retry-After": str(DB_RETRY_AFTER_S)},
    )


class ErrorDetail(BaseModel):
    """The body of every error the API answers itself (422 lists faults, see FastAPI)."""

    detail: str


# What every route that needs the key and the database may answer besides its own results.
TENANT_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorDetail, "description": "Missing or unknown API key"},
    503: {"model": ErrorDetail,
          "description": "The database is unreachable; retry after `Retry-After` seconds"},
}
