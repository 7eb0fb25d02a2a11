"""Fast decoding of the hot delivery events, with the full schema decode as the fallback.

Guarantee: `decode_record(raw)` accepts exactly what `schemas.envelope.decode` accepts and
yields the same facts. EmailSent v2, EmailFailed v2 and RecipientQueued v1 in the canonical
shape our own producers write (every field present, canonical UUIDs, an aware ISO timestamp, an address that
is already normalised) are checked field by field here without building pydantic models; any
record that is not plainly in that shape (other types, older versions, missing or extra
fields, odd values) goes through the full decode, which raises SchemaViolation if it really is
invalid. Replaying 200,000 deliveries, the pydantic path was ~40% of the projector's time;
a RecipientQueued (it carries the whole template) took ~17 us on it, and a campaign's start
brings one per recipient at once, ahead of the first deliveries.

JSON is parsed by the same parser and options as the full decode (pydantic-core's `from_json`,
NaN / Infinity refused, exact big integers), so both paths see the same document; it is about
twice the speed of the stdlib scanner on these records.

Two tiers: an EmailSent / EmailFailed v2 exactly as `schemas.envelope.encode` writes it
(compact JSON, the models' key order, ASCII, no escapes) is matched by one regular expression
over the whole text (`_CANONICAL_SENT`, `_CANONICAL_FAILED`: ~2 us instead of ~7 us for JSON
parsing plus field checks); any other record goes the dict way below. Each sub-pattern is at
least as strict as the schema's rule for that field, so a record the expression accepts is one
the full decode accepts with the same values.

The first tier runs natively where the extension projections._canonical is built (it is, at
install): the same grammar in one pass over the bytes, ~1 us instead of ~3.5 us a delivery.
`_canonical_delivery` below stays the reference it is tested against (and the fallback in a
source tree nobody installed).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from pydantic_core import from_json

from projections.facts import RecipientFact

try:
    from projections import _canonical
except ImportError:  # not built (a source tree nobody installed): the expression does the same
    _canonical = None  # type: ignore[assignment]
from schemas.base import ENTITY_ID_RE, NORMALISED_EMAIL_RE, TENANT_ID_RE, Record
from schemas.envelope import Message, decode

# schemas.base's TenantId and EntityId rules; fullmatch, like pydantic's anchors.
_TENANT = TENANT_ID_RE
_ENTITY = ENTITY_ID_RE
# Only the canonical form; pydantic accepts more spellings, which take the full path.
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# RFC 3339 with an offset, as pydantic writes it; fromisoformat alone accepts more forms (an
# offset of -05:90, say, which pydantic refuses), so hours, minutes and seconds are bounded here.
_AWARE_TIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?"
    r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
)

# Exactly the addresses that normalise_email returns unchanged (anything else takes the full
# path).
_NORMALISED_EMAIL = NORMALISED_EMAIL_RE
# --- first tier: the canonical text of a delivery, matched as a whole -------------------------
# Inside the expressions: JSON strings without escapes (so the text is the value) in printable
# ASCII only (the document is ASCII, hence valid UTF-8; no lone surrogates), and JSON integers
# without sign, leading zeros or exponent, short enough for any column.
_ID_TEXT = _UUID.pattern
_TENANT_TEXT = _TENANT.pattern
_ENTITY_TEXT = _ENTITY.pattern
_TIME_TEXT = _AWARE_TIME.pattern
# Free text: printable ASCII but " and \. The expression only excludes " and \ (the
# document is ASCII, checked before): a set of ranges costs the regular expression engine
# ~4 ns a character, a negated pair of literals a fraction of that (possessive: measured
# faster still; the next character is the closing quote either way). The whole match ~3.1 ->
# ~1.9 us. Each such field is captured and checked with str.isprintable (for ASCII exactly
# ' ' to '~') instead.
_ANY_TEXT = r'([^"\\]*+)'
# _NORMALISED_EMAIL without " and \ (which JSON escapes) in the local part, ASCII only.
_EMAIL_TEXT = r'[!#-+\--:=?A-\[\]-~]{1,64}@[a-z0-9](?:[a-z0-9-]{0,62}\.)+[a-z0-9-]{2,63}'
_COUNT_TEXT = r"0|[1-9][0-9]{0,8}"  # 0 .. 999,999,999: fits an int column
# The envelope, then the payload's fields the two deliveries share (TYPE: the wire name).
_ENVELOPE_TEXT = (
    r'\{"id":"(' + _ID_TEXT + r')","type":"TYPE","version":2,"tenant_id":"(' + _TENANT_TEXT
    + r')","aggregate_id":"' + _ENTITY_TEXT + r'","occurred_at":"(' + _TIME_TEXT
    + r')","correlation_id":"' + _ID_TEXT + r'","causation_id":(?:null|"' + _ID_TEXT
    + r'"),"payload":\{"campaign_id":"(' + _ENTITY_TEXT + r')","contact_id":"(' + _ENTITY_TEXT
    + r')","email":"(' + _EMAIL_TEXT + r')",'
)
_CANONICAL_SENT = re.compile(
    _ENVELOPE_TEXT.replace("TYPE", "EmailSent")
    + r'"message_id":"' + _ANY_TEXT + r'","attempt":([1-9][0-9]{0,8}),"smtp_reply":"'
    + _ANY_TEXT + r'","ambiguous":(' + _COUNT_TEXT + r')\}\}'
)
_CANONICAL_FAILED = re.compile(
    _ENVELOPE_TEXT.replace("TYPE", "EmailFailed")
    + r'"attempt":([1-9][0-9]{0,8}),"reason":"' + _ANY_TEXT
    + r'","permanent":(?:true|false),"smtp_code":(null|0|-?[1-9][0-9]{0,8}),"ambiguous":('
    + _COUNT_TEXT + r')\}\}'
)
# Builds a RecipientFact from all its fields, in order, without the generated __new__'s
# Python frame.
_new_fact = tuple.__new__
# Longest address a row may hold (schemas.base: 254 characters).
_EMAIL_MAX = 254

# Tenant and campaign ids repeat on almost every record: validated once, then remembered
# (bounded, so a stream of distinct ids cannot grow it without limit).
_KNOWN_IDS_MAX = 10_000
_known_ids: dict[re.Pattern[str], set[str]] = {_TENANT: set(), _ENTITY: set()}

_ENVELOPE_KEYS = frozenset({
    "id", "type", "version", "tenant_id", "aggregate_id", "occurred_at", "correlation_id",
    "causation_id", "payload",
})
_SENT_V2 = frozenset({
    "campaign_id", "contact_id", "email", "message_id", "attempt", "smtp_reply", "ambiguous",
})
_FAILED_V2 = frozenset({
    "campaign_id", "contact_id", "email", "attempt", "reason", "permanent", "smtp_code",
    "ambiguous",
})
_QUEUED_V1 = frozenset({
    "campaign_id", "contact_id", "email", "first_name", "last_name", "attributes", "template",
})
_TEMPLATE = frozenset({"subject", "from_address", "body_text", "body_html"})


# The wire names the dict tier handles, as JSON strings. A record without any of them goes
# straight to the full decode: parsing it here first would parse it twice (~2 us of a
# ContactUpserted's ~12). A record that merely contains one (in some other field) only takes
# the dict tier's look; a name spelled with escapes only misses the fast path. Checked after
# the first tier, which the bulk of the records (deliveries) pass.
_FAST_TYPE_BYTES = (b'"EmailSent"', b'"EmailFailed"', b'"RecipientQueued"')
_FAST_TYPE_TEXT = tuple(marker.decode() for marker in _FAST_TYPE_BYTES)


def decode_record(raw: bytes | str | None) -> Message[Record] | RecipientFact:
    """A recipient fact for a canonical EmailSent/EmailFailed v2 or RecipientQueued v1, else
    the full decode."""
    if raw is not None:
        fact = _match_canonical(raw)
        if fact is not None:
            return fact
        if not _names_a_fast_type(raw):
            return decode(raw)
        try:
            # Only object keys are cached: they repeat on every record, most values do not.
            data = from_json(raw, allow_inf_nan=False, cache_strings="keys")
        except (ValueError, UnicodeDecodeError):
            data = None  # the full decode words the error
        if type(data) is dict:
            fact = _fast_fact(data)
            if fact is not None:
                return fact
    return decode(raw)


def _names_a_fast_type(raw: bytes | str) -> bool:
    if isinstance(raw, bytes):
        sent, failed, queued = _FAST_TYPE_BYTES
        return sent in raw or failed in raw or queued in raw
    sent_text, failed_text, queued_text = _FAST_TYPE_TEXT
    return sent_text in raw or failed_text in raw or queued_text in raw


def _canonical_delivery(raw: bytes | str) -> RecipientFact | None:
    """The fact of an EmailSent / EmailFailed v2 in `encode`'s exact text, else None."""
    if not raw.isascii():
        return None
    text = raw.decode("ascii") if type(raw) is bytes else str(raw)
    code: str | None = None
    reason: str | None = None
    # A mismatch is found at the type, ~50 characters in: trying both costs little.
    sent = _CANONICAL_SENT.fullmatch(text)
    if sent is not None:
        (event_id, tenant, occurred, campaign, contact, email, message_id, attempt, reply,
         ambiguous) = sent.groups()
        if not (message_id.isprintable() and reply.isprintable()):
            return None
    else:
        failed = _CANONICAL_FAILED.fullmatch(text)
        if failed is None:
            return None
        (event_id, tenant, occurred, campaign, contact, email, attempt, reason, code,
         ambiguous) = failed.groups()
        if not reason.isprintable():
            return None
    if len(email) > _EMAIL_MAX:
        return None
    try:
        occurred_at = datetime.fromisoformat(occurred)
    except ValueError:
        return None  # no such date or time (month 13, 25 o'clock): the full decode words it
    if sent is not None:
        return _new_fact(RecipientFact, (
            event_id, "EmailSent", tenant, campaign, contact, email, "sent",
            1 if attempt == "1" else int(attempt), occurred_at,
            0 if ambiguous == "0" else int(ambiguous), None, None, None))
    return _new_fact(RecipientFact, (
        event_id, "EmailFailed", tenant, campaign, contact, email, "failed", int(attempt),
        occurred_at, int(ambiguous), None if code is None or code == "null" else int(code),
        reason, None))


