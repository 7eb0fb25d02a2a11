"""The contact CSV format: its header, its limits, its numbered rows and the reference parser.

Guarantees:
- A row is numbered by the physical line it starts on (header = line 1), also when a quoted
  field spans several lines; blank lines are skipped, never numbered as rows.
- Every rule a row must pass is stated once here (`check_row`); `parse_rows` applies them
  lazily, one row at a time, so memory does not grow with the file.
- `parse_rows` is the readable reference of the import: the fast record writer
  (`contact_records`) must accept, reject (same line, same reason) and write exactly what
  `parse_rows` followed by the pydantic models would; the unit tests hold the two together.

Columns: `email` (required), `first_name`, `last_name`, `lists` (`;`-separated list ids), and
any other named column is an attribute of that name; a column named `attr.<name>` is the
attribute `<name>` (as segments name it), which also lets an attribute be called `email`.
Header names are matched case-insensitively; unnamed columns are ignored. A column mapping
(`read_header`) renames a file's own headers ("E-Mail Address" -> email, "Tier" -> attr.plan)
or drops columns, so an export from another tool imports as it is.
"""

from __future__ import annotations

import csv
import itertools
import re
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from schemas.base import EntityId, InvalidEmail, normalise_email

# Longest value accepted in any field: longer ones are almost always a broken quote that
# swallowed the following lines, not data.
MAX_FIELD_CHARS = 1000
# ContactUpserted's limit on first_name and last_name; checked here so that a too-long name
# rejects its row instead of failing the schema.
MAX_NAME_CHARS = 200

# Column names with a meaning of their own; every other named column is an attribute.
EMAIL, FIRST_NAME, LAST_NAME, LISTS = "email", "first_name", "last_name", "lists"
# A header naming an attribute explicitly, as segment expressions do ("attr.plan").
ATTRIBUTE_PREFIX = "attr."
# Separator of list ids inside the `lists` column.
LIST_SEPARATOR = ";"
_BOM = "\ufeff"


class CsvImportError(Exception):
    """The file as a whole cannot be imported (unreadable, empty, no email column...)."""


@dataclass(frozen=True, slots=True)
class RejectedRow:
    """A row that was not imported: its line number in the file (header = 1) and why."""

    line: int
    reason: str


@dataclass(frozen=True, slots=True)
class ParsedRow:
    """A row that passed every check: its e-mail is normalised, its list ids are valid."""

    line: int
    email: str
    first_name: str = ""
    last_name: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
    lists: list[str] = field(default_factory=list)


def _pattern_of(annotated: object) -> re.Pattern[str]:
    """The regex of a constrained-string alias, so the checks here cannot drift from schemas."""
    for constraint in typing.get_args(annotated)[1:]:
        pattern = getattr(constraint, "pattern", None)
        if isinstance(pattern, str):
            return re.compile(pattern)
    raise TypeError(f"{annotated!r} has no pattern")


ENTITY_ID = _pattern_of(EntityId)


@dataclass(frozen=True)
class Header:
    """Where the known columns sit, and the attribute columns by attribute name."""

    width: int
    email: int
    first_name: int | None
    last_name: int | None
    lists: int | None
    attributes: tuple[tuple[str, int], ...]
    names: tuple[str, ...]


# The target of a column mapping that drops the column.
IGNORED = "-"


