"""CSV imports by upload: POST /imports stores the file and answers 202 with a job id; the
API process's import runner (services/imports/runner.py) streams it onto contacts.events;
GET /imports/{id} shows its state, progress and rejected-rows report; GET /imports lists them.

Guarantees:
- A 202 means stored: the upload is in PostgreSQL (services/imports/job_store.py) before the
  answer, so neither a crash of the API nor a Kafka outage loses it; it is imported exactly
  as `campaignctl contacts import` would (same columns, modes, rejections, idempotence).
- An upload over MAX_UPLOAD_BYTES is refused with 413 (the body is not read past the limit);
  a file without a usable header, a bad list id or mode, or a blocklist with a list is a 422
  with the reason, and nothing is stored.
- Jobs are the caller's tenant's: another tenant's job is a 404, like an unknown one.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, Literal

import psycopg
from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from services.api import queries
from services.api.deps import DbPool, ErrorDetail, PathId, Pool, QueryId, Tenant, database_unavailable
from services.cli.contact_csv import CsvImportError, numbered_rows
from services.common.topics import CONTACTS, topic_name
from services.imports import job_store
from services.imports.job_store import ImportJob
from services.imports.runner import ImportRunner

# The largest upload stored: about 500,000 typical rows, and what one API process may hold
# in memory for a request (the body is stored in one statement).
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
# The header is checked before storing; a line longer than this is no header.
MAX_HEADER_BYTES = 64 * 1024
CSV_MEDIA_TYPES = ("text/csv", "application/csv", "text/plain", "application/octet-stream")

@asynccontextmanager
async def _running(app: FastAPI) -> AsyncIterator[None]:
    """The API process's import runner lives as long as the app (one per process)."""
    runner = ImportRunner(app.state.settings)
    app.state.import_runner = runner
    runner.start()
    try:
        yield
    finally:
        await run_in_threadpool(runner.stop)


imports_router = APIRouter(tags=["imports"], lifespan=_running)

ImportModeParam = Literal["upsert", "skip-existing", "blocklist"]


class RejectedRowOut(BaseModel):
    line: int
    reason: str


class ImportJobOut(BaseModel):
    """An import job. `state`: queued (stored, waiting; also while waiting out a Kafka outage,
    see `last_error`), running, done or failed (`failure` says why). `rows_done` counts rows
    read by the current run, of `rows_total` (lines after the header). Once done: `imported`,
    `skipped` (skip-existing), `rejected_count` and `rejected`, the first 1,000 rejected rows
    with their line and reason."""

    job_id: str
    list_id: str | None
    mode: str
    state: Literal["queued", "running", "done", "failed"]
    bytes: int
    rows_total: int
    rows_done: int
    percent: float
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    imported: int | None
    skipped: int | None
    rejected_count: int | None
    rejected: list[RejectedRowOut]
    last_error: str | None
    failure: str | None


class ImportJobList(BaseModel):
    jobs: list[ImportJobOut]


class ImportAccepted(BaseModel):
    job_id: str
    state: Literal["queued"]
    location: str


def job_out(job: ImportJob) -> ImportJobOut:
    done = job.state == "done"
    percent = 100.0 if done else (min(99.0, 100.0 * job.rows_done / job.rows_total)
                                  if job.rows_total else 0.0)
    return ImportJobOut(
        job_id=job.job_id, list_id=job.list_id, mode=job.mode, state=job.state,
        bytes=job.byte_count, rows_total=job.rows_total, rows_done=job.rows_done,
        percent=round(percent, 1), attempts=job.attempts, created_at=job.created_at,
        started_at=job.started_at, finished_at=job.finished_at, imported=job.imported,
        skipped=job.skipped, rejected_count=job.rejected_count,
        rejected=[RejectedRowOut(**r) for r in job.rejected], last_error=job.last_error,
        failure=job.failure)


