"""Request dependencies shared by the API's routers: the caller's tenant and the pool."""

from __future__ import annotations

from typing import Annotated, Any

import psycopg
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg_pool import ConnectionPool

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


def _pool(request: Request) -> Pool:
    pool: Pool = request.app.state.pool
    return pool


Tenant = Annotated[str, Depends(_tenant)]
DbPool = Annotated[Pool, Depends(_pool)]