if _canonical is not None:
    _canonical.configure(RecipientFact)
    _match_canonical = _canonical.match
else:
    _match_canonical = _canonical_delivery


def _fast_fact(data: dict[str, Any]) -> RecipientFact | None:
    kind = data.get("type")
    if kind == "EmailSent" or kind == "EmailFailed":
        return _fast_delivery(data, kind)
    if kind == "RecipientQueued":
        return _fast_queued(data)
    return None


def _envelope(data: dict[str, Any], version: int,
              *, aggregate_repeats: bool) -> tuple[str, str, datetime] | None:
    """(event id, tenant, occurred at) of a canonical envelope of `version`, else None."""
    if (data.keys() != _ENVELOPE_KEYS or type(data["payload"]) is not dict
            or data["version"] != version or type(data["version"]) is not int):
        return None
    event_id, tenant, aggregate = data["id"], data["tenant_id"], data["aggregate_id"]
    correlation, causation = data["correlation_id"], data["causation_id"]
    if not (type(event_id) is str and _UUID.fullmatch(event_id)
            and type(correlation) is str and _UUID.fullmatch(correlation)
            and (causation is None or (type(causation) is str and _UUID.fullmatch(causation)))
            and _known(tenant, _TENANT)):
        return None
    if aggregate_repeats:
        if not _known(aggregate, _ENTITY):
            return None
    elif type(aggregate) is not str or not _ENTITY.fullmatch(aggregate):
        return None
    occurred_raw = data["occurred_at"]
    if type(occurred_raw) is not str or not _AWARE_TIME.fullmatch(occurred_raw):
        return None
    try:
        occurred_at = datetime.fromisoformat(occurred_raw)
    except ValueError:
        return None
    if occurred_at.tzinfo is None:
        return None
    return event_id, tenant, occurred_at


