"""The migration of contact ids made before ids followed the identity: which contact an
identity's rows go to, what a merge writes (`identity_merge`), and what the import's scan of
contacts.events finds (`existing_contacts.IdentityScan`)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from schemas.contacts import (
    _CONTACT_NAMESPACE,
    ContactDeleted,
    ContactListMembershipAdded,
    ContactState,
    ContactSuppressed,
    ContactUnsubscribed,
    ContactUnsuppressed,
    ContactUpserted,
    apply_contact_event,
    contact_id_for,
    contact_key,
    exclusion_reason,
)
from schemas.envelope import encode, wrap
from services.cli.existing_contacts import IdentityScan
from services.cli.identity_merge import KnownContact, resolve_identity

T0 = datetime(2026, 1, 1, tzinfo=UTC)
OWN = contact_id_for("acme", "ann@example.com")


def old_id(address: str) -> str:
    """The id an earlier version gave `address` (domain lower-cased only)."""
    return str(uuid.uuid5(_CONTACT_NAMESPACE, f"acme\x00{address}"))


def known(contact_id: str, email: str, minutes: int = 0, **fields) -> KnownContact:
    return KnownContact(ContactState(contact_id, email, **fields), T0 + timedelta(minutes=minutes))


def after_merge(contacts: dict[str, ContactState], merges) -> dict[str, ContactState]:
    out = dict(contacts)
    for cid, payload in merges:
        state = apply_contact_event(out.get(cid), payload)
        assert state is not None
        out[cid] = state
    return out


def test_an_identity_nobody_had_goes_to_its_own_id():
    assert resolve_identity(OWN, []).target == OWN


def test_one_old_contact_keeps_its_id_and_nothing_is_merged():
    # Ann@ was imported by an earlier version: ann@ / ANN@ rows land on it, no second contact.
    old = known(old_id("Ann@example.com"), "Ann@example.com", lists=frozenset({"a"}))
    resolution = resolve_identity(OWN, [old])
    assert (resolution.target, resolution.merges, resolution.merged) == (old.state.id, (), 0)


def test_the_own_id_survives_and_takes_every_list_and_flag_of_the_other():
    own = known(OWN, "ann@example.com", minutes=5, lists=frozenset({"b"}))
    other = known(old_id("Ann@example.com"), "Ann@example.com", lists=frozenset({"a", "b"}),
                  suppressed_reason="hard_bounce", globally_unsubscribed=True,
                  unsubscribed_lists=frozenset({"a"}))
    resolution = resolve_identity(OWN, [other, own])
    assert resolution.target == OWN and resolution.merged == 1
    states = after_merge({OWN: own.state, other.state.id: other.state}, resolution.merges)
    survivor = states[OWN]
    assert survivor.lists == {"a", "b"}
    assert survivor.suppressed_reason == "hard_bounce"
    assert survivor.globally_unsubscribed and survivor.unsubscribed_lists == {"a"}
    assert states[other.state.id].deleted  # no longer in any list: never mailed on its own
    assert exclusion_reason(survivor, ["a", "b"]) == "suppressed:hard_bounce"


def test_the_survivors_own_suppression_reason_is_never_replaced():
    own = known(OWN, "ann@example.com", suppressed_reason="complaint")
    other = known(old_id("Ann@example.com"), "Ann@example.com", suppressed_reason="hard_bounce")
    resolution = resolve_identity(OWN, [own, other])
    assert not any(isinstance(p, ContactSuppressed) for _, p in resolution.merges)
    assert [type(p) for _, p in resolution.merges] == [ContactDeleted]


def test_without_the_own_id_the_oldest_contact_survives():
    first = known(old_id("ANN@example.com"), "ANN@example.com", minutes=1)
    later = known(old_id("Ann@example.com"), "Ann@example.com", minutes=9, lists=frozenset({"x"}))
    resolution = resolve_identity(OWN, [later, first])
    assert resolution.target == first.state.id
    assert [(cid, type(p)) for cid, p in resolution.merges] == [
        (first.state.id, ContactListMembershipAdded), (later.state.id, ContactDeleted)]


def test_merging_twice_writes_nothing_more():
    own = known(OWN, "ann@example.com")
    other = known(old_id("Ann@example.com"), "Ann@example.com", lists=frozenset({"a"}),
                  globally_unsubscribed=True)
    first = resolve_identity(OWN, [own, other])
    states = after_merge({OWN: own.state, other.state.id: other.state}, first.merges)
    again = resolve_identity(OWN, [KnownContact(s, T0) for s in states.values()])
    assert again.target == OWN and again.merges == ()


def test_a_flag_the_merged_contact_got_later_is_carried_over_at_the_next_merge():
    own = known(OWN, "ann@example.com")
    merged = known(old_id("Ann@example.com"), "Ann@example.com", deleted=True, suppressed_reason="complaint")
    resolution = resolve_identity(OWN, [own, merged])
    assert [(cid, type(p)) for cid, p in resolution.merges] == [(OWN, ContactSuppressed)]
    assert resolution.merged == 0


# --- the scan of contacts.events -----------------------------------------------------------


def record(payload, tenant: str = "acme", minutes: int = 0) -> tuple[bytes, bytes]:
    envelope = wrap(payload, tenant_id=tenant, aggregate_id=payload.contact_id,
                    occurred_at=T0 + timedelta(minutes=minutes))
    return contact_key(tenant, payload.contact_id), encode(envelope)


def scan(records, *, present: bool = False) -> IdentityScan:
    result = IdentityScan("acme", present=present)
    for key, value in records:
        result.first_pass(key, value)
    if result.wanted():
        for key, value in records:
            result.second_pass(key, value)
    return result


def test_the_scan_keeps_only_identities_with_an_old_id():
    ann_old = old_id("Ann@example.com")
    bob = contact_id_for("acme", "bob@example.com")
    records = [
        record(ContactUpserted(contact_id=OWN, email="ann@example.com", lists=["b"]), minutes=1),
        record(ContactUpserted(contact_id=bob, email="bob@example.com")),
        record(ContactUpserted(contact_id=ann_old, email="Ann@example.com", lists=["a"]), minutes=2),
        record(ContactSuppressed(contact_id=ann_old, reason="complaint"), minutes=3),
        record(ContactUnsubscribed(contact_id=OWN), minutes=4),
        # another tenant's mixed-case contact is not ours
        record(ContactUpserted(contact_id=str(uuid.uuid4()), email="Zed@example.com"), tenant="other"),
        (contact_key("acme", bob), b"{not json"),
    ]
    found = scan(records).result
    assert set(found.identities) == {OWN}
    contacts = found.identities[OWN]
    assert set(contacts) == {OWN, ann_old}
    assert contacts[ann_old].state.suppressed_reason == "complaint"
    assert contacts[OWN].state.globally_unsubscribed and contacts[OWN].state.lists == {"b"}
    assert contacts[ann_old].first_upserted == T0 + timedelta(minutes=2)
    assert found.present is None


def test_the_scan_follows_presence_for_skip_existing():
    ann_old = old_id("Ann@example.com")
    bob = contact_id_for("acme", "bob@example.com")
    records = [
        record(ContactUpserted(contact_id=ann_old, email="Ann@example.com")),
        record(ContactUpserted(contact_id=bob, email="bob@example.com")),
        record(ContactDeleted(contact_id=bob)),
        record(ContactUnsuppressed(contact_id=ann_old)),
    ]
    assert scan(records, present=True).result.present == {ann_old}


def test_lower_case_data_has_nothing_to_migrate():
    records = [record(ContactUpserted(contact_id=contact_id_for("acme", f"u{n}@example.com"),
                                      email=f"u{n}@example.com")) for n in range(50)]
    assert scan(records).result.identities == {}
