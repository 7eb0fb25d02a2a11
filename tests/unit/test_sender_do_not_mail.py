"""The do-not-mail list senders fold from contacts.events."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.contacts import (
    ContactDeleted,
    ContactResubscribed,
    ContactSuppressed,
    ContactUnsubscribed,
    ContactUnsuppressed,
    ContactUpserted,
    apply_contact_event,
    contact_key,
    exclusion_reason,
)
from services.sender.do_not_mail import DoNotMailList


def test_reasons_and_their_precedence() -> None:
    flags = DoNotMailList()
    flags.apply("t", ContactUpserted(contact_id="a", email="a@example.org"))
    assert flags.reason("t", "a") is None
    flags.apply("t", ContactUnsubscribed(contact_id="a", list_id="news"))
    assert flags.reason("t", "a") is None  # a list-scoped unsubscribe is the hydrator's call
    flags.apply("t", ContactUnsubscribed(contact_id="a"))
    assert flags.reason("t", "a") == "unsubscribed"
    flags.apply("t", ContactSuppressed(contact_id="a", reason="complaint"))
    assert flags.reason("t", "a") == "suppressed:complaint"
    flags.apply("t", ContactDeleted(contact_id="a"))
    assert flags.reason("t", "a") == "deleted"
    assert flags.reason("other-tenant", "a") is None


def test_an_upsert_undoes_a_deletion_only() -> None:
    flags = DoNotMailList()
    flags.apply("t", ContactDeleted(contact_id="a"))
    flags.apply("t", ContactDeleted(contact_id="b"))
    flags.apply("t", ContactSuppressed(contact_id="b", reason="hard_bounce"))
    for contact in ("a", "b"):
        flags.upserted(contact_key("t", contact))
    assert flags.reason("t", "a") is None
    assert flags.reason("t", "b") == "suppressed:hard_bounce"


_EVENTS = st.sampled_from([
    ContactUpserted(contact_id="a", email="a@example.org"),
    ContactSuppressed(contact_id="a", reason="complaint"),
    ContactSuppressed(contact_id="a", reason="manual_blocklist"),
    ContactUnsuppressed(contact_id="a"),
    ContactUnsubscribed(contact_id="a"),
    ContactUnsubscribed(contact_id="a", list_id="news"),
    ContactResubscribed(contact_id="a"),
    ContactResubscribed(contact_id="a", list_id="news"),
    ContactDeleted(contact_id="a"),
])


@settings(max_examples=300, deadline=None)
@given(st.lists(_EVENTS, max_size=12))
def test_the_list_moves_its_flags_exactly_as_the_fold(events) -> None:
    # Only the explicit lifts undo a flag here as in apply_contact_event: never an upsert.
    flags = DoNotMailList()
    state = apply_contact_event(None, ContactUpserted(contact_id="a", email="a@example.org"))
    for event in events:
        if isinstance(event, ContactUpserted):
            flags.upserted(contact_key("t", "a"))
        else:
            flags.apply("t", event)
        state = apply_contact_event(state, event)
        assert state is not None
        assert flags.reason("t", "a") == exclusion_reason(state)
