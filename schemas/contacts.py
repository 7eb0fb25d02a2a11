"""Contact events on contacts.events, keyed by tenant + contact id."""

from __future__ import annotations

import uuid

from pydantic import Field

from schemas.base import Email, EntityId, Record
from schemas.registry import message

# Namespace for contact ids derived from tenant + normalised e-mail.
_CONTACT_NAMESPACE = uuid.UUID("6f1f5d4e-8a43-4c1e-9a37-2b8f3c0d5e21")


def contact_id_for(tenant_id: str, normalised_email: str) -> str:
    """Deterministic contact id: the same address in the same tenant is the same contact."""
    return str(uuid.uuid5(_CONTACT_NAMESPACE, f"{tenant_id}\x00{normalised_email}"))


def contact_key(tenant_id: str, contact_id: str) -> bytes:
    """Kafka key for contact and recipient records: spreads a tenant over all partitions."""
    return f"{tenant_id}:{contact_id}".encode()


@message("ContactUpserted", 1)
class ContactUpserted(Record):
    """A contact's current fields; list ids are memberships added by this upsert."""

    contact_id: EntityId
    email: Email
    first_name: str = Field(default="", max_length=200)
    last_name: str = Field(default="", max_length=200)
    attributes: dict[str, str] = Field(default_factory=dict)
    lists: list[EntityId] = Field(default_factory=list)
