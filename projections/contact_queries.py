"""Read functions over the contact read models (contact_profiles, contacts,
contact_list_members), for the CLI and the read API.

Guarantee: read-only; one statement per call, so a contact's fields, flags and lists are read
as they stood after one committed batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg


@dataclass(frozen=True, slots=True)
class ContactView:
    tenant_id: str
    contact_id: str
    email: str
    first_name: str
    last_name: str
    attributes: dict[str, str]
    lists: list[str]
    globally_unsubscribed: bool
    unsubscribed_lists: list[str]
    suppressed_reason: str | None
    deleted: bool


_SELECT = """
SELECT p.tenant_id, p.contact_id, p.email, p.first_name, p.last_name, p.attributes,
       COALESCE((SELECT array_agg(m.list_id ORDER BY m.list_id) FROM contact_list_members m
                 WHERE m.tenant_id = p.tenant_id AND m.contact_id = p.contact_id), '{}'),
       COALESCE(c.globally_unsubscribed, false), COALESCE(c.unsubscribed_lists, '{}'),
       c.suppressed_reason, p.deleted OR COALESCE(c.deleted, false)
FROM contact_profiles p
LEFT JOIN contacts c ON c.tenant_id = p.tenant_id AND c.contact_id = p.contact_id
WHERE p.tenant_id = %(tenant)s
"""


def contacts_by_id(conn: psycopg.Connection[Any], tenant_id: str,
                   contact_ids: list[str]) -> list[ContactView]:
    """The tenant's contacts of those ids that the read model knows, by id."""
    rows = conn.execute(_SELECT + " AND p.contact_id = ANY(%(ids)s) ORDER BY p.contact_id",
                        {"tenant": tenant_id, "ids": contact_ids}).fetchall()
    return [ContactView(*row) for row in rows]


def contacts_by_email(conn: psycopg.Connection[Any], tenant_id: str, email: str) -> list[ContactView]:
    """The tenant's contacts whose address is `email` in any case (case twins included)."""
    rows = conn.execute(_SELECT + " AND lower(p.email) = lower(%(email)s) ORDER BY p.contact_id",
                        {"tenant": tenant_id, "email": email}).fetchall()
    return [ContactView(*row) for row in rows]
