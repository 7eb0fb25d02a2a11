"""Wire records of one partition's fan-out, encoded without a pydantic model per recipient.

Hydration writes one record per contact of the audience; building and dumping an Envelope
model for each costs more than everything else in the fan-out together. The contacts were
validated when their events were applied, so `RecipientRecords` writes the envelope JSON
itself: everything the campaign shares (template, tenant, flow ids, timestamp) is encoded
once per fan-out, and per recipient only the contact's own fields. The result decodes
(`schemas.envelope.decode`) to exactly the message `wrap_caused_by` + `encode` would give,
which tests/unit/test_hydrator_recipients.py checks.

Event ids are derived from the fan-out's cause and the contact (uuid5), so a fan-out that is
redone writes records with the same ids.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from schemas.envelope import Envelope, envelope_timestamp
from schemas.events import MessageTemplate, RecipientExcluded, RecipientQueued
from schemas.ids import Uuid5Names
from schemas.registry import wire_name

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _head(type_name: str, version: int, cause: Envelope, campaign_id: str, at: str) -> str:
    """The envelope's fields after the id, up to the payload's opening brace."""
    return (
        f',"type":{_dumps(type_name)},"version":{version},"tenant_id":{_dumps(cause.tenant_id)}'
        f',"aggregate_id":{_dumps(campaign_id)},"occurred_at":"{at}"'
        f',"correlation_id":"{cause.correlation_id}","causation_id":"{cause.id}"'
        f',"payload":{{"campaign_id":{_dumps(campaign_id)}'
    )


class RecipientRecords:
    """Encodes RecipientQueued / RecipientExcluded envelopes for one campaign's fan-out,
    caused by `cause` (the HydrationRequested envelope)."""

    def __init__(self, *, campaign_id: str, template: MessageTemplate, cause: Envelope,
                 occurred_at: datetime | None = None) -> None:
        at = envelope_timestamp(occurred_at or datetime.now(UTC))
        self._ids = uuid.uuid5(uuid.NAMESPACE_URL, f"hydration:{cause.id}")
        self.event_id = Uuid5Names(self._ids)  # uuid5(this fan-out, contact id), as text
        self._queued_head = _head(*wire_name(RecipientQueued), cause, campaign_id, at)
        self._excluded_head = _head(*wire_name(RecipientExcluded), cause, campaign_id, at)
        self._template = _dumps(template.model_dump(mode="json"))

    def queued(self, contact: dict[str, Any]) -> bytes:
        contact_id = contact["id"]
        return (
            f'{{"id":"{self.event_id(contact_id)}"{self._queued_head}'
            f',"contact_id":{_dumps(contact_id)},"email":{_dumps(contact["email"])}'
            f',"first_name":{_dumps(contact["first_name"])},"last_name":{_dumps(contact["last_name"])}'
            f',"attributes":{_dumps(contact["attributes"])},"template":{self._template}}}}}'
        ).encode()

    def excluded(self, contact: dict[str, Any], reason: str) -> bytes:
        contact_id = contact["id"]
        return (
            f'{{"id":"{self.event_id(contact_id)}"{self._excluded_head}'
            f',"contact_id":{_dumps(contact_id)},"email":{_dumps(contact["email"])}'
            f',"reason":{_dumps(reason)}}}}}'
        ).encode()