def _normalised_email(value: object) -> bool:
    return type(value) is str and len(value) <= 254 and bool(_NORMALISED_EMAIL.fullmatch(value))


def _fast_delivery(data: dict[str, Any], kind: str) -> RecipientFact | None:
    sent = kind == "EmailSent"
    payload = data.get("payload")
    # Deliveries are keyed by campaign: the aggregate id repeats.
    if type(payload) is not dict or payload.keys() != (_SENT_V2 if sent else _FAILED_V2):
        return None
    envelope = _envelope(data, 2, aggregate_repeats=True)
    if envelope is None:
        return None
    event_id, tenant, occurred_at = envelope
    campaign, contact, email = payload["campaign_id"], payload["contact_id"], payload["email"]
    attempt, ambiguous = payload["attempt"], payload["ambiguous"]
    if not (_known(campaign, _ENTITY)
            and type(contact) is str and _ENTITY.fullmatch(contact)
            and type(attempt) is int and attempt >= 1
            and type(ambiguous) is int and ambiguous >= 0
            and _normalised_email(email)):
        return None
    if sent:
        if type(payload["message_id"]) is not str or type(payload["smtp_reply"]) is not str:
            return None
        return RecipientFact(event_id, kind, tenant, campaign, contact, email, "sent", attempt,
                             occurred_at, ambiguous=ambiguous)
    reason, code = payload["reason"], payload["smtp_code"]
    if (type(reason) is not str or type(payload["permanent"]) is not bool
            or not (code is None or type(code) is int)):
        return None
    return RecipientFact(event_id, kind, tenant, campaign, contact, email, "failed", attempt,
                         occurred_at, ambiguous=ambiguous, smtp_code=code, detail=reason)


