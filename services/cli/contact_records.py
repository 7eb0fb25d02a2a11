"""The fast path of the contact import: CSV rows to contacts.events records, a few µs a row.

Guarantees:
- Same rows, same bytes: for every row `contact_csv.parse_rows` accepts, the writer yields the
  key and the value that `encode(wrap(ContactUpserted(...)))` writes for it (same field order,
  escaping and timestamp format); for every row it rejects, the same line and reason. The
  unit tests compare both paths on a corpus of awkward rows.
- The JSON is not written by hand: each writer asks the pydantic path to encode one envelope
  made of sentinel values and cuts it into constant pieces at the sentinels, checking that
  each sits where this module fills it in. A schema change that moves or renames a field fails
  the construction of the writer, not the records.
- Contact ids are `schemas.contacts.contact_id_for`'s (name-based UUIDv5 of tenant + the
  address's identity, its lower-cased whole), unless `aliases` names the existing contact an
  identity lands on (`identity_merge`): re-importing a file upserts the same contacts, under
  the same keys, whatever the case of the addresses. The address is written as given
  (`normalise_email`: local part as typed, domain in IDNA ASCII form).
- Envelope ids are UUIDv8 (RFC 9562, custom layout): 74 random bits naming the import run
  followed by the row's line number in its last 12 digits, written in decimal so a reader sees
  the line (…-000000001234 is line 1234). Unique per run and row, never repeated by a
  re-import, and a record the broker refuses tells its line from its own bytes (`line_of`).

Why not the models: building two pydantic models per row cost more than the whole budget of a
100,000 rows/s import; the checks are the same rules applied once, without the objects.
"""

from __future__ import annotations

import json
import operator
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime

from schemas.base import InvalidEmail, normalise_email
from schemas.contacts import _CONTACT_NAMESPACE, ContactSuppressed, ContactUpserted
from schemas.envelope import encode, envelope_timestamp, wrap
from schemas.ids import VARIANT, Uuid5Names
from services.cli.contact_csv import (
    MAX_FIELD_CHARS,
    MAX_NAME_CHARS,
    NAME_FAULT,
    Header,
    NumberedRow,
    RejectedRow,
    email_fault,
    field_fault,
    split_lists,
)

# A JSON string literal, escaped as pydantic escapes it (quotes, backslash and control
# characters; everything else stays UTF-8). The C function costs a fraction of json.dumps.
json_string: Callable[[str], str] = json.encoder.encode_basestring

# Rows between two readings of the clock: rows written within the same few milliseconds share
# their occurred_at, and the clock and its formatting cost nothing per row.
CLOCK_EVERY_ROWS = 1_000
# Distinct `lists` cells remembered with their JSON: a file names a few lists over and over.
# Bounded so a file with a different list set on every row cannot grow memory.
LISTS_CACHE_SIZE = 4_096
# Detail written on the suppressions of a blocklist import.
BLOCKLIST_DETAIL = "csv blocklist import"

# What the writer yields per good row: line, contact id, key, upsert value, and the
# ContactSuppressed value to write after it (blocklist imports) or None.
ContactRecord = tuple[int, str, bytes, bytes, bytes | None]

class ContactIds:
    """`contact_id_for(tenant_id, email)` for one tenant, about four times faster: `of(identity)`
    takes the identity (`email_identity`; for a `normalise_email` result, its `.lower()`), the
    hash of the namespace and tenant is computed once and copied for each address. The
    namespace is contact_id_for's own, so the ids cannot differ (the unit tests compare them)."""

    def __init__(self, tenant_id: str) -> None:
        self.of = Uuid5Names(_CONTACT_NAMESPACE, f"{tenant_id}\x00")


