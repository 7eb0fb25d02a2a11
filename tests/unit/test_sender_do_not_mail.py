"""The do-not-mail list senders fold from contacts.events."""

from __future__ import annotations

from schemas.contacts import (
    ContactDeleted,
    ContactSuppressed,
    ContactUnsubscribed,
    ContactUpserted,
    contact_key,
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
