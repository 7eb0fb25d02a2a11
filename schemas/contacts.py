"""Contact events on contacts.events, keyed by tenant + contact id, and their pure fold.

`apply_contact_event(state, event)` folds the events into a ContactState;
`exclusion_reason(state, list_ids)` says why a contact must not be mailed (or None). Every
reader of contacts.events folds with these two (the projector, the hydrator's replicas) or
holds a subset of the same rules that the unit tests compare with them (the sender's
do-not-mail list).

Contact identity: a contact id is a name-based UUID of tenant + `email_identity` (the whole
address lower-cased, IDN domains in ASCII form), so `Ann@Example.COM` and `ann@example.com`
are one contact while the address is stored and delivered as given. Ids of addresses whose
local part is lower-case are the same as before this rule (their identity string did not
change). Contacts created earlier from a mixed-case local part keep their id: the import
finds them by identity (`services.cli.existing_contacts`) and writes to them, and merges
contacts that only differed in case (see `services.cli.identity_merge`).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

from pydantic import Field, model_validator

from schemas.base import Email, EntityId, Record, email_identity
from schemas.registry import message, upcaster

# Namespace for contact ids derived from tenant + e-mail identity.
_CONTACT_NAMESPACE = uuid.UUID("6f1f5d4e-8a43-4c1e-9a37-2b8f3c0d5e21")


def contact_id_for(tenant_id: str, email: str) -> str:
    """Deterministic contact id: the same person (`email_identity`: the address regardless of
    case) in the same tenant is the same contact."""
    return str(uuid.uuid5(_CONTACT_NAMESPACE, f"{tenant_id}\x00{email_identity(email)}"))


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


@message("ContactAttributesChanged", 1)
class ContactAttributesChanged(Record):
    """Attributes set to new values and attributes removed; others are left as they are."""

    contact_id: EntityId
    set: dict[str, str] = Field(default_factory=dict)
    unset: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _set_and_unset_are_disjoint(self) -> ContactAttributesChanged:
        both = sorted(k for k in self.unset if k in self.set)
        if both:
            raise ValueError(f"attributes both set and unset: {', '.join(both)}")
        return self


@message("ContactListMembershipAdded", 1)
class ContactListMembershipAdded(Record):
    contact_id: EntityId
    list_id: EntityId


@message("ContactListMembershipRemoved", 1)
class ContactListMembershipRemoved(Record):
    contact_id: EntityId
    list_id: EntityId


@message("ContactUnsubscribed", 2)
class ContactUnsubscribed(Record):
    """The contact asked not to be mailed: from one list, or from everything (list_id None).
    `campaign_id`: the campaign whose mail it unsubscribed from (a one-click unsubscribe from
    its List-Unsubscribe), counted in that campaign's engagement; None when not from a mail."""

    contact_id: EntityId
    list_id: EntityId | None = None
    reason: str = Field(default="", max_length=1000)
    campaign_id: EntityId | None = None


# What a v1 one-click unsubscribe (services.api.unsubscribe) said in its reason.
_V1_ONE_CLICK_REASON = re.compile(
    r"one-click unsubscribe from campaign ([A-Za-z0-9][A-Za-z0-9_.:-]{0,127})")


@upcaster("ContactUnsubscribed", 1)
def upcast_contact_unsubscribed_v1_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 named the campaign of a one-click unsubscribe only in its reason: taken from there;
    any other v1 unsubscribe was from no campaign's mail."""
    found = _V1_ONE_CLICK_REASON.fullmatch(str(payload.get("reason", "")))
    return {**payload, "campaign_id": found.group(1) if found else None}


SuppressionReason = Literal["hard_bounce", "complaint", "manual_blocklist"]


@message("ContactSuppressed", 1)
class ContactSuppressed(Record):
    """The address must not be mailed at all (bounced hard, complained, or blocklisted)."""

    contact_id: EntityId
    reason: SuppressionReason
    detail: str = Field(default="", max_length=1000)


@message("ContactUnsuppressed", 1)
class ContactUnsuppressed(Record):
    """An operator lifted the contact's suppression (whatever its reason): it may be mailed
    again. The only fact that undoes a ContactSuppressed."""

    contact_id: EntityId
    detail: str = Field(default="", max_length=1000)


@message("ContactResubscribed", 1)
class ContactResubscribed(Record):
    """The contact asked to be mailed again: to one list, or everything (list_id None lifts
    the global unsubscribe). The only fact that undoes a ContactUnsubscribed."""

    contact_id: EntityId
    list_id: EntityId | None = None
    detail: str = Field(default="", max_length=1000)


@message("ContactDeleted", 1)
class ContactDeleted(Record):
    """The contact is erased: its address, names, attributes and lists are forgotten."""

    contact_id: EntityId


ContactEvent = (
    ContactUpserted | ContactAttributesChanged | ContactListMembershipAdded
    | ContactListMembershipRemoved | ContactUnsubscribed | ContactSuppressed | ContactDeleted
    | ContactUnsuppressed | ContactResubscribed
)
# Every contact event class, for isinstance checks by readers of contacts.events.
CONTACT_EVENT_TYPES: tuple[type[Record], ...] = get_args(ContactEvent)
# The events that set or lift a do-not-mail flag (suppression, unsubscribe, deletion).
FLAG_EVENT_TYPES = (
    ContactUnsubscribed, ContactSuppressed, ContactDeleted, ContactUnsuppressed, ContactResubscribed,
)