def read_header(fields: list[str], columns: Mapping[str, str] | None = None) -> Header:
    """The header of a file; raises CsvImportError when it cannot be used.

    `columns` maps header names (case-insensitive) to what they hold: `email`, `first_name`,
    `last_name`, `lists`, `attr.<name>`, or `-` to ignore the column; unmapped columns are read
    by their own name. A mapping that names a column the header lacks, or an unknown target, is
    refused (a typo would otherwise import the file without that column).
    """
    names = [name.strip() for name in fields]
    if not any(names):
        raise CsvImportError("the first line must be a header naming the columns; it is empty")
    if not "".join(names).isascii():
        try:
            "".join(names).encode()
        except UnicodeEncodeError:
            raise CsvImportError("the header line is not valid UTF-8") from None
    mapping = _column_mapping(columns or {}, names)
    known: dict[str, int] = {}
    attributes: list[tuple[str, int]] = []
    seen: set[str] = set()
    for index, name in enumerate(names):
        target = mapping.get(name.lower())
        if not name or target == IGNORED:
            continue  # an unnamed column (e.g. a trailing comma) carries nothing to keep
        name = target or name
        folded = name.lower()
        if folded.startswith(ATTRIBUTE_PREFIX):
            name = name[len(ATTRIBUTE_PREFIX):]
            if not name:
                raise CsvImportError(f"column {ATTRIBUTE_PREFIX!r} names no attribute")
            folded = ATTRIBUTE_PREFIX + name.lower()
        elif folded not in (EMAIL, FIRST_NAME, LAST_NAME, LISTS):
            folded = ATTRIBUTE_PREFIX + folded  # "plan" and "attr.plan" are the same column
        if folded in seen:
            raise CsvImportError(f"column {names[index]!r} appears twice in the header")
        seen.add(folded)
        if folded.startswith(ATTRIBUTE_PREFIX):
            attributes.append((name, index))
        else:
            known[folded] = index
    if EMAIL not in known:
        listed = ", ".join(n for n in names if n)
        raise CsvImportError(f"the header has no 'email' column (columns: {listed})")
    return Header(
        width=len(names),
        email=known[EMAIL],
        first_name=known.get(FIRST_NAME),
        last_name=known.get(LAST_NAME),
        lists=known.get(LISTS),
        attributes=tuple(attributes),
        names=tuple(names),
    )


def column_mapping(items: Iterable[str]) -> dict[str, str]:
    """A column mapping from `NAME=TARGET` strings (the CLI's repeated --column)."""
    mapping: dict[str, str] = {}
    for item in items:
        column, found, target = item.rpartition("=")
        if not found or not column.strip() or not target.strip():
            raise CsvImportError(f"a column mapping is NAME=TARGET, got {item!r}")
        mapping[column.strip()] = target.strip()
    return mapping


def _column_mapping(columns: Mapping[str, str], names: list[str]) -> dict[str, str]:
    present = {name.lower() for name in names if name}
    mapping: dict[str, str] = {}
    for column, target in columns.items():
        column, target = column.strip(), target.strip()
        if column.lower() not in present:
            raise CsvImportError(f"the column mapping names {column!r}, which is not in the header")
        folded = target.lower()
        known = folded in (EMAIL, FIRST_NAME, LAST_NAME, LISTS, IGNORED)
        if not known and not (folded.startswith(ATTRIBUTE_PREFIX) and len(folded) > len(ATTRIBUTE_PREFIX)):
            raise CsvImportError(
                f"column {column!r} cannot be mapped to {target!r}: use email, first_name, last_name,"
                f" lists, attr.<name> or {IGNORED} (ignore)"
            )
        mapping[column.lower()] = folded if known else target
    return mapping


# A row of fields with the line it starts on.
NumberedRow = tuple[int, list[str]]


def numbered_rows(
    lines: Iterable[str], columns: Mapping[str, str] | None = None
) -> tuple[Header, Iterator[NumberedRow | RejectedRow]]:
    """The header and a lazy iterator of (line number, fields) or RejectedRow (malformed CSV).

    `lines` are text lines with their line endings, as from a file opened with newline="";
    undecodable bytes are expected as lone surrogates (errors="surrogateescape"). Reads the
    header at once (`columns`: see `read_header`): raises CsvImportError when it is missing,
    unreadable, has no `email` column or does not fit the mapping.
    """
    source = iter(lines)
    first = next(source, None)
    if first is None:
        raise CsvImportError("the file is empty: a header line naming the columns is required")
    reader = csv.reader(itertools.chain([first.removeprefix(_BOM)], source))
    try:
        header_fields = next(reader)
    except csv.Error as exc:
        raise CsvImportError(f"the header line is not valid CSV: {exc}") from None
    return read_header(header_fields, columns), _rows(reader)