class UploadRefused(Exception):
    """An upload that is not stored: `status` and `reason` are the answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def check_upload(body: bytes, list_id: str | None, mode: str) -> None:
    """Refuse (UploadRefused 422) what the import would refuse whole, before it is stored."""
    if mode == "blocklist" and list_id:
        raise UploadRefused(422, "a blocklist import adds no list memberships: give no list_id")
    first = body[:MAX_HEADER_BYTES].split(b"\n", 1)[0]
    try:
        numbered_rows(io.StringIO(first.decode("utf-8", errors="surrogateescape"), newline=""))
    except CsvImportError as exc:
        raise UploadRefused(422, str(exc)) from None


async def read_upload(request: Request, limit: int = MAX_UPLOAD_BYTES) -> bytes:
    """The request body, refused (UploadRefused 413) as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise UploadRefused(413, f"the upload is {int(declared)} bytes; the limit is {limit}"
                                 " bytes: split the file")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise UploadRefused(413, f"the upload is over the limit of {limit} bytes: split the file")
        chunks.append(chunk)
    return b"".join(chunks)


def _accept(pool: Pool, topic: str, tenant: str, list_id: str | None, mode: str,
            body: bytes) -> str:
    with pool.connection() as conn:
        return job_store.accept(conn, topic, tenant, list_id, mode, body)


async def store_upload(request: Request, pool: Pool, tenant: str, list_id: str | None,
                       mode: str, body: bytes) -> str:
    """Check and store an upload, wake the runner; the job id. UploadRefused when refused;
    psycopg.Error when the database is away (nothing stored)."""
    check_upload(body, list_id, mode)
    topic = topic_name(CONTACTS, request.app.state.settings)
    job_id = await run_in_threadpool(_accept, pool, topic, tenant, list_id, mode, body)
    runner: ImportRunner | None = getattr(request.app.state, "import_runner", None)
    if runner is not None:
        runner.wake()
    return job_id


def _refused(exc: UploadRefused) -> JSONResponse:
    return JSONResponse({"detail": exc.reason}, status_code=exc.status)


@imports_router.post(
    "/imports", status_code=202, response_model=ImportAccepted,
    openapi_extra={"requestBody": {"required": True, "content": {"text/csv": {
        "schema": {"type": "string"},
        "example": "email,first_name,plan\nada@example.org,Ada,pro\n"}}}},
    responses={
        413: {"model": ErrorDetail, "description": "Larger than 32 MiB; nothing was stored"},
        415: {"model": ErrorDetail, "description": "Not a CSV body"},
        422: {"description": "No usable header, bad list_id or mode; nothing was stored"},
        503: {"model": ErrorDetail, "description": "PostgreSQL unavailable; nothing was stored"},
    })
async def upload_import(
    request: Request, tenant: Tenant, pool: DbPool,
    list_id: QueryId = None,
    mode: Annotated[ImportModeParam, Query(description="upsert, skip-existing or blocklist")] = "upsert",
) -> ImportAccepted | JSONResponse:
    """Import a CSV file (the body, `text/csv`) as an asynchronous job: the columns and modes
    of `campaignctl contacts import`; every contact joins `list_id` when given. Poll the
    job at `location`."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in CSV_MEDIA_TYPES:
        return JSONResponse({"detail": f"send the CSV file as text/csv, not {media or 'nothing'}"},
                            status_code=415)
    try:
        body = await read_upload(request)
        job_id = await store_upload(request, pool, tenant, list_id, mode, body)
    except UploadRefused as exc:
        return _refused(exc)
    except psycopg.Error:
        return database_unavailable()
    return ImportAccepted(job_id=job_id, state="queued", location=f"/imports/{job_id}")


_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorDetail, "description": "No such import job for this tenant"}}


@imports_router.get("/imports", response_model=ImportJobList)
def list_imports(tenant: Tenant, pool: DbPool) -> ImportJobList:
    """The tenant's latest 100 import jobs, newest first."""
    with queries.tenant_snapshot(pool, tenant) as conn:
        return ImportJobList(jobs=[job_out(j) for j in job_store.jobs(conn, tenant)])


@imports_router.get("/imports/{job_id}", response_model=ImportJobOut, responses=_NOT_FOUND)
def get_import(job_id: PathId, tenant: Tenant, pool: DbPool) -> ImportJobOut:
    """One import job: state, progress and the rejected-rows report."""
    with queries.tenant_snapshot(pool, tenant) as conn:
        found = job_store.job(conn, tenant, job_id)
    if found is None:
        raise HTTPException(404, "import job not found")
    return job_out(found)
