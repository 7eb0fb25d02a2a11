"""The contacts API: upsert (one or a batch of up to MAX_BATCH), read, change attributes and
list memberships, unsubscribe, resubscribe and delete a tenant's contacts.

Guarantees:
- Writes are events, never read-model rows: each accepted change is stored in the outbox
  (services/api/outbox.py) as a contact event for contacts.events, keyed by tenant + contact,
  and published from there in acceptance order; a 202 means stored, so a Kafka outage loses
  nothing. A batch is all or nothing: one bad contact refuses the whole batch with the index and
  the reason of each fault (422), and nothing is stored.
- Reads come from the read models (projections/contact_queries.py), scoped to the caller's
  tenant: another tenant's contact is a 404, like a missing one. A change shows in a read once
  the projector has applied it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from projections.contact_queries import ContactView, contacts_by_email, contacts_by_id
from schemas.base import EntityId, InvalidEmail, Record, normalise_email
from schemas.contacts import (
    ContactAttributesChanged,
    ContactDeleted,
    ContactListMembershipAdded,
    ContactListMembershipRemoved,
    ContactResubscribed,
    ContactUnsubscribed,
    ContactUpserted,
    contact_id_for,
)
from schemas.envelope import Envelope, wrap
from services.api import outbox, queries
from services.api.deps import DbPool, ErrorDetail, PathId, Pool, Tenant, database_unavailable
from services.common.settings import Settings
from services.common.topics import CONTACTS, topic_name

MAX_BATCH = 10_000
MAX_ATTRIBUTES = 100

contacts_router = APIRouter(tags=["contacts"])
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorDetail, "description": "No such contact for this tenant"}}
_ACCEPTED: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorDetail, "description": "The outbox (PostgreSQL) is unavailable; nothing"
                                               " was stored. Retry after Retry-After seconds"}}
_WITH_BODY: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorDetail, "description": "The body is not JSON"}, **_ACCEPTED}


def _no_nul(value: Any) -> Any:
    # PostgreSQL text cannot hold NUL: refused here, it would stop the projector later.
    if isinstance(value, str) and "\x00" in value:
        raise ValueError("text must not contain NUL characters")
    if isinstance(value, dict):
        for key, item in value.items():
            _no_nul(key)
            _no_nul(item)
    elif isinstance(value, list):
        for item in value:
            _no_nul(item)
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _text(cls, data: Any) -> Any:
        return _no_nul(data)


class ContactIn(_Strict):
    email: str = Field(max_length=320, examples=["ada@example.org"],
                       json_schema_extra={"format": "email"})
    first_name: str = Field(default="", max_length=200)
    last_name: str = Field(default="", max_length=200)
    attributes: dict[Annotated[str, Field(min_length=1, max_length=100)],
                     Annotated[str, Field(max_length=1000)]] = Field(
        default_factory=dict, max_length=MAX_ATTRIBUTES, examples=[{"city": "Oslo"}])
    lists: list[EntityId] = Field(default_factory=list, max_length=100, examples=[["newsletter"]])


class ContactBatch(_Strict):
    contacts: list[ContactIn] = Field(min_length=1, max_length=MAX_BATCH)


class AttributeChange(_Strict):
    set: dict[Annotated[str, Field(min_length=1, max_length=100)],
              Annotated[str, Field(max_length=1000)]] = Field(
        default_factory=dict, max_length=MAX_ATTRIBUTES)
    unset: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(
        default_factory=list, max_length=MAX_ATTRIBUTES)


class Unsubscribe(_Strict):
    list_id: EntityId | None = Field(default=None, description="Only this list; none: all")
    reason: str = Field(default="", max_length=1000)


class Accepted(BaseModel):
    """Stored in the outbox; published to contacts.events from there."""

    contact_ids: list[str]
    events: int


class ContactList(BaseModel):
    contacts: list[ContactView]


def _store(pool: Pool, settings: Settings, envelopes: Sequence[Envelope]) -> None:
    with pool.connection() as conn:
        outbox.accept_many(conn, envelopes, topic_name(CONTACTS, settings))


async def _accept(request: Request, pool: Pool, tenant: str,
                  facts: Sequence[tuple[str, Record]]) -> Accepted | JSONResponse:
    envelopes = [wrap(payload, tenant_id=tenant, aggregate_id=cid) for cid, payload in facts]
    try:
        await run_in_threadpool(_store, pool, request.app.state.settings, envelopes)
    except psycopg.Error:
        return database_unavailable()
    relay = request.app.state.relay
    if relay is not None:
        relay.wake()
    return Accepted(contact_ids=list(dict.fromkeys(cid for cid, _ in facts)), events=len(facts))


def _upserts(tenant: str, batch: Sequence[ContactIn]) -> list[tuple[str, Record]]:
    facts: list[tuple[str, Record]] = []
    faults = []
    for index, contact in enumerate(batch):
        try:
            address = normalise_email(contact.email)
        except InvalidEmail as exc:
            faults.append({"loc": ["body", "contacts", index, "email"], "msg": str(exc)})
            continue
        cid = contact_id_for(tenant, address)
        facts.append((cid, ContactUpserted(
            contact_id=cid, email=address, first_name=contact.first_name,
            last_name=contact.last_name, attributes=contact.attributes, lists=contact.lists)))
    if faults:
        raise HTTPException(422, faults)
    return facts


@contacts_router.put("/contacts", status_code=202, response_model=Accepted,
                     responses={422: {"description": "A contact is invalid; `detail` lists each"
                                                     " fault with its index; nothing was stored"},
                                **_WITH_BODY})
async def upsert_contacts(body: ContactBatch, request: Request, tenant: Tenant,
                          pool: DbPool) -> Accepted | JSONResponse:
    """Add or update up to 10,000 contacts: one ContactUpserted each, under the id of its
    address (the same person is the same contact). Fields are replaced, lists only added."""
    return await _accept(request, pool, tenant, _upserts(tenant, body.contacts))


@contacts_router.get("/contacts", response_model=ContactList)
def find_contacts(tenant: Tenant, pool: DbPool,
                  email: Annotated[str, Query(min_length=3, max_length=320,
                                              pattern=r"^[^\x00-\x1f\x7f]+$")]) -> ContactList:
    """The tenant's contacts of an address, in any case (case twins included)."""
    with queries.tenant_snapshot(pool, tenant) as conn:
        return ContactList(contacts=contacts_by_email(conn, tenant, email))