class EnvelopeIds:
    """Envelope ids of one import run: `<74 random bits, version 8, variant>` + 12-digit line.

    `prefix` is the first 24 characters of every id of the run; `for_line(line)` is the id of
    that line's record. Two runs share a prefix with probability 2**-74 per pair.
    """

    # The widest line number the last 12 digits hold.
    MAX_LINE = 10**12 - 1

    def __init__(self) -> None:
        h = os.urandom(10).hex()
        self.prefix = f"{h[:8]}-{h[8:12]}-8{h[12:15]}-{VARIANT[h[15]]}{h[16:19]}-"

    def for_line(self, line: int) -> str:
        if not 0 <= line <= self.MAX_LINE:
            raise ValueError(f"line {line} does not fit an envelope id")
        return f"{self.prefix}{line:012d}"

    @staticmethod
    def line_of(value: bytes) -> int:
        """The line a record of an import was written for, read from its envelope id (the
        value starts with `{"id":"<uuid>"`, as every envelope does)."""
        return int(value[31:43])


class TemplateDrift(RuntimeError):
    """The pydantic path no longer writes the envelope this module fills in."""


def _pieces(sample: str, slots: Sequence[tuple[str, str]]) -> list[str]:
    """`sample` cut at each sentinel, in order: len(slots) + 1 constant pieces, a value goes
    between two. The text after a sentinel in `slots` is appended to the piece before its slot
    (an id's run prefix). Raises TemplateDrift when a sentinel is missing, out of order or left
    over."""
    rest, pieces = sample, []
    for sentinel, prefix in slots:
        before, found, rest = rest.partition(sentinel)
        if not found:
            raise TemplateDrift(f"{sentinel!r} not where expected in {sample}")
        pieces.append(before + prefix)
    if any(sentinel in rest for sentinel, _ in slots):
        raise TemplateDrift(f"a sentinel appears more often than expected in {sample}")
    return [*pieces, rest]


def _percent_template(pieces: Sequence[str]) -> str:
    """Pieces joined by %s, their own % kept literal: one %-format fills every gap."""
    return "%s".join(piece.replace("%", "%%") for piece in pieces)


