"""POST /segments/preview: how many of the tenant's contacts match criteria now, before a
segment is defined (the console's audience picker, an upstream service checking a filter).

Guarantees:
- The figures are exactly those GET /segments gives for a segment with these criteria
  (projections/segment_counts.py `count_segment`: SQL, with the Python evaluation for what
  SQL cannot decide), within one read-only snapshot of the caller's tenant only.
- Invalid criteria answer 422 with one fault per path (`["body", "criteria", "conditions",
  1, "value"]`), before any query runs.
- Bounded: every statement of the count runs under PREVIEW_TIMEOUT_S (PostgreSQL's
  statement_timeout, lock waits included); beyond it the answer is a 503 saying so, never a
  request left hanging on a large tenant or a locked table.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from projections.segment_counts import CountsUnavailable, SegmentDefinition, count_segment
from schemas.segments import Criteria, InvalidCriteria, error_paths, parse_criteria
from services.api import queries
from services.api.deps import DbPool, ErrorDetail, Pool, Tenant

# The longest any statement of a preview may run: a count that takes longer on a very large
# tenant (or waits on a lock) is cut off and answered 503 instead of holding the request and
# a pooled connection.
PREVIEW_TIMEOUT_S = 5.0

preview_router = APIRouter(tags=["segments"])
_CRITERIA: TypeAdapter[Criteria] = TypeAdapter(Criteria)


class PreviewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "criteria": {"op": "all", "conditions": [
            {"op": "eq", "field": "attr.plan", "value": "pro"},
            {"op": "in_list", "list_id": "newsletter"}]}}]})

    criteria: Any = Field(description="A criteria expression (see DefineSegment)")


class SegmentPreview(BaseModel):
    """Contacts matching the criteria now (`as_of`), split as GET /segments splits them."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "matching": 120, "mailable": 110, "unsubscribed": 6, "suppressed": 3, "deleted": 1,
        "evaluated_in_python": 0, "as_of": "2030-03-01T09:00:00Z"}]})

    matching: int
    mailable: int
    unsubscribed: int
    suppressed: int
    deleted: int
    evaluated_in_python: int
    as_of: datetime


def _faults(data: Any) -> list[dict[str, Any]]:
    """FastAPI-style faults, one per path, of criteria parse_criteria refused."""
    try:
        _CRITERIA.validate_python(data)
    except ValidationError as exc:
        faults = []
        for line in error_paths(exc):
            path, _, msg = line.partition(": ")
            loc: list[str | int] = [] if path == "(root)" else [
                int(p) if p.isdigit() else p for p in path.split(".")]
            faults.append({"loc": ["body", "criteria", *loc], "msg": msg, "type": "value_error"})
        return faults
    return []


def _count(pool: Pool, tenant: str, criteria: Criteria) -> SegmentPreview:
    with queries.tenant_snapshot(pool, tenant) as conn:
        conn.execute("SELECT set_config('statement_timeout', %s, true)",
                     (f"{int(PREVIEW_TIMEOUT_S * 1000)}ms",))
        now = queries.snapshot_time(conn)
        counts = count_segment(conn, tenant, SegmentDefinition("preview", "", criteria, now, now),
                               now)
    return SegmentPreview(matching=counts.matching, mailable=counts.mailable,
                          unsubscribed=counts.unsubscribed, suppressed=counts.suppressed,
                          deleted=counts.deleted, evaluated_in_python=counts.evaluated_in_python,
                          as_of=now)


@preview_router.post("/segments/preview", response_model=SegmentPreview, responses={
    400: {"model": ErrorDetail, "description": "The body is not JSON"},
    422: {"description": "Invalid criteria; `detail` lists each fault with its path"},
    503: {"model": ErrorDetail, "description": "Database unreachable, the count exceeded its "
                                               "time bound, or profiles are missing"}})
async def preview_segment(body: PreviewRequest, tenant: Tenant, pool: DbPool) -> Any:
    """The live count of the tenant's contacts matching `criteria` (nothing is stored)."""
    try:
        criteria = parse_criteria(body.criteria)
    except InvalidCriteria as exc:
        faults = _faults(body.criteria) or [
            {"loc": ["body", "criteria"], "msg": str(exc), "type": "value_error"}]
        return JSONResponse({"detail": faults}, status_code=422)
    try:
        return await run_in_threadpool(_count, pool, tenant, criteria)
    except psycopg.errors.QueryCanceled:
        return JSONResponse({"detail": f"the count took longer than {PREVIEW_TIMEOUT_S:g} s; "
                                       "narrow the criteria or retry later"},
                            status_code=503, headers={"Retry-After": "30"})
    except CountsUnavailable as exc:
        return JSONResponse({"detail": str(exc)}, status_code=503)
