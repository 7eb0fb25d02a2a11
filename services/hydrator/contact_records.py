"""Contact events off contacts.events, decoded for the replicas' fold.

Guarantee: `contact_event(raw)` gives the same outcome as the pydantic path
(`schemas.envelope.decode`): the same ContactEvent for a valid record, SchemaViolation for
every record that path refuses, None for a valid record that is no contact event.

ContactUpserted, nearly every record of an import, takes a fast path: msgspec Structs
(closed, like the pydantic records) and the same rules checked by hand (ids, the stored
e-mail shape, name lengths, UUIDs, an aware RFC 3339 time). A record the fast path does not
accept outright, whatever the reason, goes the pydantic way, which has the last word: the
fast path only ever accepts, never refuses. The fast path's Upsert is folded straight onto
the stored form (`apply_record`), without the ContactState round trip.

A record in the exact form `schemas.envelope.encode` writes (every producer of this system)
goes faster still: one bytes pattern checks the whole envelope as written (field order, the
canonical UUIDs, ids, an aware time) and only the payload is decoded; the tenant and list
ids seen before and the dates already checked are remembered (bounded), so each is checked
once. Anything else (another field order, spacing, escapes) takes the general fast path.
A new contact's stored form is encoded from the Upsert without building a dict
(`new_contact`); every other fold goes through `apply_record` and `encode_stored`.
Structs are not tracked by the garbage collector: an import makes millions of them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import date, datetime
from typing import Any, cast

import msgspec

from schemas.base import (
    _ENTITY_ID,
    _TENANT_ID,
    ENTITY_ID_RE,
    MAX_EMAIL_OCTETS,
    NORMALISED_EMAIL_RE,
    TENANT_ID_RE,
)
from schemas.contacts import CONTACT_EVENT_TYPES, ContactEvent
from schemas.envelope import decode
from schemas.registry import registered
from services.hydrator.audience import StoredContact, apply_to_stored

UPSERTED, UPSERTED_VERSION = "ContactUpserted", registered()["ContactUpserted"][0]
# Name fields' max_length in ContactUpserted.
MAX_NAME_CHARS = 200
# The canonical form (what pydantic writes); any other spelling goes the pydantic way.
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_AWARE_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)")


class Upsert(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A validated ContactUpserted payload (the fast path's form of it)."""

    contact_id: str
    email: str
    first_name: str = ""
    last_name: str = ""
    attributes: dict[str, str] = msgspec.field(default_factory=dict)
    lists: list[str] = msgspec.field(default_factory=list)


