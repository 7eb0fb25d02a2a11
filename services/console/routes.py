"""The campaign console: server-rendered pages for people, under /console, on the API's app.

Guarantees:
- A person signs in by pasting a tenant's API key; the session cookie (HttpOnly,
  SameSite=Strict, signed, see session.py) then scopes every page and action to that tenant:
  another tenant's campaign or contact answers 404 exactly like an unknown one.
- Every POST is refused (403, with the reason) unless its form carries this browser's CSRF
  token.
- Reads use the API's own queries (services/api/queries.py, projections/contact_queries.py);
  every change is a command handed to the command gateway's own handler (`post_command`), so
  it is validated, stored in the outbox and published exactly like a POST /commands. The
  console never writes a read model.
"""

from __future__ import annotations

import html
import json
import secrets
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import TypeAdapter, ValidationError

from projections.contact_queries import contacts_by_email, contacts_by_id
from schemas.base import EntityId, normalise_email
from services.api import gateway, queries
from services.api.auth import ApiKeys
from services.api.commands import CommandRequest
from services.api.deps import Pool, pool_of
from services.console.session import CSRF_COOKIE, SESSION_COOKIE, SESSION_TTL_S, Signer
from services.sender.render import render_text

HERE = Path(__file__).parent
# How long creating a campaign waits for the command handler's verdict before showing the
# campaign anyway: the handler answers in well under a second when the pipeline is up.
CREATE_WAIT_S = 10.0
RECIPIENTS_PAGE = 50
_ENTITY_ID: TypeAdapter[str] = TypeAdapter(EntityId)

_templates = Environment(loader=FileSystemLoader(HERE / "templates"),
                         autoescape=select_autoescape(["html"]))

console_router = APIRouter(prefix="/console", include_in_schema=False)
STATIC = {"htmx.min.js": "text/javascript", "console.css": "text/css"}


def _signer(request: Request) -> Signer:
    state = request.app.state
    signer: Signer | None = getattr(state, "console_signer", None)
    if signer is None:
        secret_setting = getattr(state.settings, "console_session_secret", None)
        secret = secret_setting.get_secret_value().encode() if secret_setting else b""
        # No secret configured: a random one per process (sessions end when the API restarts).
        signer = Signer(secret or secrets.token_bytes(32))
        state.console_signer = signer
    return signer


def _tenant(request: Request) -> str | None:
    session = _signer(request).session(request.cookies.get(SESSION_COOKIE))
    return session.tenant if session else None


def _require(request: Request) -> str:
    """The session's tenant; without a valid session, a redirect to the sign-in page."""
    tenant = _tenant(request)
    if tenant is None:
        raise HTTPException(303, "sign in first", headers={"Location": "/console/signin"})
    return tenant


