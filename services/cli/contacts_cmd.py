"""`campaignctl contacts add|get|unsubscribe|delete`: one contact at a time.

`add` writes ContactUpserted (fields as given; lists are added, never removed), `unsubscribe`
ContactUnsubscribed (globally, or from one list), `delete` ContactDeleted, each onto
contacts.events under the contact's key, returning once the broker acknowledged it. `get`
reads the contact read models, so it shows a change once the projector has applied it.
A contact is named by its id or by an address (every contact of that address's identity).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Annotated

import psycopg
import typer

from projections.contact_queries import ContactView, contacts_by_email, contacts_by_id
from schemas.base import Record, normalise_email
from schemas.contacts import ContactDeleted, ContactUnsubscribed, ContactUpserted, contact_id_for
from services.cli.contact_flags import contacts_named, publish_contact_facts
from services.cli.failures import EXIT_FATAL, EXIT_INVALID, cli_settings, fail, fatal_errors, out

Tenant = Annotated[str, typer.Option("--tenant", help="Tenant id.")]
ContactArg = Annotated[str, typer.Argument(help="Contact id, or e-mail address (any case).")]
Reason = Annotated[str, typer.Option("--reason", help="Why, for the record.")]


def _attributes(pairs: list[str]) -> dict[str, str]:
    attributes = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            fail(f"--attr takes name=value, got {pair!r}", EXIT_INVALID)
        attributes[name.strip()] = value
    return attributes


def add(
    email: Annotated[str, typer.Argument(help="E-mail address.")],
    tenant: Tenant,
    first_name: Annotated[str, typer.Option("--first-name")] = "",
    last_name: Annotated[str, typer.Option("--last-name")] = "",
    attr: Annotated[list[str] | None, typer.Option("--attr", help="name=value (repeat).")] = None,
    list_ids: Annotated[list[str] | None, typer.Option("--list", help="Add to list (repeat).")] = None,
) -> None:
    """Add a contact or update its fields: ContactUpserted, with the id of its address."""
    attributes = _attributes(attr or [])
    with fatal_errors():
        address = normalise_email(email)
        contact_id = contact_id_for(tenant, address)
        upsert = ContactUpserted(contact_id=contact_id, email=address, first_name=first_name,
                                 last_name=last_name, attributes=attributes, lists=list_ids or [])
        publish_contact_facts(cli_settings(), tenant, [(contact_id, upsert)], f"upsert of {email}")
    out.print(f"upserted {contact_id}", highlight=False)


def get(
    contact: ContactArg, tenant: Tenant,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per contact.")] = False,
) -> None:
    """Show a contact as the read models hold it (exit 1 when none is found)."""
    with fatal_errors(), psycopg.connect(cli_settings().database_url, connect_timeout=10) as conn:
        found = (contacts_by_email(conn, tenant, contact.strip()) if "@" in contact
                 else contacts_by_id(conn, tenant, [contact]))
    if not found:
        fail(f"no contact {contact!r} in tenant {tenant!r}", EXIT_FATAL)
    for view in found:
        out.print(json.dumps(asdict(view)) if as_json else _render(view), highlight=False,
                  markup=False)


def _render(view: ContactView) -> str:
    flags = [name for name, on in (("deleted", view.deleted),
                                   ("globally unsubscribed", view.globally_unsubscribed)) if on]
    if view.suppressed_reason:
        flags.append(f"suppressed ({view.suppressed_reason})")
    if view.unsubscribed_lists:
        flags.append(f"unsubscribed from {', '.join(view.unsubscribed_lists)}")
    name = f"{view.first_name} {view.last_name}".strip()
    return "\n".join([
        f"{view.contact_id}  {view.email}" + (f"  ({name})" if name else ""),
        f"  lists: {', '.join(view.lists) or '-'}",
        f"  attributes: {json.dumps(view.attributes, sort_keys=True)}",
        f"  flags: {', '.join(flags) or '-'}",
    ])


def _publish_each(tenant: str, contact: str, fact: Callable[[str], Record], what: str) -> None:
    """`fact(contact_id)` for every contact `contact` names."""
    with fatal_errors():
        settings = cli_settings()
        ids = contacts_named(settings, tenant, contact)
        publish_contact_facts(settings, tenant, [(cid, fact(cid)) for cid in ids],
                              f"{what} of {contact}")
    out.print(f"{what}: {', '.join(ids)}", highlight=False)


def unsubscribe(
    contact: ContactArg, tenant: Tenant, reason: Reason = "",
    list_id: Annotated[str | None, typer.Option("--list", help="Only from this list (default: "
                                                "from every mailing).")] = None,
) -> None:
    """Unsubscribe a contact, globally or from one list: ContactUnsubscribed."""
    _publish_each(tenant, contact, lambda cid: ContactUnsubscribed(
        contact_id=cid, list_id=list_id, reason=reason), "unsubscribed")


def delete(contact: ContactArg, tenant: Tenant) -> None:
    """Delete a contact: ContactDeleted (no later campaign mails it)."""
    _publish_each(tenant, contact, lambda cid: ContactDeleted(contact_id=cid), "deleted")
