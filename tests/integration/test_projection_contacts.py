"""Contacts and their profiles folded once (projections.batch_writer._write_contacts) against
the real broker and database: both tables end exactly as schemas.contacts.fold_contact says,
across batches; where the stored rows disagree (a contacts row without its profile, as rows
written before the profiles existed), each table is folded from its own row."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence

import psycopg
import pytest

from schemas.contacts import (
    ContactAttributesChanged,
    ContactDeleted,
    ContactEvent,
    ContactListMembershipAdded,
    ContactListMembershipRemoved,
    ContactState,
    ContactSuppressed,
    ContactUnsubscribed,
    ContactUpserted,
    contact_key,
    fold_contact,
)
from schemas.envelope import encode, wrap
from services.common.settings import Settings
from services.common.topics import CONTACTS, TopicSpec
from tests.integration.test_projector import T0, drain, produce

pytestmark = pytest.mark.integration


@pytest.fixture
def db(platform_settings: Settings) -> Iterator[psycopg.Connection]:
    with psycopg.connect(platform_settings.database_url, autocommit=True) as conn:
        yield conn


def _records(tenant: str, events: Sequence[ContactEvent]) -> list[tuple[TopicSpec, str, bytes]]:
    return [(CONTACTS, contact_key(tenant, e.contact_id).decode(),
             encode(wrap(e, tenant_id=tenant, aggregate_id=e.contact_id, occurred_at=T0)))
            for e in events]


def _stored(db: psycopg.Connection, tenant: str, contact: str) -> tuple[object, object]:
    row = db.execute(
        "SELECT deleted, globally_unsubscribed, suppressed_reason, unsubscribed_lists,"
        " ARRAY(SELECT list_id FROM contact_list_members m WHERE m.tenant_id = c.tenant_id"
        "       AND m.contact_id = c.contact_id ORDER BY list_id)"
        " FROM contacts c WHERE tenant_id = %s AND contact_id = %s", (tenant, contact)).fetchone()
    profile = db.execute(
        "SELECT email, first_name, last_name, attributes, deleted FROM contact_profiles"
        " WHERE tenant_id = %s AND contact_id = %s", (tenant, contact)).fetchone()
    return row, profile


def _expected(state: ContactState | None) -> tuple[object, object]:
    if state is None:
        return None, None
    return ((state.deleted, state.globally_unsubscribed, state.suppressed_reason,
             sorted(state.unsubscribed_lists), sorted(state.lists)),
            (state.email, state.first_name, state.last_name, dict(state.attributes),
             state.deleted))


def test_contacts_and_profiles_end_as_the_fold_says_across_batches(
        settings: Settings, db: psycopg.Connection) -> None:
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    histories: dict[str, list[ContactEvent]] = {
        "live": [
            ContactUpserted(contact_id="live", email="live@example.com", first_name="Ann",
                            attributes={"plan": "pro"}, lists=["a", "b"]),
            ContactUnsubscribed(contact_id="live", list_id="a"),
            ContactAttributesChanged(contact_id="live", set={"tier": "1"}, unset=["plan"]),
            ContactListMembershipRemoved(contact_id="live", list_id="b"),
        ],
        "gone": [
            ContactUpserted(contact_id="gone", email="gone@example.com", lists=["a"]),
            ContactSuppressed(contact_id="gone", reason="hard_bounce"),
            ContactDeleted(contact_id="gone"),
            ContactAttributesChanged(contact_id="gone", set={"x": "y"}),  # ignored: deleted
        ],
        "never": [ContactUnsubscribed(contact_id="never")],  # never upserted: no rows
    }
    later: dict[str, list[ContactEvent]] = {
        "live": [ContactListMembershipAdded(contact_id="live", list_id="c"),
                 ContactUpserted(contact_id="live", email="ann@example.com", last_name="Lee",
                                 attributes={"plan": "team"}, lists=["d"])],
        "gone": [ContactUpserted(contact_id="gone", email="back@example.com", lists=["e"])],
        "never": [],
    }
    produce(settings, _records(tenant, [e for h in histories.values() for e in h]))
    drain(settings)
    for contact, events in histories.items():
        assert _stored(db, tenant, contact) == _expected(fold_contact(events)), contact
    # The next batch folds over what the first one stored.
    produce(settings, _records(tenant, [e for h in later.values() for e in h]))
    drain(settings)
    for contact, events in histories.items():
        assert _stored(db, tenant, contact) == _expected(
            fold_contact([*events, *later[contact]])), contact


def test_a_contacts_row_without_its_profile_is_folded_on_its_own(
        settings: Settings, db: psycopg.Connection) -> None:
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    # As a contact projected before the profiles existed: a contacts row, no profile row.
    db.execute("INSERT INTO contacts (tenant_id, contact_id, unsubscribed_lists)"
               " VALUES (%s, 'old', '{a}')", (tenant,))
    db.execute("INSERT INTO contact_list_members (tenant_id, list_id, contact_id)"
               " VALUES (%s, 'a', 'old')", (tenant,))
    produce(settings, _records(tenant, [
        ContactUnsubscribed(contact_id="old"),
        ContactAttributesChanged(contact_id="old", set={"plan": "pro"}),
    ]))
    drain(settings)
    # The contacts row moves; the profile, folded from nothing, keeps the unsubscribe on an
    # address-less contact stored as deleted (a flag before the first upsert is never lost)
    # and ignores the attribute change.
    assert _stored(db, tenant, "old") == ((False, True, None, ["a"], ["a"]), ("", "", "", {}, True))
    produce(settings, _records(tenant, [
        ContactUpserted(contact_id="old", email="old@example.com", lists=["b"])]))
    drain(settings)
    assert _stored(db, tenant, "old") == (
        (False, True, None, ["a"], ["a", "b"]), ("old@example.com", "", "", {}, False))
