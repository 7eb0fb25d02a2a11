"""Contact events: wire round trip, the fold `apply_contact_event`, and `exclusion_reason`."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from schemas.contacts import (
    ContactAttributesChanged,
    ContactDeleted,
    ContactListMembershipAdded,
    ContactListMembershipRemoved,
    ContactResubscribed,
    ContactState,
    ContactSuppressed,
    ContactUnsubscribed,
    ContactUnsuppressed,
    ContactUpserted,
    apply_contact_event,
    contact_id_for,
    exclusion_reason,
    fold_contact,
)
from schemas.envelope import decode, encode, wrap

CID = contact_id_for("acme", "ann@example.com")


def upsert(**fields) -> ContactUpserted:
    return ContactUpserted(**{"contact_id": CID, "email": "ann@example.com", **fields})


def state(*events) -> ContactState:
    folded = fold_contact(events)
    assert folded is not None
    return folded


# --- wire ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        ContactAttributesChanged(contact_id=CID, set={"city": "Paris"}, unset=["plan"]),
        ContactListMembershipAdded(contact_id=CID, list_id="news"),
        ContactListMembershipRemoved(contact_id=CID, list_id="news"),
        ContactUnsubscribed(contact_id=CID, list_id="news", reason="too many"),
        ContactUnsubscribed(contact_id=CID),
        ContactSuppressed(contact_id=CID, reason="hard_bounce", detail="550 no such user"),
        ContactDeleted(contact_id=CID),
        ContactUnsuppressed(contact_id=CID, detail="ticket 42"),
        ContactResubscribed(contact_id=CID, list_id="news", detail="asked by phone"),
        ContactResubscribed(contact_id=CID),
    ],
)
def test_contact_events_round_trip_on_the_wire(event):
    message = decode(encode(wrap(event, tenant_id="acme", aggregate_id=CID)))
    assert message.payload == event
    # ContactUnsubscribed is at v2 (it names the campaign of a one-click unsubscribe).
    version = 2 if isinstance(event, ContactUnsubscribed) else 1
    assert message.envelope.type == type(event).__name__ and message.envelope.version == version


def test_contact_events_are_frozen_and_closed():
    event = ContactDeleted(contact_id=CID)
    with pytest.raises(ValidationError):
        setattr(event, "contact_id", "x")  # noqa: B010 - mypy rejects the assignment this checks
    with pytest.raises(ValidationError, match="Extra inputs"):
        ContactDeleted.model_validate({"contact_id": CID, "why": "x"})


def test_suppression_reason_is_a_closed_vocabulary():
    with pytest.raises(ValidationError):
        ContactSuppressed(contact_id=CID, reason="bored")


def test_an_attribute_cannot_be_set_and_unset_at_once():
    with pytest.raises(ValidationError, match="both set and unset: city"):
        ContactAttributesChanged(contact_id=CID, set={"city": "Paris"}, unset=["city"])


def test_unsubscribe_defaults_to_global():
    assert ContactUnsubscribed(contact_id=CID).list_id is None


# --- fold ----------------------------------------------------------------------------------------


def test_upsert_creates_the_contact():
    s = state(upsert(first_name="Ann", last_name="Lee", attributes={"city": "Paris"}, lists=["l1"]))
    assert s == ContactState(CID, "ann@example.com", "Ann", "Lee", {"city": "Paris"}, frozenset({"l1"}))
    assert exclusion_reason(s, ["l1"]) is None


def test_upsert_replaces_fields_adds_attributes_and_lists():
    s = state(
        upsert(first_name="Ann", attributes={"city": "Paris", "plan": "pro"}, lists=["l1"]),
        upsert(first_name="Anne", last_name="Lee", attributes={"city": "Rome"}, lists=["l2"]),
    )
    assert (s.first_name, s.last_name) == ("Anne", "Lee")
    assert s.attributes == {"city": "Rome", "plan": "pro"}
    assert s.lists == {"l1", "l2"}


@pytest.mark.parametrize(
    "event",
    [
        ContactAttributesChanged(contact_id=CID, set={"a": "b"}),
        ContactListMembershipAdded(contact_id=CID, list_id="l1"),
        ContactListMembershipRemoved(contact_id=CID, list_id="l1"),
        ContactDeleted(contact_id=CID),
        ContactUnsuppressed(contact_id=CID),
        ContactResubscribed(contact_id=CID),
    ],
)
def test_events_for_a_contact_never_upserted_are_ignored(event):
    assert apply_contact_event(None, event) is None


@pytest.mark.parametrize(
    ("flag", "reason"),
    [
        (ContactSuppressed(contact_id=CID, reason="manual_blocklist"), "suppressed:manual_blocklist"),
        (ContactUnsubscribed(contact_id=CID), "unsubscribed"),
    ],
)
def test_a_flag_before_the_first_upsert_survives_it(flag, reason):
    """A suppression or unsubscribe written before the contact exists (a blocklist by id) is
    kept on an address-less contact, and the upsert that creates the contact keeps it."""
    placeholder = apply_contact_event(None, flag)
    assert placeholder is not None and placeholder.deleted and placeholder.email == ""
    assert exclusion_reason(state(flag, upsert(lists=["news"])), ["news"]) == reason


def test_attributes_changed_sets_and_unsets():
    s = state(
        upsert(attributes={"city": "Paris", "plan": "pro", "age": "30"}),
        ContactAttributesChanged(contact_id=CID, set={"city": "Rome", "tier": "1"}, unset=["plan", "missing"]),
    )
    assert s.attributes == {"city": "Rome", "age": "30", "tier": "1"}


def test_membership_added_and_removed():
    s = state(upsert(lists=["l1"]), ContactListMembershipAdded(contact_id=CID, list_id="l2"))
    assert s.lists == {"l1", "l2"}
    removed = apply_contact_event(s, ContactListMembershipRemoved(contact_id=CID, list_id="l1"))
    assert removed is not None and removed.lists == {"l2"}
    # Removing a list it is not in changes nothing.
    assert apply_contact_event(removed, ContactListMembershipRemoved(contact_id=CID, list_id="zz")) == removed


def test_fold_never_modifies_the_state_it_is_given():
    before = state(upsert(attributes={"a": "1"}, lists=["l1"]))
    apply_contact_event(before, ContactAttributesChanged(contact_id=CID, set={"b": "2"}, unset=["a"]))
    apply_contact_event(before, ContactListMembershipAdded(contact_id=CID, list_id="l2"))
    assert before.attributes == {"a": "1"} and before.lists == {"l1"}


def test_list_unsubscribe_is_recorded_and_global_unsubscribe_flags():
    s = state(upsert(lists=["l1", "l2"]), ContactUnsubscribed(contact_id=CID, list_id="l1"))
    assert s.unsubscribed_lists == {"l1"} and not s.globally_unsubscribed
    everywhere = apply_contact_event(s, ContactUnsubscribed(contact_id=CID, reason="stop"))
    assert everywhere is not None and everywhere.globally_unsubscribed


def test_membership_added_again_does_not_undo_an_unsubscribe():
    s = state(
        upsert(lists=["l1"]),
        ContactUnsubscribed(contact_id=CID, list_id="l1"),
        ContactListMembershipAdded(contact_id=CID, list_id="l1"),
        upsert(lists=["l1"]),
    )
    assert s.unsubscribed_lists == {"l1"}
    assert exclusion_reason(s, ["l1"]) == "unsubscribed"


def test_suppression_records_the_latest_reason():
    s = state(upsert(), ContactSuppressed(contact_id=CID, reason="hard_bounce"))
    assert s.suppressed_reason == "hard_bounce"
    again = apply_contact_event(s, ContactSuppressed(contact_id=CID, reason="complaint"))
    assert again is not None and again.suppressed_reason == "complaint"


def test_delete_forgets_personal_data_but_keeps_unsubscribes_and_suppression():
    s = state(
        upsert(first_name="Ann", attributes={"city": "Paris"}, lists=["l1"]),
        ContactUnsubscribed(contact_id=CID, list_id="l1"),
        ContactSuppressed(contact_id=CID, reason="complaint"),
        ContactDeleted(contact_id=CID),
    )
    assert s.deleted
    assert (s.email, s.first_name, s.attributes, s.lists) == ("", "", {}, frozenset())
    assert s.unsubscribed_lists == {"l1"} and s.suppressed_reason == "complaint"


def test_attribute_and_membership_events_on_a_deleted_contact_are_ignored():
    deleted = state(upsert(), ContactDeleted(contact_id=CID))
    for event in (
        ContactAttributesChanged(contact_id=CID, set={"a": "b"}),
        ContactListMembershipAdded(contact_id=CID, list_id="l1"),
        ContactListMembershipRemoved(contact_id=CID, list_id="l1"),
        ContactDeleted(contact_id=CID),
    ):
        assert apply_contact_event(deleted, event) == deleted


def test_unsubscribe_and_suppression_on_a_deleted_contact_are_still_recorded():
    s = state(
        upsert(), ContactDeleted(contact_id=CID),
        ContactUnsubscribed(contact_id=CID), ContactSuppressed(contact_id=CID, reason="hard_bounce"),
    )
    assert s.deleted and s.globally_unsubscribed and s.suppressed_reason == "hard_bounce"


def test_upsert_after_delete_starts_afresh_but_keeps_suppression():
    s = state(
        upsert(first_name="Ann", attributes={"old": "1"}, lists=["l1"]),
        ContactSuppressed(contact_id=CID, reason="manual_blocklist"),
        ContactDeleted(contact_id=CID),
        upsert(first_name="Ann", attributes={"new": "2"}, lists=["l2"]),
    )
    assert not s.deleted
    assert s.attributes == {"new": "2"} and s.lists == {"l2"}
    assert exclusion_reason(s, ["l2"]) == "suppressed:manual_blocklist"


# --- exclusion -----------------------------------------------------------------------------------


def test_exclusion_precedence_deleted_then_suppressed_then_unsubscribed():
    base = [upsert(lists=["l1"]), ContactUnsubscribed(contact_id=CID)]
    assert exclusion_reason(state(*base), ["l1"]) == "unsubscribed"
    suppressed = [*base, ContactSuppressed(contact_id=CID, reason="hard_bounce")]
    assert exclusion_reason(state(*suppressed), ["l1"]) == "suppressed:hard_bounce"
    assert exclusion_reason(state(*suppressed, ContactDeleted(contact_id=CID)), ["l1"]) == "deleted"


@pytest.mark.parametrize("reason", ["hard_bounce", "complaint", "manual_blocklist"])
def test_suppression_excludes_from_everything(reason):
    s = state(upsert(lists=["l1"]), ContactSuppressed(contact_id=CID, reason=reason))
    assert exclusion_reason(s, ["l1"]) == f"suppressed:{reason}"
    assert exclusion_reason(s) == f"suppressed:{reason}"


def test_global_unsubscribe_excludes_also_hand_picked_contacts():
    assert exclusion_reason(state(upsert(), ContactUnsubscribed(contact_id=CID))) == "unsubscribed"


@pytest.mark.parametrize(
    ("lists", "unsubscribed", "targeted", "expected"),
    [
        (["l1"], ["l1"], ["l1"], "unsubscribed"),               # its only targeted list is left
        (["l1", "l2"], ["l1"], ["l1", "l2"], None),             # still reached through l2
        (["l1", "l2"], ["l1", "l2"], ["l1", "l2"], "unsubscribed"),
        (["l1", "l2"], ["l1"], ["l1", "l3"], "unsubscribed"),   # l3: not a member, does not count
        (["l1", "l2"], ["l1"], ["l2"], None),                   # the left list is not targeted
        (["l1"], ["l1"], [], None),                             # hand-picked / segment only
        ([], ["l1"], ["l1"], None),                             # not a member: not reached by lists
    ],
)
def test_a_list_unsubscribe_excludes_only_when_every_reaching_list_is_left(lists, unsubscribed, targeted,
                                                                           expected):
    events = [upsert(lists=lists)] + [ContactUnsubscribed(contact_id=CID, list_id=x) for x in unsubscribed]
    assert exclusion_reason(state(*events), targeted) == expected


# --- only an explicit fact lifts a suppression or an unsubscribe ---------------------------------

FLAGS = [
    ContactSuppressed(contact_id=CID, reason="manual_blocklist"),
    ContactSuppressed(contact_id=CID, reason="hard_bounce"),
    ContactSuppressed(contact_id=CID, reason="complaint"),
    ContactUnsubscribed(contact_id=CID),
]


@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize("later", [
    upsert(lists=["news"]),
    upsert(email="Ann@example.com", first_name="Ann", attributes={"plan": "pro"}, lists=["news", "vip"]),
    ContactListMembershipAdded(contact_id=CID, list_id="news"),
    ContactAttributesChanged(contact_id=CID, set={"plan": "free"}),
    ContactListMembershipRemoved(contact_id=CID, list_id="news"),
])
def test_no_later_upsert_or_change_lifts_a_flag(flag, later):
    before = state(upsert(lists=["news"]), flag)
    after = apply_contact_event(before, later)
    assert after is not None
    assert (after.suppressed_reason, after.globally_unsubscribed) == (
        before.suppressed_reason, before.globally_unsubscribed)
    assert exclusion_reason(after, ["news"]) == exclusion_reason(before, ["news"]) is not None


@pytest.mark.parametrize("flag", FLAGS[:3])
def test_unsuppress_lifts_any_suppression_and_nothing_else(flag):
    s = state(upsert(lists=["news"]), flag, ContactUnsubscribed(contact_id=CID, list_id="news"),
              ContactUnsuppressed(contact_id=CID))
    assert s.suppressed_reason is None
    assert s.unsubscribed_lists == {"news"}  # an unsubscribe is not a suppression
    assert exclusion_reason(s, ["news"]) == "unsubscribed"
    resubscribed = apply_contact_event(s, ContactResubscribed(contact_id=CID, list_id="news"))
    assert resubscribed is not None and exclusion_reason(resubscribed, ["news"]) is None


def test_resubscribe_lifts_the_global_unsubscribe_or_one_list():
    s = state(upsert(lists=["a", "b"]), ContactUnsubscribed(contact_id=CID),
              ContactUnsubscribed(contact_id=CID, list_id="a"), ContactUnsubscribed(contact_id=CID, list_id="b"))
    lifted = fold_contact([ContactResubscribed(contact_id=CID)], s)
    assert lifted is not None and not lifted.globally_unsubscribed
    assert lifted.unsubscribed_lists == {"a", "b"}  # list unsubscribes stay until lifted one by one
    assert exclusion_reason(lifted, ["a", "b"]) == "unsubscribed"
    one = fold_contact([ContactResubscribed(contact_id=CID, list_id="a")], lifted)
    assert one is not None and one.unsubscribed_lists == {"b"}
    assert exclusion_reason(one, ["a", "b"]) is None and exclusion_reason(one, ["b"]) == "unsubscribed"


def test_a_suppression_lifted_on_a_deleted_contact_stays_lifted_after_reimport():
    s = state(upsert(), ContactSuppressed(contact_id=CID, reason="complaint"), ContactDeleted(contact_id=CID),
              ContactUnsuppressed(contact_id=CID), upsert(lists=["news"]))
    assert s.suppressed_reason is None and exclusion_reason(s, ["news"]) is None


def test_a_new_suppression_after_a_lift_applies_again():
    s = state(upsert(), ContactSuppressed(contact_id=CID, reason="complaint"), ContactUnsuppressed(contact_id=CID),
              ContactSuppressed(contact_id=CID, reason="hard_bounce"))
    assert s.suppressed_reason == "hard_bounce"
