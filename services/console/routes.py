"""The campaign console: server-rendered pages for people, under /console, on the API's app.

Guarantees:
- A person signs in by pasting a tenant's API key; the session cookie (HttpOnly,
  SameSite=Strict, signed, see session.py) then scopes every page and action to that tenant:
  another tenant's campaign or contact answers 404 exactly like an unknown one.
- Every POST is refused (403, with the reason) unless its form carries this browser's CSRF
  token.
- Reads use the API's own queries (services/api/queries.py, projections/contact_queries.py,
  projections/engagement_queries.py) and the console's read-only audience.py and
  throughput_chart.py; every change is a command handed to the command gateway's own
  handler (`post_command`), so it is validated, stored in the outbox and published exactly
  like a POST /commands. The console never writes a read model.
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

from projections import engagement_queries
from projections.contact_queries import contacts_by_email, contacts_by_id
from projections.segment_counts import CountsUnavailable, segment_definitions
from schemas.base import EntityId, normalise_email
from services.api import gateway, queries
from services.api.auth import ApiKeys
from services.api.commands import CommandRequest
from services.api.deps import Pool, pool_of
from services.console import audience
from services.console.audience import AudienceChoice
from services.console.session import CSRF_COOKIE, SESSION_COOKIE, SESSION_TTL_S, Signer
from services.console.throughput_chart import throughput_series, throughput_svg
from services.sender.render import render_text

HERE = Path(__file__).parent
# How long creating a campaign waits for the command handler's verdict before showing the
# campaign anyway: the handler answers in well under a second when the pipeline is up.
CREATE_WAIT_S = 10.0
RECIPIENTS_PAGE = 50
LIST_MEMBERS_PAGE = 50
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


class Form(dict[str, str]):
    """A POSTed form: each field's first value, and `all(name)` for repeated fields
    (the audience picker's check boxes)."""

    def __init__(self, values: dict[str, list[str]]) -> None:
        super().__init__({k: v[0] for k, v in values.items()})
        self._values = values

    def all(self, name: str) -> list[str]:
        return self._values.get(name, [])


async def form(request: Request) -> Form:
    """The POSTed form (urlencoded), once its CSRF token checked; 403 with the reason if not."""
    raw = (await request.body()).decode("utf-8", errors="replace")
    fields = Form(parse_qs(raw, keep_blank_values=True))
    fault = _signer(request).csrf_fault(request.cookies.get(CSRF_COOKIE), fields.get("csrf"))
    if fault is not None:
        raise HTTPException(403, fault)
    return fields


def _see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _id_list(text: str) -> list[str]:
    return audience.split_ids([text])


def _query_choice(request: Request) -> AudienceChoice:
    return AudienceChoice.from_values(request.query_params.getlist)


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


# -- the audience picker -------------------------------------------------------------------

def _estimate(pool: Pool, tenant: str, choice: AudienceChoice) -> dict[str, Any]:
    """The picker's live figures: the estimate, or the reason there is none."""
    if choice.faults:
        return {"estimate": None, "problem": "; ".join(choice.faults)}
    with queries.tenant_snapshot(pool, tenant) as conn:
        try:
            found = audience.estimate(conn, tenant, choice, queries.snapshot_time(conn))
        except CountsUnavailable as exc:
            return {"estimate": None, "problem": str(exc)}
    return {"estimate": found, "problem": None}


def _picker(pool: Pool, tenant: str, choice: AudienceChoice) -> dict[str, Any]:
    """What the picker offers (the tenant's lists with counts, its segments), the choice and
    its estimate."""
    with queries.tenant_snapshot(pool, tenant) as conn:
        lists = queries.tenant_lists(conn, tenant)
        try:
            segments = segment_definitions(conn, tenant)
        except CountsUnavailable:  # unreadable criteria: offer none rather than fail the page
            segments = []
    return {"lists": lists, "segments": segments, "choice": choice,
            **_estimate(pool, tenant, choice)}


@console_router.get("/audience/estimate", response_class=HTMLResponse)
def audience_estimate(request: Request) -> Response:
    """The picker's recipient count alone: what the picker fetches as its choice changes."""
    tenant = _require(request)
    return page(request, "_estimate.html", **_estimate(pool_of(request), tenant, _query_choice(request)))


@console_router.get("/campaigns/new", response_class=HTMLResponse)
def new_campaign(request: Request) -> Response:
    tenant = _require(request)
    picker = _picker(pool_of(request), tenant, _query_choice(request))
    return page(request, "new.html", values={}, errors=[], preview=None, picker=picker)


SAMPLE = {"first_name": "Ada", "last_name": "Lovelace", "email": "ada@example.com"}
TRACKING = ("track_opens", "track_clicks")


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


async def _preview(pool: Pool, tenant: str, choice: AudienceChoice,
                   content: dict[str, Any]) -> dict[str, Any]:
    """The content rendered with the sender's renderer for a sample contact."""
    sample = await run_in_threadpool(_sample_fields, pool, tenant, list(choice.contact_ids))
    return {
        "sample": sample,
        "subject": render_text(content.get("subject") or "", sample),
        "text": render_text(content.get("body_text") or "", sample),
        "html": render_text(content.get("body_html") or "", sample,
                            lambda v: html.escape(v, quote=True)),
    }


@console_router.post("/campaigns/new", response_class=HTMLResponse)
async def create_campaign(request: Request) -> Response:
    tenant = _require(request)
    fields = await form(request)
    pool = pool_of(request)
    payload: dict[str, Any] = {
        "name": fields.get("name", ""), "subject": fields.get("subject", ""),
        "from_address": fields.get("from_address", ""),
        "body_text": fields.get("body_text") or None, "body_html": fields.get("body_html") or None,
        **{flag: fields.get(flag) == "on" for flag in TRACKING}}
    choice = AudienceChoice.from_values(fields.all)
    picker = await run_in_threadpool(_picker, pool, tenant, choice)

    def again(status_code: int, errors: list[str], preview: dict[str, Any] | None = None) -> Response:
        return page(request, "new.html", status_code=status_code, values=fields, errors=errors,
                    preview=preview, picker=picker)

    if fields.get("action") == "preview":
        return again(200, [], await _preview(pool, tenant, choice, payload))
    if choice.faults:
        return again(422, list(choice.faults))
    campaign_id = f"cmp-{uuid.uuid4().hex[:16]}"
    outcome = await _command(request, tenant, "CreateCampaign", campaign_id, payload)
    if isinstance(outcome, list):
        return again(422, outcome)
    verdict = await run_in_threadpool(_verdict, pool, tenant, outcome)
    if verdict is not None:
        return again(422, [verdict])
    return _see_other(f"/console/campaigns/{campaign_id}?{choice.query()}")


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


def _campaign(pool: Pool, tenant: str, campaign_id: str, details: bool = False) -> dict[str, Any] | None:
    """A campaign's progress, counts, failures and rejections; with `details`, also its
    engagement and throughput chart (the full page only, not every 2 s poll)."""
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
        engagement = engagement_queries.campaign_engagement(conn, tenant, campaign_id) if details else None
        chart = throughput_svg(throughput_series(conn, tenant, campaign_id)) if details else ""
    return {"view": view, "counts": counts, "failures": failures, "rejections": rejections,
            "engagement": engagement, "chart": chart}


def _checked_id(value: str) -> str:
    try:
        return _ENTITY_ID.validate_python(value)
    except ValidationError:
        raise HTTPException(404, "not found") from None


@console_router.get("/campaigns/{campaign_id}", response_class=HTMLResponse)
def campaign(request: Request, campaign_id: str, status: str | None = None,
             after: str | None = None, msg: str | None = None) -> Response:
    tenant = _require(request)
    pool = pool_of(request)
    found = _campaign(pool, tenant, _checked_id(campaign_id), details=True)
    if found is None:
        return page(request, "message.html", status_code=404, title="Not found",
                    message="No such campaign.")
    with queries.tenant_snapshot(pool, tenant) as conn:
        recipients, more = queries.recipients_page(
            conn, tenant, campaign_id, status=status or None, after=after or None, limit=RECIPIENTS_PAGE)
    choice = _query_choice(request)
    return page(request, "campaign.html", c=found, picker=_picker(pool, tenant, choice),
                recipients=recipients, next_after=recipients[-1].contact_id if more else None,
                status_filter=status or "", msg=msg)


# Statuses in which UpdateCampaign is accepted (the content is fixed once sending starts).
EDITABLE = ("draft", "scheduled")


@console_router.get("/campaigns/{campaign_id}/edit", response_class=HTMLResponse)
def edit_campaign(request: Request, campaign_id: str) -> Response:
    tenant = _require(request)
    found = _campaign(pool_of(request), tenant, _checked_id(campaign_id))
    if found is None:
        return page(request, "message.html", status_code=404, title="Not found", message="No such campaign.")
    p = found["view"].progress
    return page(request, "edit.html", c=found, editable=p.status in EDITABLE, errors=[], preview=None,
                values={"name": p.name or "", "subject": _subject(pool_of(request), tenant, campaign_id)})


def _subject(pool: Pool, tenant: str, campaign_id: str) -> str:
    with queries.tenant_snapshot(pool, tenant) as conn:
        row = conn.execute("SELECT subject FROM campaigns WHERE tenant_id = %s AND campaign_id = %s",
                           (tenant, campaign_id)).fetchone()
    return str(row[0]) if row and row[0] else ""


def _update_payload(fields: Form) -> dict[str, Any]:
    """UpdateCampaign's payload: only what the person filled in or ticked changes."""
    payload: dict[str, Any] = {k: fields[k] for k in ("name", "subject", "from_address",
                                                       "body_text", "body_html") if fields.get(k)}
    for body in ("body_text", "body_html"):
        if fields.get(f"remove_{body}") == "on":
            payload[body] = ""  # UpdateCampaign: an empty body removes it
    for flag in TRACKING:
        if fields.get(flag) in ("on", "off"):
            payload[flag] = fields[flag] == "on"
    return payload


@console_router.post("/campaigns/{campaign_id}/edit", response_class=HTMLResponse)
async def update_campaign(request: Request, campaign_id: str) -> Response:
    tenant = _require(request)
    fields = await form(request)
    pool = pool_of(request)
    found = await run_in_threadpool(_campaign, pool, tenant, _checked_id(campaign_id))
    if found is None:  # another tenant's campaign: refused before any command is stored
        raise HTTPException(404, "campaign not found")
    payload = _update_payload(fields)

    def again(status_code: int, errors: list[str], preview: dict[str, Any] | None = None) -> Response:
        editable = found["view"].progress.status in EDITABLE
        return page(request, "edit.html", status_code=status_code, c=found, editable=editable,
                    values=fields, errors=errors, preview=preview)

    if fields.get("action") == "preview":
        return again(200, [], await _preview(pool, tenant, AudienceChoice(), payload))
    outcome = await _command(request, tenant, "UpdateCampaign", campaign_id, payload)
    if isinstance(outcome, list):
        return again(422, outcome)
    query = urlencode({"msg": f"UpdateCampaign accepted (command {outcome})"})
    return _see_other(f"/console/campaigns/{campaign_id}?{query}")


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


def _payload(action: str, fields: Form) -> dict[str, Any]:
    audience = AudienceChoice.from_values(fields.all).send_payload()
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
    choice = AudienceChoice.from_values(fields.all)
    outcome = (list(choice.faults) if choice.faults and action in ("send", "schedule") else
               await _command(request, tenant, ACTIONS[action], campaign_id, _payload(action, fields)))
    if isinstance(outcome, list):
        message = f"{action} refused: " + "; ".join(outcome)
        return page(request, "message.html", status_code=422, title="Refused", message=message,
                    back=f"/console/campaigns/{campaign_id}")
    # The handler may still reject it; the campaign page lists rejections with their reasons.
    query = urlencode({"msg": f"{ACTIONS[action]} accepted (command {outcome})"})
    return _see_other(f"/console/campaigns/{campaign_id}?{query}&{choice.query()}")


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


# -- lists ---------------------------------------------------------------------------------

@console_router.get("/lists", response_class=HTMLResponse)
def lists(request: Request) -> Response:
    tenant = _require(request)
    with queries.tenant_snapshot(pool_of(request), tenant) as conn:
        found = queries.tenant_lists(conn, tenant)
    return page(request, "lists.html", lists=found)


@console_router.get("/lists/{list_id}", response_class=HTMLResponse)
def list_page(request: Request, list_id: str, after: str | None = None) -> Response:
    """A list's members, paged by contact id; an unknown list (or another tenant's) is 404."""
    tenant = _require(request)
    list_id = _checked_id(list_id)
    with queries.tenant_snapshot(pool_of(request), tenant) as conn:
        counts = next(iter(queries.tenant_lists(conn, tenant, list_id)), None)
        members, more = audience.list_members(conn, tenant, list_id, after=after or None,
                                              limit=LIST_MEMBERS_PAGE)
    if counts is None:
        return page(request, "message.html", status_code=404, title="Not found", message="No such list.")
    return page(request, "list.html", counts=counts, members=members, after=after,
                next_after=members[-1].contact_id if more else None)


from services.console.imports import import_pages  # noqa: E402 - it uses the helpers above

console_router.include_router(import_pages)  # CSV uploads: services/console/imports.py
