"""The console's CSV import pages: an upload form, the tenant's jobs, and a job's page with a
progress bar (polled with htmx until the job ends) and its rejected-rows report.

Guarantees: the upload takes the same path as POST /imports (services/api/imports.py: the
same checks, limit and reasons, stored before the answer), after the form's CSRF token is
checked; a job of another tenant is a 404 like an unknown one.
"""

from __future__ import annotations

from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import HTTP
from typing import cast

import psycopg
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from services.api import queries
from services.api.deps import database_unavailable, pool_of
from services.api.imports import (
    MAX_UPLOAD_BYTES,
    UploadRefused,
    job_out,
    read_upload,
    store_upload,
)
from services.console.routes import _ENTITY_ID, _require, _signer, page
from services.console.session import CSRF_COOKIE
from services.imports import job_store

# Form fields around the file (boundaries, the other fields) are small; this allows for them.
FORM_OVERHEAD_BYTES = 64 * 1024
MODES = ("upsert", "skip-existing", "blocklist")

import_pages: APIRouter = APIRouter()


def _form_parts(content_type: str, body: bytes) -> dict[str, bytes]:
    """The fields of a multipart/form-data body, by name (the stdlib's MIME parser: no
    form library needed for one form)."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = cast(EmailMessage, BytesParser(policy=HTTP).parsebytes(head + body))
    if not message.is_multipart():
        return {}
    fields: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str) and name not in fields:
            payload = part.get_payload(decode=True)
            fields[name] = payload if isinstance(payload, bytes) else b""
    return fields


def _text(fields: dict[str, bytes], name: str) -> str:
    return fields.get(name, b"").decode("utf-8", errors="replace").strip()


def _jobs_page(request: Request, tenant: str, status_code: int = 200, error: str | None = None,
               values: dict[str, str] | None = None) -> Response:
    with queries.tenant_snapshot(pool_of(request), tenant) as conn:
        jobs = [job_out(j) for j in job_store.jobs(conn, tenant)]
    return page(request, "imports.html", status_code=status_code, jobs=jobs, error=error,
                values=values or {}, modes=MODES, limit_mib=MAX_UPLOAD_BYTES // (1024 * 1024))


@import_pages.get("/imports", response_class=HTMLResponse)
def imports(request: Request) -> Response:
    return _jobs_page(request, _require(request))


@import_pages.post("/imports", response_class=HTMLResponse)
async def upload(request: Request) -> Response:
    tenant = _require(request)
    try:
        body = await read_upload(request, MAX_UPLOAD_BYTES + FORM_OVERHEAD_BYTES)
    except UploadRefused as exc:
        return _jobs_page(request, tenant, exc.status, exc.reason)
    fields = _form_parts(request.headers.get("content-type", ""), body)
    fault = _signer(request).csrf_fault(request.cookies.get(CSRF_COOKIE), _text(fields, "csrf") or None)
    if fault is not None:
        raise HTTPException(403, fault)
    values = {"list_id": _text(fields, "list_id"), "mode": _text(fields, "mode") or "upsert"}
    file = fields.get("file", b"")
    if values["mode"] not in MODES:
        return _jobs_page(request, tenant, 422, f"unknown mode {values['mode']!r}", values)
    if not file:
        return _jobs_page(request, tenant, 422, "choose a CSV file to upload", values)
    if len(file) > MAX_UPLOAD_BYTES:
        return _jobs_page(request, tenant, 413, f"the file is over the limit of"
                          f" {MAX_UPLOAD_BYTES} bytes: split it", values)
    list_id = values["list_id"] or None
    if list_id is not None and not _valid_id(list_id):
        return _jobs_page(request, tenant, 422, f"invalid list id {list_id!r}", values)
    try:
        job_id = await store_upload(request, pool_of(request), tenant, list_id, values["mode"], file)
    except UploadRefused as exc:
        return _jobs_page(request, tenant, exc.status, exc.reason, values)
    except psycopg.Error:
        return database_unavailable()
    return RedirectResponse(f"/console/imports/{job_id}", status_code=303)


def _valid_id(value: str) -> bool:
    try:
        _ENTITY_ID.validate_python(value)
    except ValueError:
        return False
    return True


def _job(request: Request, job_id: str, template: str) -> Response:
    tenant = _require(request)
    with queries.tenant_snapshot(pool_of(request), tenant) as conn:
        found = job_store.job(conn, tenant, job_id)
    if found is None:
        return page(request, "message.html", status_code=404, title="Not found",
                    message="No such import.", back="/console/imports")
    return page(request, template, job=job_out(found))


@import_pages.get("/imports/{job_id}", response_class=HTMLResponse)
def import_job(request: Request, job_id: str) -> Response:
    return _job(request, job_id, "import.html")


@import_pages.get("/imports/{job_id}/progress", response_class=HTMLResponse)
def import_progress(request: Request, job_id: str) -> Response:
    """The progress section alone: what the job's page polls while the job runs."""
    return _job(request, job_id, "_import_progress.html")
