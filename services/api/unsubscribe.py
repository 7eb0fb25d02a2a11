"""One-click unsubscribe (RFC 8058): `/unsubscribe?token=...` from a mail's List-Unsubscribe.

Guarantee: a POST with a genuine token (services.common.unsubscribe_tokens) stores exactly one
ContactUnsubscribed (global: every list, naming the campaign whose mail it came from) for that
tenant's contact in the outbox, published to contacts.events keyed by tenant + contact; the
same token again stores nothing new (the event id is derived from the token). A bad token is
a 400 and stores nothing. GET only shows a confirmation form: mail scanners fetch links, and a
fetch must not unsubscribe anyone.
"""

from __future__ import annotations

import html
import uuid
from typing import Annotated

import psycopg
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse

from schemas.contacts import ContactUnsubscribed
from schemas.envelope import Envelope, wrap
from services.api import outbox
from services.api.deps import DbPool, Pool
from services.common.settings import Settings
from services.common.topics import CONTACTS, topic_name
from services.common.unsubscribe_tokens import InvalidToken, UnsubscribeClaim, verify

# Event ids of one-click unsubscribes: uuid5(token) makes a repeated POST the same event.
_EVENT_NAMESPACE = uuid.UUID("2f7c4a51-93d6-4b0e-8d1a-5e0b6c3f9a72")

unsubscribe_router = APIRouter(tags=["unsubscribe"])
Token = Annotated[str, Query(max_length=512, description="The token from List-Unsubscribe")]

_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title></head>
<body style="font-family: system-ui, sans-serif; max-width: 32rem; margin: 4rem auto">
<h1>{title}</h1>{body}</body></html>"""


def _claim(request: Request, token: str) -> UnsubscribeClaim:
    secret: bytes | None = request.app.state.unsubscribe_secret
    if not secret:
        raise HTTPException(503, "unsubscribe is not configured")
    try:
        return verify(secret, token)
    except InvalidToken:
        raise HTTPException(400, "invalid unsubscribe link") from None


def _event(claim: UnsubscribeClaim, token: str) -> Envelope:
    payload = ContactUnsubscribed(
        contact_id=claim.contact_id, list_id=None, campaign_id=claim.campaign_id,
        reason=f"one-click unsubscribe from campaign {claim.campaign_id}")
    return wrap(payload, tenant_id=claim.tenant_id, aggregate_id=claim.contact_id,
                message_id=uuid.uuid5(_EVENT_NAMESPACE, token))


def _store(pool: Pool, settings: Settings, envelope: Envelope) -> None:
    with pool.connection() as conn:
        outbox.accept(conn, envelope, topic_name(CONTACTS, settings))


@unsubscribe_router.get("/unsubscribe", response_class=HTMLResponse,
                        responses={400: {"description": "Invalid unsubscribe link"},
                                   503: {"description": "Unsubscribe is not configured"}})
def unsubscribe_form(request: Request, token: Token) -> HTMLResponse:
    """A confirmation page whose button POSTs the same link (nothing changes on GET)."""
    _claim(request, token)
    action = html.escape(f"/unsubscribe?token={token}", quote=True)
    form = (f'<p>Stop receiving these e-mails?</p><form method="post" action="{action}">'
            '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
            '<button type="submit">Unsubscribe</button></form>')
    return HTMLResponse(_PAGE.format(title="Unsubscribe", body=form),
                        headers={"Cache-Control": "no-store"})


@unsubscribe_router.post("/unsubscribe", response_class=HTMLResponse,
                         responses={400: {"description": "Invalid unsubscribe link"},
                                    503: {"description": "Try again later; nothing changed"}})
async def unsubscribe(request: Request, token: Token, pool: DbPool) -> HTMLResponse:
    """One-click unsubscribe (body `List-Unsubscribe=One-Click`, RFC 8058): the contact is
    unsubscribed from everything this tenant sends."""
    claim = _claim(request, token)
    try:
        await run_in_threadpool(_store, pool, request.app.state.settings, _event(claim, token))
    except psycopg.Error:
        raise HTTPException(503, "please try again in a moment") from None
    relay = request.app.state.relay
    if relay is not None:
        relay.wake()
    return HTMLResponse(_PAGE.format(title="Unsubscribed",
                                     body="<p>You will not receive these e-mails any more.</p>"),
                        headers={"Cache-Control": "no-store"})