# --- state (pure fold) -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContactState:
    """A contact as its events leave it. See `apply_contact_event` for the rules."""

    id: str
    email: str
    first_name: str = ""
    last_name: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    lists: frozenset[str] = frozenset()
    unsubscribed_lists: frozenset[str] = frozenset()
    globally_unsubscribed: bool = False
    suppressed_reason: str | None = None
    deleted: bool = False


def apply_contact_event(state: ContactState | None, event: ContactEvent) -> ContactState | None:
    """The contact after `event` (pure; `state` is never modified).

    Rules:
    - ContactUpserted creates the contact, or replaces e-mail and names, adds its attributes
      (existing ones it does not name are kept) and adds its lists (as the hydrator merges).
      On a deleted contact it starts afresh, keeping only unsubscribes and suppression. It
      never touches a suppression or an unsubscribe: an import cannot lift them.
    - Suppressions and unsubscribes are lifted only by their own explicit facts:
      ContactUnsuppressed clears the suppression, ContactResubscribed the global unsubscribe
      (list_id None) or that list's.
    - ContactSuppressed records its reason (the latest suppression wins); ContactUnsubscribed
      with a list id records that list, without one a global unsubscribe.
    - A suppression or unsubscribe for a contact never upserted (state None) is kept on an
      address-less contact, stored as deleted: a later upsert starts it afresh with the
      flag, as after a deletion. Any other event for a contact never upserted is ignored:
      there is no address to attach it to.
    - ContactAttributesChanged removes `unset` and writes `set`.
    - ContactListMembershipAdded / Removed add or remove one list. Adding a membership does
      not undo an unsubscribe from that list: re-subscribing needs ContactResubscribed.
    - ContactDeleted forgets address, names, attributes and lists but keeps unsubscribes and
      suppression, so a contact re-imported after deletion is still not mailed against them.
    - Attribute and membership events on a deleted contact are ignored; flags are still
      recorded and lifted.
    """
    if isinstance(event, ContactUpserted):
        if state is None or state.deleted:
            kept = state or ContactState(event.contact_id, "")
            return replace(
                kept, email=event.email, first_name=event.first_name, last_name=event.last_name,
                attributes=dict(event.attributes), lists=frozenset(event.lists), deleted=False,
            )
        return replace(
            state, email=event.email, first_name=event.first_name, last_name=event.last_name,
            attributes={**state.attributes, **event.attributes}, lists=state.lists | set(event.lists),
        )
    if state is None:
        if not isinstance(event, ContactSuppressed | ContactUnsubscribed):
            return None
        state = ContactState(event.contact_id, "", deleted=True)
    if isinstance(event, ContactUnsubscribed):
        if event.list_id is None:
            return replace(state, globally_unsubscribed=True)
        return replace(state, unsubscribed_lists=state.unsubscribed_lists | {event.list_id})
    if isinstance(event, ContactSuppressed):
        return replace(state, suppressed_reason=event.reason)
    if isinstance(event, ContactUnsuppressed):
        return replace(state, suppressed_reason=None)
    if isinstance(event, ContactResubscribed):
        if event.list_id is None:
            return replace(state, globally_unsubscribed=False)
        return replace(state, unsubscribed_lists=state.unsubscribed_lists - {event.list_id})
    if state.deleted:
        return state
    if isinstance(event, ContactAttributesChanged):
        attributes = {k: v for k, v in state.attributes.items() if k not in event.unset}
        attributes.update(event.set)
        return replace(state, attributes=attributes)
    if isinstance(event, ContactListMembershipAdded):
        return replace(state, lists=state.lists | {event.list_id})
    if isinstance(event, ContactListMembershipRemoved):
        return replace(state, lists=state.lists - {event.list_id})
    return replace(state, email="", first_name="", last_name="", attributes={}, lists=frozenset(),
                   deleted=True)


def fold_contact(events: Iterable[ContactEvent],
                 state: ContactState | None = None) -> ContactState | None:
    """The state after every event in order, from `state` (default: nothing)."""
    for event in events:
        state = apply_contact_event(state, event)
    return state


def exclusion_reason(state: ContactState, list_ids: Collection[str] = ()) -> str | None:
    """Why `state` must not be mailed by a campaign targeting `list_ids`, or None.

    In order of precedence: "deleted"; "suppressed:<reason>"; "unsubscribed" when globally
    unsubscribed, or when the contact is reached through some of `list_ids` (it is a member)
    and has unsubscribed from every one of those. A list-scoped unsubscribe therefore never
    excludes a contact reached through another targeted list it has not left, nor one
    targeted only by id or segment (pass no `list_ids`): it only speaks for its own list.
    """
    if state.deleted:
        return "deleted"
    if state.suppressed_reason is not None:
        return f"suppressed:{state.suppressed_reason}"
    if state.globally_unsubscribed:
        return "unsubscribed"
    reached = state.lists.intersection(list_ids)
    if reached and reached <= state.unsubscribed_lists:
        return "unsubscribed"
    return None
