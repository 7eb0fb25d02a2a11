"""Decoding of the projector's records: the hot per-recipient events as msgspec Structs, every
other record by the full schema decode.

Guarantee: a record the full decode (`schemas.envelope.decode`) refuses for its JSON, shape,
types, lengths or numeric bounds is refused here with the full decode's SchemaViolation (the
projector logs and skips it); a record it accepts is accepted with the same fact, except for
ids and addresses: their character rules and the address's normalisation are the producers'
(they build these events through the schema's models, or, for the sender's direct EmailSent
writer, only from values already in canonical form), so they are read as written.

EmailSent v2, EmailFailed v2 and RecipientQueued v1 in our producers' shape go into Structs that
check the JSON, every field's type, the schema's lengths and bounds (msgspec.Meta), the version,
missing and unknown fields, and an aware RFC 3339 time. Whatever they refuse (other types, older
versions, values the schema would coerce, invalid records) takes the full decode, which reads it
or words why not. A time with digits beyond the microsecond (pydantic never writes one) is
rounded here, truncated there.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from projections.facts import RecipientFact
from schemas.base import MAX_EMAIL_OCTETS, Record
from schemas.envelope import Message, decode

# The schema's types with their lengths and bounds (schemas.base, schemas.envelope).
_Uuid = Annotated[str, msgspec.Meta(min_length=36, max_length=36)]
_TenantId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
_EntityId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
_Email = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_EMAIL_OCTETS)]
_AwareTime = Annotated[datetime, msgspec.Meta(tz=True)]
_Attempt = Annotated[int, msgspec.Meta(ge=1)]
_Ambiguous = Annotated[int, msgspec.Meta(ge=0)]
_HeaderText = Annotated[str, msgspec.Meta(min_length=1, max_length=998)]
# gc=False on every Struct: they are short-lived and hold no cycles, so the collector need not
# track them (a backlog decodes hundreds of thousands).


class _SentPayload(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    campaign_id: _EntityId
    contact_id: _EntityId
    email: _Email
    message_id: str
    attempt: _Attempt
    smtp_reply: str = ""
    ambiguous: _Ambiguous = 0


class _FailedPayload(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    campaign_id: _EntityId
    contact_id: _EntityId
    email: _Email
    attempt: _Attempt
    reason: str
    permanent: bool
    smtp_code: int | None = None
    ambiguous: _Ambiguous = 0


class _Template(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    subject: _HeaderText
    from_address: _Email
    body_text: str | None = None
    body_html: str | None = None
    track_opens: bool = False
    track_clicks: bool = False


class _QueuedPayload(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    campaign_id: _EntityId
    contact_id: _EntityId
    email: _Email
    template: _Template
    first_name: str = ""
    last_name: str = ""
    attributes: dict[str, str] = {}


class _Envelope(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, tag_field="type",
                gc=False):
    """schemas.envelope.Envelope's fields; `type` is each subclass's tag."""

    id: _Uuid
    tenant_id: _TenantId
    aggregate_id: _EntityId
    occurred_at: _AwareTime
    correlation_id: _Uuid
    causation_id: _Uuid | None = None


class _Sent(_Envelope, kw_only=True, tag="EmailSent"):
    version: Literal[2]
    payload: _SentPayload


class _Failed(_Envelope, kw_only=True, tag="EmailFailed"):
    version: Literal[2]
    payload: _FailedPayload


class _Queued(_Envelope, kw_only=True, tag="RecipientQueued"):
    version: Literal[1]
    payload: _QueuedPayload


_decode_shape = msgspec.json.Decoder(_Sent | _Failed | _Queued).decode
# Builds a RecipientFact from all its fields, in order, without the generated __new__'s frame.
_new_fact = tuple.__new__


def decode_record(raw: bytes | str | None) -> Message[Record] | RecipientFact:
    """A recipient fact for an EmailSent / EmailFailed v2 or RecipientQueued v1 in our
    producers' shape, else the full decode (which raises SchemaViolation if it is invalid)."""
    if raw is None:
        return decode(raw)
    try:
        record = _decode_shape(raw)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return decode(raw)  # not this shape: the full decode reads it or words why not
    payload = record.payload
    if type(payload) is _SentPayload:
        return _new_fact(RecipientFact, (
            record.id, "EmailSent", record.tenant_id, payload.campaign_id, payload.contact_id,
            payload.email, "sent", payload.attempt, record.occurred_at, payload.ambiguous,
            None, None, None))
    if type(payload) is _FailedPayload:
        return _new_fact(RecipientFact, (
            record.id, "EmailFailed", record.tenant_id, payload.campaign_id,
            payload.contact_id, payload.email, "failed", payload.attempt, record.occurred_at,
            payload.ambiguous, payload.smtp_code, payload.reason, None))
    return _new_fact(RecipientFact, (
        record.id, "RecipientQueued", record.tenant_id, payload.campaign_id,
        payload.contact_id, payload.email, "queued", 0, record.occurred_at, 0, None, None,
        None))