# Sentinel values for the templates: valid for the schema, impossible in real records
# (contact ids are UUIDs; the moment is long past).
_CONTACT = "contact-sentinel.0"
_EMAIL = "email.sentinel.0@sentinel.example"
_FIRST, _LAST, _LIST = "first-sentinel.0", "last-sentinel.0", "list-sentinel.0"
_MOMENT = datetime(1999, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
_UPSERT_ID = "00000000-0000-8000-8000-00000000a001"
_SUPPRESSION_ID = "00000000-0000-8000-8000-00000000a002"


def _attribute_sentinel(index: int) -> str:
    return f"attribute-sentinel.{index}"


def _escaped(text: str) -> str:
    """The inside of `text`'s JSON string literal."""
    return json_string(text)[1:-1]


class ContactRecordWriter:
    """Checks CSV rows and writes their contacts.events records, for one tenant and one run.

    Each list in `base_lists` is joined by every contact (before the row's own lists);
    `with_row_lists=False` ignores the `lists` column (blocklist imports) and
    `suppress=True` adds a ContactSuppressed(manual_blocklist) after each upsert, caused by it.
    `aliases` maps an identity's own contact id to the existing contact its rows go to.
    """

    def __init__(
        self,
        tenant_id: str,
        header: Header,
        *,
        base_lists: Sequence[str] = (),
        with_row_lists: bool = True,
        suppress: bool = False,
        ids: EnvelopeIds | None = None,
        suppression_ids: EnvelopeIds | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        self.header = header
        self.aliases = dict(aliases or {})
        self.ids = ids or EnvelopeIds()
        self.contact_ids = ContactIds(tenant_id)
        self.key_prefix = f"{tenant_id}:"
        self.base_lists = list(base_lists)
        self.with_row_lists = with_row_lists and header.lists is not None
        self.clock = clock
        self.upsert_pieces, self.attributes_template = self._upsert_pieces(tenant_id)
        self.suppression_pieces = (
            self._suppression_pieces(tenant_id, suppression_ids or EnvelopeIds()) if suppress else None
        )
        self._lists_json: dict[str, str] = {}

    def _upsert_pieces(self, tenant_id: str) -> tuple[list[str], str]:
        """The upsert's pieces around id, contact, moment, id, contact, e-mail, first and last
        name, then the %-template of everything up to the lists (the attributes), then the
        piece after the lists."""
        names = [name for name, _ in self.header.attributes]
        sentinels = [_attribute_sentinel(i) for i in range(len(names))]
        payload = ContactUpserted(
            contact_id=_CONTACT, email=_EMAIL, first_name=_FIRST, last_name=_LAST,
            attributes=dict(zip(names, sentinels, strict=True)), lists=[_LIST],
        )
        sample = encode(wrap(payload, tenant_id=tenant_id, aggregate_id=_CONTACT,
                             message_id=uuid.UUID(_UPSERT_ID), occurred_at=_MOMENT)).decode()
        run = self.ids.prefix
        pieces = _pieces(sample, [
            (_UPSERT_ID[:-12], run), (_UPSERT_ID[-12:], ""), (_CONTACT, ""),
            (envelope_timestamp(_MOMENT), ""), (_UPSERT_ID[:-12], run), (_UPSERT_ID[-12:], ""),
            (_CONTACT, ""), (_EMAIL, ""), (_FIRST, ""), (_LAST, ""), *[(s, "") for s in sentinels],
            (f'["{_LIST}"]', ""),
        ])
        # The run prefix replaced the first 24 characters of each id: its slot is empty.
        head = [pieces[0] + pieces[1], pieces[2], pieces[3], pieces[4] + pieces[5], *pieces[6:10]]
        attributes = _percent_template(pieces[10:-1])
        return [*head, pieces[-1]], attributes

    def _suppression_pieces(self, tenant_id: str, suppression_ids: EnvelopeIds) -> list[str]:
        """The suppression's pieces around its id, contact, moment, upsert id (correlation),
        upsert id (causation) and contact."""
        payload = ContactSuppressed(contact_id=_CONTACT, reason="manual_blocklist", detail=BLOCKLIST_DETAIL)
        upsert_id = uuid.UUID(_UPSERT_ID)
        sample = encode(wrap(payload, tenant_id=tenant_id, aggregate_id=_CONTACT,
                             message_id=uuid.UUID(_SUPPRESSION_ID), correlation_id=upsert_id,
                             causation_id=upsert_id, occurred_at=_MOMENT)).decode()
        own, run = suppression_ids.prefix, self.ids.prefix
        pieces = _pieces(sample, [
            (_SUPPRESSION_ID[:-12], own), (_SUPPRESSION_ID[-12:], ""), (_CONTACT, ""),
            (envelope_timestamp(_MOMENT), ""), (_UPSERT_ID[:-12], run), (_UPSERT_ID[-12:], ""),
            (_UPSERT_ID[:-12], run), (_UPSERT_ID[-12:], ""), (_CONTACT, ""),
        ])
        return [pieces[0] + pieces[1], pieces[2], pieces[3], pieces[4] + pieces[5], pieces[6] + pieces[7],
                pieces[8], pieces[9]]

    def lists_json(self, cell: str) -> str:
        """The JSON list of memberships for a `lists` cell (the cell is "" when the column is
        absent or ignored), or raises ValueError with the reason the cell is unusable."""
        cached = self._lists_json.get(cell)
        if cached is not None:
            return cached
        row_lists = split_lists(cell) if self.with_row_lists else []
        if isinstance(row_lists, str):
            raise ValueError(row_lists)
        lists = self.base_lists + [x for x in row_lists if x not in self.base_lists]
        text = "[" + ",".join(map(json_string, lists)) + "]"
        if len(self._lists_json) >= LISTS_CACHE_SIZE:
            self._lists_json.clear()
        self._lists_json[cell] = text
        return text

    def records(self, rows: Iterator[NumberedRow | RejectedRow]) -> Iterator[ContactRecord | RejectedRow]:
        """Each numbered row's record, or its rejection (the rules of `contact_csv.check_row`).

        The hot loop of the import: every name is a local, and a row costs one csv split, one
        address check (`normalise_email`'s fast path), one SHA-1 and two string joins. Values
        go into the JSON as they are when the row holds nothing JSON escapes (quotes,
        backslashes, control characters), which is the common case; otherwise each value is
        escaped.
        """
        header = self.header
        width = header.width
        # Absent columns read the "" appended to each checked row (index `width`).
        email_at = header.email
        first_at = width if header.first_name is None else header.first_name
        last_at = width if header.last_name is None else header.last_name
        lists_at = header.lists if self.with_row_lists and header.lists is not None else width
        attribute_values = _getter([index for _, index in header.attributes])
        p0, p1, p2, p3, p4, p5, p6, p7, p_end = self.upsert_pieces
        attributes_template = self.attributes_template
        suppression = self.suppression_pieces
        contact_id, key_prefix = self.contact_ids.of, self.key_prefix
        aliases = self.aliases
        lists_json, cache = self.lists_json, self._lists_json
        escaped, max_line = _escaped, EnvelopeIds.MAX_LINE
        clock_in, moment = 0, envelope_timestamp(self.clock())
        for item in rows:
            if isinstance(item, RejectedRow):
                yield item
                continue
            line, row = item
            if len(row) != width:
                yield RejectedRow(line, f"expected {width} fields, found {len(row)}")
                continue
            joined = "".join(row)
            if len(joined) > MAX_FIELD_CHARS or not joined.isascii():
                fault = field_fault(row, header)
                if fault is not None:
                    yield RejectedRow(line, fault)
                    continue
            try:
                email = normalise_email(row[email_at])
            except InvalidEmail:
                yield RejectedRow(line, email_fault(row[email_at]))
                continue
            row.append("")
            first, last = row[first_at].strip(), row[last_at].strip()
            if len(first) > MAX_NAME_CHARS or len(last) > MAX_NAME_CHARS:
                yield RejectedRow(line, NAME_FAULT)
                continue
            lists = cache.get(row[lists_at])
            if lists is None:
                try:
                    lists = lists_json(row[lists_at])
                except ValueError as exc:
                    yield RejectedRow(line, str(exc))
                    continue
            if line > max_line:
                raise ValueError(f"line {line} does not fit an envelope id")
            clock_in += 1
            if clock_in >= CLOCK_EVERY_ROWS:
                clock_in, moment = 0, envelope_timestamp(self.clock())
            cid = contact_id(email.lower())  # the identity's id: the address regardless of case
            if aliases:
                cid = aliases.get(cid, cid)
            digits = str(line).zfill(12)
            if joined.isprintable() and '"' not in joined and "\\" not in joined:
                attributes = attributes_template % attribute_values(row)
            else:
                email, first, last = escaped(email), escaped(first), escaped(last)
                attributes = attributes_template % tuple(map(escaped, attribute_values(row)))
            value = "".join((
                p0, digits, p1, cid, p2, moment, p3, digits, p4, cid, p5, email, p6, first, p7, last,
                attributes, lists, p_end,
            ))
            yield (
                line, cid, (key_prefix + cid).encode(), value.encode(),
                None if suppression is None else "".join((
                    suppression[0], digits, suppression[1], cid, suppression[2], moment, suppression[3],
                    digits, suppression[4], digits, suppression[5], cid, suppression[6],
                )).encode(),
            )


def _getter(indices: list[int]) -> Callable[[list[str]], Sequence[str]]:
    """The values at `indices` of a row, always as a sequence (itemgetter of one index is not)."""
    if not indices:
        return lambda row: ()
    if len(indices) == 1:
        only = indices[0]
        return lambda row: (row[only],)
    return operator.itemgetter(*indices)
