"""Contacts that must not be mailed any more, as every sender sees them: suppressed,
globally unsubscribed or deleted after their campaign was hydrated.

`DoNotMailList` is the pure fold (the same precedence as the hydrator's exclusion reasons:
"deleted", then "suppressed:<reason>", then "unsubscribed"); `DoNotMailFeed` keeps one up to
date from all of contacts.events (see feeds.TopicFeed). A recipient of such a contact ends
as RecipientSkipped with that reason instead of being mailed.

Guarantees: only contacts with a flag are held in memory; the flags move exactly as
`schemas.contacts.apply_contact_event` moves them (the unit tests compare the two over
random event sequences): a suppression is lifted only by ContactUnsuppressed, a global
unsubscribe only by ContactResubscribed without a list, never by an upsert; a deletion is
undone by a later upsert. List-scoped unsubscribes are left to the hydrator: a recipient
does not say through which lists it was reached.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from confluent_kafka import Message

from schemas.base import Record
from schemas.contacts import (
    FLAG_EVENT_TYPES,
    ContactDeleted,
    ContactResubscribed,
    ContactSuppressed,
    ContactUnsubscribed,
    ContactUnsuppressed,
    ContactUpserted,
    contact_key,
)
from schemas.envelope import SchemaViolation, decode
from schemas.registry import wire_name
from services.common.settings import Settings
from services.common.topics import CONTACTS
from services.sender.feeds import TopicFeed

# Upserts and attribute or list changes are the bulk of contacts.events and matter only for
# contacts flagged deleted: a record that does not even mention a flagging type is never
# decoded, so a feed over millions of upserts costs little.
_FLAGGING = tuple(f'"{wire_name(kind)[0]}"'.encode() for kind in FLAG_EVENT_TYPES)
_UPSERT = b"ContactUpserted"


@dataclass
class _Flags:
    deleted: bool = False
    suppressed: str | None = None
    unsubscribed: bool = False

    @property
    def reason(self) -> str | None:
        if self.deleted:
            return "deleted"
        if self.suppressed is not None:
            return f"suppressed:{self.suppressed}"
        return "unsubscribed" if self.unsubscribed else None


class DoNotMailList:
    """Flags per contact key (tenant + contact id). Thread-safe."""

    def __init__(self) -> None:
        self._flags: dict[bytes, _Flags] = {}
        self._lock = threading.Lock()

    def apply(self, tenant_id: str, event: Record) -> None:
        """Fold one contact event in (events that flag nothing are ignored)."""
        if not isinstance(event, FLAG_EVENT_TYPES):
            return
        key = contact_key(tenant_id, event.contact_id)
        with self._lock:
            flags = self._flags.get(key)
            if flags is None:
                if isinstance(event, ContactUnsuppressed | ContactResubscribed):
                    return  # nothing to lift
                flags = self._flags[key] = _Flags()
            if isinstance(event, ContactSuppressed):
                flags.suppressed = event.reason
            elif isinstance(event, ContactUnsuppressed):
                flags.suppressed = None
            elif isinstance(event, ContactUnsubscribed):
                flags.unsubscribed = flags.unsubscribed or event.list_id is None
            elif isinstance(event, ContactResubscribed):
                flags.unsubscribed = flags.unsubscribed and event.list_id is not None
            elif isinstance(event, ContactDeleted):
                flags.deleted = True
            if flags.reason is None:
                del self._flags[key]  # only flagged contacts are held

    def upserted(self, key: bytes) -> None:
        """A contact (re)created: a deletion no longer applies."""
        with self._lock:
            flags = self._flags.get(key)
            if flags is not None and flags.deleted:
                flags.deleted = False
                if flags.reason is None:
                    del self._flags[key]

    def reason(self, tenant_id: str, contact_id: str) -> str | None:
        """Why this contact must not be mailed, or None."""
        with self._lock:
            flags = self._flags.get(contact_key(tenant_id, contact_id))
            return None if flags is None else flags.reason


class DoNotMailFeed(TopicFeed):
    """All of contacts.events, folded into a DoNotMailList."""

    def __init__(self, settings: Settings, flags: DoNotMailList) -> None:
        super().__init__(settings, CONTACTS, "do-not-mail")
        self.flags = flags

    def apply(self, record: Message) -> None:
        raw = record.value() or b""
        if not any(name in raw for name in _FLAGGING):
            if _UPSERT in raw:
                self.flags.upserted(record.key() or b"")  # key: tenant + contact id
            return
        try:
            message = decode(raw)
        except SchemaViolation:
            return  # the contacts pipeline judges its own records
        payload = message.payload
        if isinstance(payload, ContactUpserted):
            self.flags.upserted(contact_key(message.envelope.tenant_id, payload.contact_id))
        else:
            self.flags.apply(message.envelope.tenant_id, payload)