class _Envelope(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    id: str
    type: str
    version: int
    tenant_id: str
    aggregate_id: str
    occurred_at: str
    correlation_id: str
    payload: msgspec.Raw
    causation_id: str | None = None


_envelope = msgspec.json.Decoder(_Envelope)
_upserted = msgspec.json.Decoder(Upsert)

_UUID_TEXT = _UUID.pattern
# Hours, minutes, seconds and offsets in range, so only the date is left to check.
_CLOCK = r"(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d{1,6})?(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)"
# The envelope of a ContactUpserted up to its payload, exactly as `encode` writes it.
_CANONICAL = re.compile((
    rf'\{{"id":"{_UUID_TEXT}","type":"{UPSERTED}","version":{UPSERTED_VERSION}'
    rf',"tenant_id":"{_TENANT_ID}","aggregate_id":"({_ENTITY_ID})"'
    rf',"occurred_at":"(\d{{4}}-\d\d-\d\d)T{_CLOCK}","correlation_id":"{_UUID_TEXT}"'
    rf',"causation_id":(?:null|"{_UUID_TEXT}"),"payload":'
).encode())
# List ids and dates already found valid: an import repeats a few of them over and over.
REMEMBERED = 4_096
_valid_dates: set[bytes] = set()
_valid_list_ids: set[str] = set()


def contact_event(raw: bytes | None) -> ContactEvent | Upsert | None:
    """The contact event of one contacts.events record value (an Upsert for a ContactUpserted
    taken by the fast path); None for a valid record of another type; SchemaViolation (with
    the pydantic path's reason) for an invalid one."""
    if raw is not None:
        fast = _canonical_upsert(raw) or _fast_upsert(raw)
        if fast is not None:
            return fast
    payload = decode(raw).payload
    return cast(ContactEvent, payload) if isinstance(payload, CONTACT_EVENT_TYPES) else None


def _canonical_upsert(raw: bytes) -> Upsert | None:
    """The record's ContactUpserted when its envelope is written as `encode` writes it and
    every rule holds, else None."""
    head = _CANONICAL.match(raw)
    if head is None or raw[-1:] != b"}":
        return None
    try:
        # The payload is the last field: what lies between it and the closing brace must be
        # one JSON value (trailing fields or garbage fail here).
        body = _upserted.decode(memoryview(raw)[head.end():-1])
    except msgspec.DecodeError:
        return None
    aggregate, day = head.groups()
    if not ((day in _valid_dates or _remember_date(day))
            and (body.contact_id.encode() == aggregate or ENTITY_ID_RE.fullmatch(body.contact_id))
            and _normalised_upsert(body)):
        return None
    return body


def _remember_date(day: bytes) -> bool:
    try:
        date.fromisoformat(day.decode())
    except ValueError:  # e.g. month 13 or 30 February
        return False
    if len(_valid_dates) >= REMEMBERED:
        _valid_dates.clear()
    _valid_dates.add(day)
    return True


def _normalised_upsert(body: Upsert) -> bool:
    """The payload rules beyond the contact id: the stored e-mail shape (exactly the addresses
    `Email` reads back unchanged), name lengths, list ids."""
    if not (len(body.email) <= MAX_EMAIL_OCTETS and NORMALISED_EMAIL_RE.fullmatch(body.email)
            and len(body.first_name) <= MAX_NAME_CHARS and len(body.last_name) <= MAX_NAME_CHARS):
        return False
    for list_id in body.lists:  # a plain loop: a comprehension is a function call per record
        if list_id not in _valid_list_ids and not _remember_list_id(list_id):
            return False
    return True


def _remember_list_id(list_id: str) -> bool:
    if not ENTITY_ID_RE.fullmatch(list_id):
        return False
    if len(_valid_list_ids) >= REMEMBERED:
        _valid_list_ids.clear()
    _valid_list_ids.add(list_id)
    return True


def _fast_upsert(raw: bytes) -> Upsert | None:
    """The record's ContactUpserted when it is one and every rule holds, else None."""
    try:
        env = _envelope.decode(raw)
        if env.type != UPSERTED or env.version != UPSERTED_VERSION:
            return None
        body = _upserted.decode(env.payload)
    except msgspec.DecodeError:  # ValidationError is a DecodeError
        return None
    if not (_UUID.fullmatch(env.id) and _UUID.fullmatch(env.correlation_id)
            and (env.causation_id is None or _UUID.fullmatch(env.causation_id))
            and TENANT_ID_RE.fullmatch(env.tenant_id) and ENTITY_ID_RE.fullmatch(env.aggregate_id)
            and _aware_time(env.occurred_at)
            and ENTITY_ID_RE.fullmatch(body.contact_id) and _normalised_upsert(body)):
        return None
    return body


def apply_record(existing: StoredContact | None, event: ContactEvent | Upsert, *, offset: int,
                 partition: int) -> StoredContact | None:
    """The stored contact after `event`: apply_to_stored's result, an Upsert folded on the
    stored form directly (schemas.contacts.apply_contact_event's ContactUpserted rule)."""
    if not isinstance(event, Upsert):
        return apply_to_stored(existing, event, offset=offset, partition=partition)
    fresh = existing is None or existing.get("deleted", False)
    kept: Mapping[str, Any] = existing or {}
    attributes = dict(event.attributes) if fresh else {**kept["attributes"], **event.attributes}
    lists = set(event.lists) if fresh else set(kept["lists"]).union(event.lists)
    return {
        "id": kept.get("id", event.contact_id),
        "email": event.email,
        "first_name": event.first_name,
        "last_name": event.last_name,
        "attributes": attributes,
        "lists": sorted(lists),
        "unsubscribed_lists": sorted(kept.get("unsubscribed_lists", ())),
        "globally_unsubscribed": kept.get("globally_unsubscribed", False),
        "suppressed_reason": kept.get("suppressed_reason"),
        "deleted": False,
        "partition": partition,
        "first_offset": kept["first_offset"] if existing else offset,
    }


class StoredForm(msgspec.Struct, gc=False):
    """A stored contact as `audience.to_stored` lays it out (same fields, same order), for
    encoding a new contact without building a dict first."""

    id: str
    email: str
    first_name: str
    last_name: str
    attributes: dict[str, str]
    lists: list[str]
    unsubscribed_lists: list[str]
    globally_unsubscribed: bool
    suppressed_reason: str | None
    deleted: bool
    partition: int
    first_offset: int


_stored_encoder = msgspec.json.Encoder()


def new_contact(event: Upsert, *, offset: int, partition: int) -> bytes:
    """The stored JSON of the contact `event` creates (nothing stored under its key before):
    the bytes `encode_stored(apply_record(None, event, ...))` gives, without the dict."""
    lists = event.lists if len(event.lists) < 2 else sorted(set(event.lists))
    return _stored_encoder.encode(StoredForm(
        event.contact_id, event.email, event.first_name, event.last_name, event.attributes,
        lists, [], False, None, False, partition, offset))


def encode_stored(stored: StoredContact) -> bytes:
    """A stored contact's JSON (compact, keys in the dict's order)."""
    return _stored_encoder.encode(stored)


def _aware_time(text: str) -> bool:
    if not _AWARE_TIME.fullmatch(text):
        return False
    try:
        datetime.fromisoformat(text)
    except ValueError:  # e.g. month 13, or an offset of 24 h or more
        return False
    return True