def _fast_queued(data: dict[str, Any]) -> RecipientFact | None:
    """RecipientQueued v1: the hydrator's burst at a campaign's start. The template it carries
    (the same for every recipient) is checked field by field too, without the model."""
    payload = data.get("payload")
    if type(payload) is not dict or payload.keys() != _QUEUED_V1:
        return None
    template = payload["template"]
    if type(template) is not dict or template.keys() != _TEMPLATE:
        return None
    # Keyed by tenant + contact: the aggregate id is the contact, it does not repeat.
    envelope = _envelope(data, 1, aggregate_repeats=False)
    if envelope is None:
        return None
    event_id, tenant, occurred_at = envelope
    campaign, contact, email = payload["campaign_id"], payload["contact_id"], payload["email"]
    attributes = payload["attributes"]
    if not (_known(campaign, _ENTITY)
            and type(contact) is str and _ENTITY.fullmatch(contact)
            and _normalised_email(email)
            and type(payload["first_name"]) is str and type(payload["last_name"]) is str
            and type(attributes) is dict
            and all(type(k) is str and type(v) is str for k, v in attributes.items())):
        return None
    subject, body_text, body_html = (
        template["subject"], template["body_text"], template["body_html"])
    # HeaderText: 1 to 998 characters, no CR or LF.
    if not (type(subject) is str and 0 < len(subject) <= 998
            and "\r" not in subject and "\n" not in subject
            and _normalised_email(template["from_address"])
            and (body_text is None or type(body_text) is str)
            and (body_html is None or type(body_html) is str)):
        return None
    return RecipientFact(event_id, "RecipientQueued", tenant, campaign, contact, email, "queued",
                         0, occurred_at)


def _known(value: object, pattern: re.Pattern[str]) -> bool:
    known = _known_ids[pattern]
    if value in known:
        return True
    if type(value) is not str or not pattern.fullmatch(value):
        return False
    if len(known) >= _KNOWN_IDS_MAX:
        known.clear()
    known.add(value)
    return True