@contacts_router.get("/contacts/{contact_id}", response_model=ContactView, responses=_NOT_FOUND)
def get_contact(contact_id: PathId, tenant: Tenant, pool: DbPool) -> ContactView:
    """One contact as the read models hold it."""
    with queries.tenant_snapshot(pool, tenant) as conn:
        found = contacts_by_id(conn, tenant, [contact_id])
    if not found:
        raise HTTPException(404, "contact not found")
    return found[0]


@contacts_router.patch("/contacts/{contact_id}/attributes", status_code=202,
                       response_model=Accepted, responses=_WITH_BODY)
async def change_attributes(contact_id: PathId, body: AttributeChange, request: Request,
                            tenant: Tenant, pool: DbPool) -> Accepted | JSONResponse:
    """Set and unset attributes: ContactAttributesChanged."""
    if set(body.set) & set(body.unset):
        raise HTTPException(422, "an attribute is both set and unset")
    return await _accept(request, pool, tenant, [(contact_id, ContactAttributesChanged(
        contact_id=contact_id, set=body.set, unset=body.unset))])


@contacts_router.put("/contacts/{contact_id}/lists/{list_id}", status_code=202,
                     response_model=Accepted, responses=_ACCEPTED)
async def add_to_list(contact_id: PathId, list_id: PathId, request: Request, tenant: Tenant,
                      pool: DbPool) -> Accepted | JSONResponse:
    """Add the contact to a list: ContactListMembershipAdded."""
    return await _accept(request, pool, tenant, [(contact_id, ContactListMembershipAdded(
        contact_id=contact_id, list_id=list_id))])


@contacts_router.delete("/contacts/{contact_id}/lists/{list_id}", status_code=202,
                        response_model=Accepted, responses=_ACCEPTED)
async def remove_from_list(contact_id: PathId, list_id: PathId, request: Request, tenant: Tenant,
                           pool: DbPool) -> Accepted | JSONResponse:
    """Take the contact off a list: ContactListMembershipRemoved."""
    return await _accept(request, pool, tenant, [(contact_id, ContactListMembershipRemoved(
        contact_id=contact_id, list_id=list_id))])


@contacts_router.post("/contacts/{contact_id}/unsubscribe", status_code=202,
                      response_model=Accepted, responses=_WITH_BODY)
async def unsubscribe(contact_id: PathId, body: Unsubscribe, request: Request, tenant: Tenant,
                      pool: DbPool) -> Accepted | JSONResponse:
    """Unsubscribe the contact, from one list or from everything: ContactUnsubscribed."""
    return await _accept(request, pool, tenant, [(contact_id, ContactUnsubscribed(
        contact_id=contact_id, list_id=body.list_id, reason=body.reason))])


@contacts_router.post("/contacts/{contact_id}/resubscribe", status_code=202,
                      response_model=Accepted, responses=_WITH_BODY)
async def resubscribe(contact_id: PathId, body: Unsubscribe, request: Request, tenant: Tenant,
                      pool: DbPool) -> Accepted | JSONResponse:
    """Lift an unsubscribe, of one list or the global one: ContactResubscribed."""
    return await _accept(request, pool, tenant, [(contact_id, ContactResubscribed(
        contact_id=contact_id, list_id=body.list_id, detail=body.reason))])


@contacts_router.delete("/contacts/{contact_id}", status_code=202, response_model=Accepted,
                        responses=_ACCEPTED)
async def delete_contact(contact_id: PathId, request: Request, tenant: Tenant,
                         pool: DbPool) -> Accepted | JSONResponse:
    """Delete the contact: ContactDeleted (no later campaign mails it)."""
    return await _accept(request, pool, tenant, [(contact_id, ContactDeleted(
        contact_id=contact_id))])
