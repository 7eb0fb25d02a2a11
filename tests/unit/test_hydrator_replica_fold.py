"""A replica's batch fold (ContactReplica._apply) on a local RocksDB database, no broker: what
it stores is what the pydantic path folds record by record (apply_to_stored over
schemas.envelope.decode), whether a key comes once in a batch or several times, is new or
stored by an earlier batch; bad records and records without a key are skipped; the next
offset is stored with the batch, and survives closing and reopening the database."""

from __future__ import annotations

from typing import cast

import orjson
import pytest
from confluent_kafka import Message

from schemas.base import Record
from schemas.contacts import (
    CONTACT_EVENT_TYPES,
    ContactDeleted,
    ContactEvent,
    ContactSuppressed,
    ContactUnsubscribed,
    ContactUpserted,
    contact_key,
)
from schemas.envelope import SchemaViolation, decode, encode, wrap
from schemas.events import CampaignCancelled
from services.common.settings import Settings
from services.hydrator.audience import StoredContact, apply_to_stored
from services.hydrator.replica import ContactReplica

TENANT = "acme"
PARTITION = 3


def _record(offset: int, event: Record, contact_id: str | None = None) -> Message:
    aggregate = contact_id or str(getattr(event, "contact_id", "camp-1"))
    value = encode(wrap(event, tenant_id=TENANT, aggregate_id=aggregate))
    key = None if contact_id == "" else contact_key(TENANT, aggregate)
    return Message(topic="contacts", partition=PARTITION, offset=offset, key=key, value=value)


def _upsert(n: int, lists: list[str], **fields) -> ContactUpserted:
    return ContactUpserted(**{"contact_id": f"c-{n}", "email": f"p{n}@example.com",
                              "first_name": f"F{n}", "lists": lists, **fields})


def _expected(batches: list[list[Message]]) -> dict[bytes, StoredContact]:
    """The pydantic path, one record at a time."""
    stored: dict[bytes, StoredContact] = {}
    for batch in batches:
        for msg in batch:
            key = msg.key()
            try:
                event = decode(msg.value()).payload
            except SchemaViolation:
                continue
            if key is None or not isinstance(event, CONTACT_EVENT_TYPES):
                continue
            after = apply_to_stored(stored.get(key), cast(ContactEvent, event), offset=msg.offset() or 0,
                                    partition=PARTITION)
            if after is not None:
                stored[key] = after
    return stored


@pytest.fixture
def replica(tmp_path):
    opened = ContactReplica(Settings(), "contacts", PARTITION, tmp_path / "contacts-3.db")
    yield opened
    opened.close()


def _held(replica: ContactReplica) -> dict[bytes, StoredContact]:
    return dict(replica.tenant_contacts(TENANT))


def test_new_contacts_each_once_in_a_batch_are_stored_as_the_pydantic_fold(replica):
    batch = [_record(i, _upsert(i, ["l-all", f"l-{i % 3}", "l-all"], attributes={"plan": "team"})) for i in range(50)]
    assert replica._apply(batch, next_offset=50) == 50
    assert _held(replica) == _expected([batch])
    assert replica.next_offset() == 50


def test_later_batches_fold_onto_stored_contacts_and_repeated_keys_fold_in_order(replica):
    first = [_record(i, _upsert(i, ["l-1"], attributes={"city": "Oslo"})) for i in range(10)]
    second = [
        _record(10, _upsert(1, ["l-2"], attributes={"plan": "pro"})),  # onto a stored contact
        _record(11, _upsert(20, ["l-1"])),  # new, then changed twice in the same batch
        _record(12, ContactUnsubscribed(contact_id="c-20", list_id="l-1")),
        _record(13, _upsert(20, ["l-3"], first_name="Renamed")),
        _record(14, ContactDeleted(contact_id="c-2")),
        _record(15, ContactSuppressed(contact_id="c-30", reason="hard_bounce")),  # never upserted
        _record(16, _upsert(2, ["l-9"])),  # re-imported after its deletion
    ]
    replica._apply(first, next_offset=10)
    replica._apply(second, next_offset=17)
    held = _held(replica)
    assert held == _expected([first, second])
    assert held[contact_key(TENANT, "c-1")]["lists"] == ["l-1", "l-2"]
    assert held[contact_key(TENANT, "c-20")]["unsubscribed_lists"] == ["l-1"]
    assert held[contact_key(TENANT, "c-30")]["deleted"] is True


def test_a_batch_of_distinct_keys_folds_every_kind_of_event(replica):
    first = [_record(i, _upsert(i, ["l-1"], attributes={"city": "Oslo"})) for i in range(5)]
    second = [  # each key once: the batch's single-pass fold
        _record(5, _upsert(0, ["l-2"], attributes={"plan": "pro"})),
        _record(6, ContactUnsubscribed(contact_id="c-1")),
        _record(7, ContactDeleted(contact_id="c-2")),
        _record(8, ContactSuppressed(contact_id="c-40", reason="complaint")),
        _record(9, ContactDeleted(contact_id="c-41")),  # never upserted: nothing stored
        _record(10, _upsert(42, ["l-3"])),
    ]
    replica._apply(first, next_offset=5)
    replica._apply(second, next_offset=11)
    held = _held(replica)
    assert held == _expected([first, second])
    assert held[contact_key(TENANT, "c-1")]["globally_unsubscribed"] is True
    assert contact_key(TENANT, "c-41") not in held


def test_bad_records_other_types_and_keyless_records_are_skipped(replica):
    batch = [
        _record(0, _upsert(0, ["l-1"])),
        Message(topic="contacts", partition=PARTITION, offset=1, key=b"acme:c-1", value=b"not json"),
        _record(2, CampaignCancelled(reason="x")),
        _record(3, _upsert(3, ["l-1"]), contact_id=""),  # no key
        Message(topic="contacts", partition=PARTITION, offset=4, key=b"acme:c-4", value=None),
        _record(5, _upsert(5, ["l-1"])),
    ]
    replica._apply(batch, next_offset=9)  # a commit marker after the last record
    assert sorted(_held(replica)) == [contact_key(TENANT, "c-0"), contact_key(TENANT, "c-5")]
    assert replica.next_offset() == 9


def test_the_fold_and_its_offset_survive_a_close_without_a_write_ahead_log(tmp_path):
    path = tmp_path / "contacts-3.db"
    batch = [_record(i, _upsert(i, ["l-1"])) for i in range(20)]
    first = ContactReplica(Settings(), "contacts", PARTITION, path)
    first._apply(batch, next_offset=20)
    first.close()
    again = ContactReplica(Settings(), "contacts", PARTITION, path)
    try:
        assert again.next_offset() == 20
        assert _held(again) == _expected([batch])
        stored = again.db.get(contact_key(TENANT, "c-7"))
        assert isinstance(stored, bytes)
        assert orjson.loads(stored) == _expected([batch])[contact_key(TENANT, "c-7")]
    finally:
        again.close()