def _rows(reader: typing.Any) -> Iterator[NumberedRow | RejectedRow]:
    end = reader.line_num
    while True:
        # A csv.Error ends the for loop; the reader itself carries on with the next line.
        try:
            for row in reader:
                start, end = end + 1, reader.line_num
                if row:
                    yield start, row
            return
        except csv.Error as exc:
            start, end = end + 1, reader.line_num
            yield RejectedRow(start, f"malformed CSV: {exc}")


def split_lists(value: str) -> list[str] | str:
    """The list ids of a `lists` cell in order, without repeats, or why they are unusable."""
    lists: list[str] = []
    for part in value.split(LIST_SEPARATOR):
        list_id = part.strip()
        if not list_id:
            continue
        if not ENTITY_ID.match(list_id):
            return f"invalid list id {list_id!r}"
        if list_id not in lists:
            lists.append(list_id)
    return lists


def field_fault(row: list[str], header: Header) -> str | None:
    """Why a row's fields are unusable as a whole (count, encoding, length), or None."""
    if len(row) != header.width:
        return f"expected {header.width} fields, found {len(row)}"
    joined = "".join(row)
    if not joined.isascii():
        try:
            joined.encode()
        except UnicodeEncodeError:  # lone surrogates: bytes the UTF-8 decoder could not read
            return "not valid UTF-8"
    if len(joined) > MAX_FIELD_CHARS:  # cheap pre-check before looking at each field
        for name, value in zip(header.names, row, strict=True):
            if len(value) > MAX_FIELD_CHARS:
                return f"field {name!r} is longer than {MAX_FIELD_CHARS} characters"
    return None


def email_fault(raw_email: str) -> str:
    """Why an address that normalise_email refused is unusable."""
    if not raw_email.strip():
        return "empty email"
    try:
        normalise_email(raw_email)
    except InvalidEmail as exc:
        return str(exc)
    raise ValueError(f"{raw_email!r} is a valid address")


NAME_FAULT = f"first_name and last_name are limited to {MAX_NAME_CHARS} characters"


def check_row(
    row: list[str], line: int, header: Header, *, with_lists: bool = True
) -> ParsedRow | RejectedRow:
    """A row checked against every rule, in order: field count, encoding, field length,
    e-mail, name length, list ids (only `with_lists`; a blocklist import ignores the column)."""
    fault = field_fault(row, header)
    if fault is not None:
        return RejectedRow(line, fault)
    try:
        email = normalise_email(row[header.email])
    except InvalidEmail:
        return RejectedRow(line, email_fault(row[header.email]))
    first_name = row[header.first_name].strip() if header.first_name is not None else ""
    last_name = row[header.last_name].strip() if header.last_name is not None else ""
    if len(first_name) > MAX_NAME_CHARS or len(last_name) > MAX_NAME_CHARS:
        return RejectedRow(line, NAME_FAULT)
    lists: list[str] = []
    if with_lists and header.lists is not None:
        split = split_lists(row[header.lists])
        if isinstance(split, str):
            return RejectedRow(line, split)
        lists = split
    attributes = {name: row[index] for name, index in header.attributes}
    return ParsedRow(line, email, first_name, last_name, attributes, lists)


def parse_rows(
    lines: Iterable[str], *, with_lists: bool = True, columns: Mapping[str, str] | None = None
) -> Iterator[ParsedRow | RejectedRow]:
    """Parse CSV lines (header first) into checked rows or rejections, lazily.

    See `numbered_rows` for `lines`, `columns` and line numbers. Raises CsvImportError (on the
    first `next`) when the header is missing, unreadable or has no `email` column.
    """
    header, rows = numbered_rows(lines, columns)
    for item in rows:
        if isinstance(item, RejectedRow):
            yield item
        else:
            yield check_row(item[1], item[0], header, with_lists=with_lists)
