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
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any, cast

import msgspec

from schemas.base import ENTITY_ID_RE, MAX_EMAIL_OCTETS, NORMALISED_EMAIL_RE, TENANT_ID_RE
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


class Upsert(msgspec.Struct, forbid_unknown_fields=True):
    """A validated ContactUpserted payload (the fast path's form of it)."""

    contact_id: str
    email: str
    first_name: str = ""
    last_name: str = ""
    attributes: dict[str, str] = msgspec.field(default_factory=dict)
    lists: list[str] = msgspec.field(default_factory=list)


class _Envelope(msgspec.Struct, forbid_unknown_fields=True):
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


def contact_event(raw: bytes | None) -> ContactEvent | Upsert | None:
    """The contact event of one contacts.events record value (an Upsert for a ContactUpserted
    taken by the fast path); None for a valid record of another type; SchemaViolation (with
    the pydantic path's reason) for an invalid one."""
    if raw is not None:
        fast = _fast_upsert(raw)
        if fast is not None:
            return fast
    payload = decode(raw).payload
    return cast(ContactEvent, payload) if isinstance(payload, CONTACT_EVENT_TYPES) else None


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
            and ENTITY_ID_RE.fullmatch(body.contact_id)
            # Exactly the addresses `Email` reads back unchanged.
            and len(body.email) <= MAX_EMAIL_OCTETS and NORMALISED_EMAIL_RE.fullmatch(body.email)
            and len(body.first_name) <= MAX_NAME_CHARS and len(body.last_name) <= MAX_NAME_CHARS
            and all(ENTITY_ID_RE.fullmatch(list_id) for list_id in body.lists)):
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


def _aware_time(text: str) -> bool:
    if not _AWARE_TIME.fullmatch(text):
        return False
    try:
        datetime.fromisoformat(text)
    except ValueError:  # e.g. month 13, or an offset of 24 h or more
        return False
    return True
