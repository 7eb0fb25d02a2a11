"""The sender's direct EmailSent writer gives exactly the schema path's bytes, and declines
(None) whatever it cannot write plainly, so the schema path handles it."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest

from schemas.envelope import Envelope, decode, encode, wrap, wrap_caused_by
from schemas.events import MessageTemplate, RecipientQueued
from services.sender.delivery import Outcome, Status, delivery_event
from services.sender.sent_event import sent_record
from services.sender.work import message_id

EVENT_ID = uuid.UUID("12345678-1234-5678-1234-567812345678")
T0 = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
TEMPLATE = MessageTemplate(subject="Hi", from_address="news@example.org", body_text="x")


def recipient(**changes: object) -> RecipientQueued:
    fields: dict[str, object] = {"campaign_id": "cmp-1", "contact_id": "k:1",
                                 "email": "Jane.Doe+x@example.com", "template": TEMPLATE}
    fields.update(changes)
    return RecipientQueued.model_validate(fields)


def cause_of(item: RecipientQueued, tenant: str = "acme") -> Envelope:
    return wrap(item, tenant_id=tenant, aggregate_id=item.campaign_id)


def schema_bytes(item: RecipientQueued, outcome: Outcome, cause: Envelope,
                 occurred_at: datetime = T0) -> bytes:
    """What the schema path writes, with the event id and time pinned."""
    event = delivery_event(item, outcome, message_id(item))
    wrapped = wrap_caused_by(event, cause, aggregate_id=item.campaign_id)
    return encode(wrapped.model_copy(update={"id": EVENT_ID, "occurred_at": occurred_at}))


SENT = Outcome(Status.SENT, 1, 250, "250 2.0.0 Ok: queued as 4XyZ")


@pytest.mark.parametrize(("item", "outcome"), [
    (recipient(), SENT),
    (recipient(), replace(SENT, attempt=0)),  # written as attempt 1, like the schema path
    (recipient(), replace(SENT, attempt=4, ambiguous=3)),
    (recipient(), replace(SENT, detail="")),
    (recipient(campaign_id="c.x_y-1", contact_id="A" * 128), SENT),
    (recipient(email="o'brien!#$%&*+/=?^_`{|}~@sub.example.co.uk"), SENT),
])
def test_the_bytes_equal_the_schema_paths(item: RecipientQueued, outcome: Outcome) -> None:
    cause = cause_of(item)
    record = sent_record(item, outcome, message_id(item), cause, event_id=EVENT_ID,
                         occurred_at=T0)
    assert record == schema_bytes(item, outcome, cause)
    assert decode(record).payload == delivery_event(item, outcome, message_id(item))


@pytest.mark.parametrize("moment", [
    T0.replace(microsecond=0),
    datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=2))),
])
def test_timestamps_are_written_as_the_envelope_writes_them(moment: datetime) -> None:
    item = recipient()
    cause = cause_of(item)
    record = sent_record(item, SENT, message_id(item), cause, event_id=EVENT_ID,
                         occurred_at=moment)
    assert record == schema_bytes(item, SENT, cause, moment)


def test_defaults_are_a_new_id_and_now() -> None:
    item = recipient()
    cause = cause_of(item)
    before = datetime.now(UTC)
    first = sent_record(item, SENT, message_id(item), cause)
    second = sent_record(item, SENT, message_id(item), cause)
    assert first is not None and second is not None
    one, two = decode(first), decode(second)
    assert one.envelope.id != two.envelope.id
    assert before <= one.envelope.occurred_at <= datetime.now(UTC)
    assert one.envelope.causation_id == cause.id
    assert one.envelope.correlation_id == cause.correlation_id
    assert one.envelope.tenant_id == "acme" and one.envelope.aggregate_id == "cmp-1"


@pytest.mark.parametrize("reply", [
    '250 "quoted"', "250 back\\slash", "250 tab\there", "250 line\r\nbreak", "250 ok \u00e9",
    "250 \x7f", "250 \x00",
])
def test_replies_that_need_escaping_take_the_schema_path(reply: str) -> None:
    item = recipient()
    outcome = replace(SENT, detail=reply)
    assert sent_record(item, outcome, message_id(item), cause_of(item)) is None
    # ... which writes them as valid JSON that reads back as the same reply.
    written = json.loads(schema_bytes(item, outcome, cause_of(item)))
    assert written["payload"]["smtp_reply"] == reply


@pytest.mark.parametrize("outcome", [
    Outcome(Status.FAILED, 1, 550, "550 no", permanent=True),
    Outcome(Status.DEFERRED, 1, 451, "451 later", retry_at=T0),
    replace(SENT, ambiguous=-1),  # the schema refuses it: never written by hand
    replace(SENT, attempt=True),  # a bool is not an attempt number
])
def test_other_outcomes_are_declined(outcome: Outcome) -> None:
    item = recipient()
    assert sent_record(item, outcome, message_id(item), cause_of(item)) is None


def test_a_non_ascii_address_takes_the_schema_path() -> None:
    item = recipient(email="j\u00f6rg@example.com")
    assert sent_record(item, SENT, message_id(item), cause_of(item)) is None


def test_values_not_in_canonical_form_are_declined() -> None:
    # model_construct skips validation: values the schema would refuse or rewrite.
    for changes in ({"email": "k1@EXAMPLE.com"}, {"campaign_id": "bad id"},
                    {"contact_id": ""}, {"email": "no-at-sign"}):
        item = recipient().model_copy(update=changes)
        assert sent_record(item, SENT, "<m@x>", cause_of(recipient())) is None
    assert sent_record(recipient(), SENT, '<"m"@x>', cause_of(recipient())) is None
