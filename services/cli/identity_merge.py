"""Which contact an address's rows go to, and how contacts that were one person are merged.

Pure decisions, no I/O. Their input is what `existing_contacts.scan_contacts` found on
contacts.events: for each identity (`schemas.base.email_identity`) that has a contact under an
id other than the identity's own (`contact_id_for`), every contact of that identity. Those are
contacts created before contact ids followed the identity, from an address whose local part
was not lower-case (`Ann@example.com`), and the contact the identity's own id names, if any.

Rules (`resolve_identity`):
- The survivor is the contact under the identity's own id when it exists, else the oldest
  contact of the identity (first upsert, then contact id). An identity with one old contact
  and nothing under its own id keeps that contact: rows for `ann@`, `Ann@` or `ANN@` all go
  to it, no second contact is made.
- Every other contact of the identity is merged into the survivor, after the row's upsert:
  its list memberships and every flag it holds that the survivor lacks (suppression, global
  and per-list unsubscribes) are written onto the survivor as their own facts, then it is
  deleted (ContactDeleted keeps its flags, and it is no longer in any list). Nothing that
  kept either contact from being mailed is lost; the survivor's own suppression reason is
  never replaced. Names and attributes of a merged contact are not carried over: the
  imported row is the person's data now.
- Merging is idempotent: once merged, a contact is deleted and its flags are already on the
  survivor, so a later import writes nothing more, except a flag the merged contact got since
  (an unsubscribe link from an older mail), which is then carried over too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from schemas.base import Record
from schemas.contacts import (
    ContactDeleted,
    ContactListMembershipAdded,
    ContactState,
    ContactSuppressed,
    ContactUnsubscribed,
)

# Written on the facts a merge carries over, so their origin stays readable.
MERGED_DETAIL = "merged from contact {contact_id} (same address but for case)"


@dataclass(frozen=True, slots=True)
class KnownContact:
    """A contact as contacts.events leave it, with when it was first upserted."""

    state: ContactState
    first_upserted: datetime


@dataclass(frozen=True, slots=True)
class Resolution:
    """Where an identity's rows go (`target`), and the facts (contact id, payload) that merge
    its other contacts into it, written after the target's upsert."""

    target: str
    merges: tuple[tuple[str, Record], ...] = ()

    @property
    def merged(self) -> int:
        """Contacts this resolution deletes into the target."""
        return sum(isinstance(payload, ContactDeleted) for _, payload in self.merges)


def resolve_identity(own_id: str, contacts: Iterable[KnownContact]) -> Resolution:
    """The survivor of one identity and the merge of its other contacts (module rules).
    `own_id` is the identity's own contact id; `contacts` are the identity's known contacts."""
    known = {c.state.id: c for c in contacts}
    if not known:
        return Resolution(own_id)
    if own_id in known:
        survivor = known[own_id]
    else:
        survivor = min(known.values(), key=lambda c: (c.first_upserted, c.state.id))
    target = survivor.state
    merges: list[tuple[str, Record]] = []
    suppressed = target.suppressed_reason is not None
    unsubscribed = target.globally_unsubscribed
    unsubscribed_lists = set(target.unsubscribed_lists)
    lists = set(target.lists)
    for other in sorted(known.values(), key=lambda c: (c.first_upserted, c.state.id)):
        state = other.state
        if state.id == target.id:
            continue
        detail = MERGED_DETAIL.format(contact_id=state.id)
        for list_id in sorted(state.lists - lists):
            merges.append((target.id, ContactListMembershipAdded(contact_id=target.id, list_id=list_id)))
            lists.add(list_id)
        if state.suppressed_reason is not None and not suppressed:
            merges.append((target.id, ContactSuppressed(contact_id=target.id, reason=state.suppressed_reason,
                                                        detail=detail)))
            suppressed = True
        if state.globally_unsubscribed and not unsubscribed:
            merges.append((target.id, ContactUnsubscribed(contact_id=target.id, reason=detail)))
            unsubscribed = True
        for list_id in sorted(state.unsubscribed_lists - unsubscribed_lists):
            merges.append((target.id, ContactUnsubscribed(contact_id=target.id, list_id=list_id,
                                                          reason=detail)))
            unsubscribed_lists.add(list_id)
        if not state.deleted:
            merges.append((state.id, ContactDeleted(contact_id=state.id)))
    return Resolution(target.id, tuple(merges))


def resolve_identities(identities: Mapping[str, Mapping[str, KnownContact]]) -> dict[str, Resolution]:
    """`resolve_identity` for every identity (own id -> its contacts by id), keyed by the
    identity's own contact id."""
    return {own_id: resolve_identity(own_id, contacts.values()) for own_id, contacts in identities.items()}
