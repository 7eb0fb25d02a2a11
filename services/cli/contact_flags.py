"""Lifting a suppression or an unsubscribe: the only way either is undone, recorded as a fact.

`lift_flag(settings, tenant, contact, kind)` writes ContactUnsuppressed (kind "unsuppress") or
ContactResubscribed (kind "resubscribe", for one list or, without one, the global
unsubscribe) onto contacts.events for the contact, and returns once the broker acknowledged
every record (or raises). `contact` is a contact id or an e-mail address; an address names
every contact of its identity (`email_identity`), the one under the identity's own id and any
made before ids followed the identity, so no copy of the person keeps the flag and hands it
back at a later merge.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from confluent_kafka import KafkaError, Message
from pydantic import TypeAdapter

from schemas.base import EntityId, Record, TenantId, normalise_email
from schemas.contacts import ContactResubscribed, ContactUnsuppressed, contact_id_for, contact_key
from schemas.envelope import encode, wrap
from services.cli.existing_contacts import scan_contacts
from services.cli.publishing import ACK_TIMEOUT_SECONDS, CommandNotAcknowledged, cli_producer, require_topic
from services.common.settings import Settings
from services.common.topics import CONTACTS, topic_name

FlagKind = Literal["unsuppress", "resubscribe"]


def contacts_named(settings: Settings, tenant_id: str, contact: str) -> list[str]:
    """The contact ids `contact` (an id, or an address) names; an address is checked like an
    imported one (InvalidEmail with the reason)."""
    if "@" not in contact:
        return [TypeAdapter(EntityId).validate_python(contact)]
    own = contact_id_for(tenant_id, normalise_email(contact))
    known = scan_contacts(settings, tenant_id).identities.get(own, {})
    return sorted({own, *known})


def lift_flag(settings: Settings, tenant_id: str, contact: str, kind: FlagKind, *,
              list_id: str | None = None, detail: str = "") -> list[str]:
    """Write the lifting fact for every contact `contact` names; returns their ids."""
    TypeAdapter(TenantId).validate_python(tenant_id)
    if list_id is not None:
        TypeAdapter(EntityId).validate_python(list_id)
    ids = contacts_named(settings, tenant_id, contact)
    payloads: list[Record] = [
        ContactUnsuppressed(contact_id=cid, detail=detail) if kind == "unsuppress"
        else ContactResubscribed(contact_id=cid, list_id=list_id, detail=detail)
        for cid in ids
    ]
    publish_contact_facts(settings, tenant_id, list(zip(ids, payloads, strict=True)), f"{kind} of {contact}")
    return ids


def publish_contact_facts(settings: Settings, tenant_id: str, facts: Sequence[tuple[str, Record]],
                          what: str) -> None:
    """Write each (contact id, payload) onto contacts.events under the contact's key, in
    order per contact; returns once the broker acknowledged every one, or raises
    CommandNotAcknowledged naming `what`."""
    topic = topic_name(CONTACTS, settings)
    producer = cli_producer(settings)
    require_topic(producer, topic, settings)
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err)

    for cid, payload in facts:
        envelope = wrap(payload, tenant_id=tenant_id, aggregate_id=cid)
        producer.produce(topic, key=contact_key(tenant_id, cid), value=encode(envelope),
                         on_delivery=on_delivery)
    if producer.flush(ACK_TIMEOUT_SECONDS):
        producer.purge()
        producer.flush(0)
        raise CommandNotAcknowledged(
            f"{what} was not acknowledged within {ACK_TIMEOUT_SECONDS:.0f} s; it may or may not"
            " have arrived (repeating it is safe)")
    if errors:
        raise CommandNotAcknowledged(f"{what} was refused: {errors[0].str()}")