def page(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """A rendered page with this browser's CSRF token (its nonce cookie set when missing)."""
    signer = _signer(request)
    nonce = request.cookies.get(CSRF_COOKIE) or getattr(request.state, "csrf_nonce", None)
    fresh = nonce is None
    nonce = nonce or signer.new_nonce()
    request.state.csrf_nonce = nonce
    body = _templates.get_template(template).render(
        request=request, csrf=signer.csrf_token(nonce), tenant=_tenant(request), **context)
    response = HTMLResponse(body, status_code=status_code, headers={"Cache-Control": "no-store"})
    if fresh:
        response.set_cookie(CSRF_COOKIE, nonce, httponly=True, samesite="strict", path="/console",
                            secure=request.url.scheme == "https")
    return response


async def form(request: Request) -> dict[str, str]:
    """The POSTed form (urlencoded), once its CSRF token checked; 403 with the reason if not."""
    raw = (await request.body()).decode("utf-8", errors="replace")
    fields = {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}
    fault = _signer(request).csrf_fault(request.cookies.get(CSRF_COOKIE), fields.get("csrf"))
    if fault is not None:
        raise HTTPException(403, fault)
    return fields


def _see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _id_list(text: str) -> list[str]:
    return [part for part in text.replace(",", " ").split() if part]


@console_router.get("/static/{name}")
def static(name: str) -> Response:
    """The vendored front-end files (htmx and its licence, the style sheet)."""
    if name not in STATIC:
        raise HTTPException(404, "not found")
    return FileResponse(HERE / "static" / name, media_type=STATIC[name],
                        headers={"Cache-Control": "max-age=3600"})


# -- sign in / out -------------------------------------------------------------------------

@console_router.get("", response_class=HTMLResponse)
def home(request: Request) -> Response:
    return _see_other("/console/campaigns" if _tenant(request) else "/console/signin")


@console_router.get("/signin", response_class=HTMLResponse)
def signin_page(request: Request) -> Response:
    return page(request, "signin.html", error=None)


@console_router.post("/signin", response_class=HTMLResponse)
async def signin(request: Request) -> Response:
    fields = await form(request)
    keys: ApiKeys = request.app.state.api_keys
    tenant = keys.tenant_for(fields.get("api_key", "").strip())
    if tenant is None:
        return page(request, "signin.html", status_code=401, error="That API key is not known.")
    response = _see_other("/console/campaigns")
    response.set_cookie(SESSION_COOKIE, _signer(request).session_cookie(tenant), max_age=SESSION_TTL_S,
                        httponly=True, samesite="strict", path="/console",
                        secure=request.url.scheme == "https")
    return response


@console_router.post("/signout")
async def signout(request: Request) -> Response:
    await form(request)
    response = _see_other("/console/signin")
    response.delete_cookie(SESSION_COOKIE, path="/console")
    return response


# -- campaigns -----------------------------------------------------------------------------

def _campaign_views(pool: Pool, tenant: str) -> list[queries.CampaignView]:
    with queries.tenant_snapshot(pool, tenant) as conn:
        return queries.tenant_campaigns(conn, tenant)


@console_router.get("/campaigns", response_class=HTMLResponse)
def campaigns(request: Request) -> Response:
    tenant = _require(request)
    return page(request, "campaigns.html", campaigns=_campaign_views(pool_of(request), tenant))


@console_router.get("/campaigns/rows", response_class=HTMLResponse)
def campaign_rows(request: Request) -> Response:
    """The list's rows alone: what the list page polls for live progress."""
    tenant = _require(request)
    return page(request, "_campaign_rows.html", campaigns=_campaign_views(pool_of(request), tenant))


@console_router.get("/campaigns/new", response_class=HTMLResponse)
def new_campaign(request: Request) -> Response:
    _require(request)
    return page(request, "new.html", values={}, errors=[], preview=None)


SAMPLE = {"first_name": "Ada", "last_name": "Lovelace", "email": "ada@example.com"}


def _sample_fields(pool: Pool, tenant: str, contact_ids: list[str]) -> dict[str, str]:
    """The first hand-picked contact that exists, else a made-up sample contact."""
    if contact_ids:
        with queries.tenant_snapshot(pool, tenant) as conn:
            found = contacts_by_id(conn, tenant, contact_ids[:1])
        if found:
            c = found[0]
            fields = {"first_name": c.first_name, "last_name": c.last_name, "email": c.email}
            fields.update({f"attr.{k}": v for k, v in c.attributes.items()})
            return fields
    return dict(SAMPLE)


@console_router.post("/campaigns/new", response_class=HTMLResponse)
async def create_campaign(request: Request) -> Response:
    tenant = _require(request)
    fields = await form(request)
    pool = pool_of(request)
    payload = {"name": fields.get("name", ""), "subject": fields.get("subject", ""),
               "from_address": fields.get("from_address", ""),
               "body_text": fields.get("body_text") or None, "body_html": fields.get("body_html") or None}
    contact_ids = _id_list(fields.get("contact_ids", ""))
    if fields.get("action") == "preview":
        sample = await run_in_threadpool(_sample_fields, pool, tenant, contact_ids)
        preview = {
            "sample": sample,
            "subject": render_text(payload["subject"] or "", sample),
            "text": render_text(payload["body_text"] or "", sample),
            "html": render_text(payload["body_html"] or "", sample,
                                lambda v: html.escape(v, quote=True)),
        }
        return page(request, "new.html", values=fields, errors=[], preview=preview)
    campaign_id = f"cmp-{uuid.uuid4().hex[:16]}"
    outcome = await _command(request, tenant, "CreateCampaign", campaign_id, payload)
    if isinstance(outcome, list):
        return page(request, "new.html", status_code=422, values=fields, errors=outcome, preview=None)
    verdict = await run_in_threadpool(_verdict, pool, tenant, outcome)
    if verdict is not None:
        return page(request, "new.html", status_code=422, values=fields, errors=[verdict], preview=None)
    audience = urlencode({"lists": fields.get("list_ids", ""), "contacts": fields.get("contact_ids", "")})
    return _see_other(f"/console/campaigns/{campaign_id}?{audience}")


def _verdict(pool: Pool, tenant: str, command_id: uuid.UUID) -> str | None:
    """Waits for the command's outcome (bounded): its rejection reason, or None."""
    deadline = time.monotonic() + CREATE_WAIT_S
    while time.monotonic() < deadline:
        status = gateway._status(pool, tenant, command_id)  # noqa: SLF001 - the gateway's own read
        if status is not None and status.status == "rejected":
            return f"rejected: {status.reason}"
        if status is not None and status.status == "accepted":
            with queries.tenant_snapshot(pool, tenant) as conn:
                if queries.campaign_progress(conn, status.aggregate_id or "", tenant) is not None:
                    return None
        time.sleep(0.2)
    return None


async def _command(request: Request, tenant: str, kind: str, aggregate_id: str,
                   payload: dict[str, Any]) -> uuid.UUID | list[str]:
    """Hands a command to the gateway's POST /commands handler; its id, or the faults."""
    try:
        body = CommandRequest(type=kind, aggregate_id=aggregate_id, payload=payload)
    except ValidationError as exc:
        return [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
    try:
        result = await gateway.post_command(body, request, tenant, pool_of(request))
    except HTTPException as exc:
        return [str(exc.detail)]
    if isinstance(result, JSONResponse):
        detail = json.loads(bytes(result.body)).get("detail")
        if isinstance(detail, list):
            return [f"{'.'.join(str(p) for p in e['loc'][2:])}: {e['msg']}" for e in detail]
        return [str(detail)]
    command_id: uuid.UUID = result.command_id
    return command_id


def _campaign(pool: Pool, tenant: str, campaign_id: str) -> dict[str, Any] | None:
    with queries.tenant_snapshot(pool, tenant) as conn:
        view = queries.tenant_campaign(conn, tenant, campaign_id)
        if view is None:
            return None
        counts = dict(conn.execute(
            "SELECT status, count(*) FROM campaign_recipients WHERE tenant_id = %s AND campaign_id = %s"
            " GROUP BY status ORDER BY status", (tenant, campaign_id)).fetchall())
        failures, _ = queries.recipients_page(conn, tenant, campaign_id, status="failed", after=None,
                                              limit=RECIPIENTS_PAGE)
        rejections = queries.rejections(conn, tenant, campaign_id)
    return {"view": view, "counts": counts, "failures": failures, "rejections": rejections}


def _checked_id(value: str) -> str:
    try:
        return _ENTITY_ID.validate_python(value)
    except ValidationError:
        raise HTTPException(404, "campaign not found") from None


@console_router.get("/campaigns/{campaign_id}", response_class=HTMLResponse)
def campaign(request: Request, campaign_id: str, lists: str = "", contacts: str = "",
             status: str | None = None, after: str | None = None, msg: str | None = None) -> Response:
    tenant = _require(request)
    pool = pool_of(request)
    found = _campaign(pool, tenant, _checked_id(campaign_id))
    if found is None:
        return page(request, "message.html", status_code=404, title="Not found",
                    message="No such campaign.")
    with queries.tenant_snapshot(pool, tenant) as conn:
        recipients, more = queries.recipients_page(
            conn, tenant, campaign_id, status=status or None, after=after or None, limit=RECIPIENTS_PAGE)
    return page(request, "campaign.html", c=found, lists=lists, contacts=contacts,
                recipients=recipients, next_after=recipients[-1].contact_id if more else None,
                status_filter=status or "", msg=msg)


@console_router.get("/campaigns/{campaign_id}/progress", response_class=HTMLResponse)
def campaign_progress(request: Request, campaign_id: str) -> Response:
    """The progress panel alone: what the campaign page polls."""
    tenant = _require(request)
    found = _campaign(pool_of(request), tenant, _checked_id(campaign_id))
    if found is None:
        raise HTTPException(404, "campaign not found")
    return page(request, "_progress.html", c=found)


ACTIONS = {"send": "SendCampaign", "schedule": "ScheduleCampaign", "pause": "PauseCampaign",
           "resume": "ResumeCampaign", "cancel": "CancelCampaign", "test": "SendTestEmail"}


def _payload(action: str, fields: dict[str, str]) -> dict[str, Any]:
    audience = {"list_ids": _id_list(fields.get("list_ids", "")),
                "contact_ids": _id_list(fields.get("contact_ids", ""))}
    if action == "send":
        return audience
    if action == "schedule":
        # A datetime-local control has no zone: the console states it is UTC.
        raw = fields.get("send_at", "")
        try:
            send_at = datetime.fromisoformat(raw).replace(tzinfo=UTC).isoformat() if raw else ""
        except ValueError:
            send_at = raw
        return {"send_at": send_at, "send": audience}
    if action in ("pause", "cancel"):
        return {"reason": fields.get("reason") or None}
    if action == "test":
        return {"addresses": [normalise_email(a) if "@" in a else a
                              for a in _id_list(fields.get("addresses", ""))]}
    return {}


@console_router.post("/campaigns/{campaign_id}/{action}", response_class=HTMLResponse)
async def campaign_action(request: Request, campaign_id: str, action: str) -> Response:
    tenant = _require(request)
    fields = await form(request)
    if action not in ACTIONS:
        raise HTTPException(404, "no such action")
    campaign_id = _checked_id(campaign_id)
    pool = pool_of(request)
    # Another tenant's campaign is refused here, before any command is stored.
    if await run_in_threadpool(_campaign, pool, tenant, campaign_id) is None:
        raise HTTPException(404, "campaign not found")
    outcome = await _command(request, tenant, ACTIONS[action], campaign_id, _payload(action, fields))
    if isinstance(outcome, list):
        message = f"{action} refused: " + "; ".join(outcome)
        return page(request, "message.html", status_code=422, title="Refused", message=message,
                    back=f"/console/campaigns/{campaign_id}")
    # The handler may still reject it; the campaign page lists rejections with their reasons.
    query = urlencode({"msg": f"{ACTIONS[action]} accepted (command {outcome})",
                       "lists": fields.get("list_ids", ""), "contacts": fields.get("contact_ids", "")})
    return _see_other(f"/console/campaigns/{campaign_id}?{query}")


@console_router.get("/campaigns/{campaign_id}/recipients/{contact_id}", response_class=HTMLResponse)
def recipient(request: Request, campaign_id: str, contact_id: str) -> Response:
    tenant = _require(request)
    campaign_id, contact_id = _checked_id(campaign_id), _checked_id(contact_id)
    with queries.tenant_snapshot(pool_of(request), tenant) as conn:
        row = queries.recipient(conn, tenant, campaign_id, contact_id)
        history = queries.attempts(conn, tenant, campaign_id, contact_id) if row else []
    if row is None:
        return page(request, "message.html", status_code=404, title="Not found",
                    message="No such recipient.")
    return page(request, "recipient.html", campaign_id=campaign_id, r=row, attempts=history)


# -- contacts ------------------------------------------------------------------------------

@console_router.get("/contacts", response_class=HTMLResponse)
def contacts(request: Request, email: str = "") -> Response:
    tenant = _require(request)
    found = []
    if email.strip():
        with queries.tenant_snapshot(pool_of(request), tenant) as conn:
            found = contacts_by_email(conn, tenant, email.strip())
    return page(request, "contacts.html", email=email, contacts=found)


@console_router.get("/contacts/{contact_id}", response_class=HTMLResponse)
def contact(request: Request, contact_id: str) -> Response:
    tenant = _require(request)
    with queries.tenant_snapshot(pool_of(request), tenant) as conn:
        found = contacts_by_id(conn, tenant, [_checked_id(contact_id)])
    if not found:
        return page(request, "message.html", status_code=404, title="Not found", message="No such contact.")
    return page(request, "contact.html", c=found[0])


from services.console.imports import import_pages  # noqa: E402 - it uses the helpers above

console_router.include_router(import_pages)  # CSV uploads: services/console/imports.py
