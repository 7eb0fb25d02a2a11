"""Segment criteria (schemas.segments) compiled to a SQL predicate over the projected contacts.

Guarantee: the predicate is three-valued, and whenever it is TRUE or FALSE for a contact it
equals `schemas.segments.evaluate` on that contact as the read models hold it
(contact_profiles, contact_list_members); it is NULL ("not decided in SQL") where SQL cannot
read a value exactly as Python does, and only there. A caller counts the TRUE rows in SQL and
evaluates the NULL rows in Python (projections/segment_counts.py), so a count is never wrong,
only slower for unusual data. Soundness of the combination rests on SQL's Kleene logic: AND,
OR and NOT of TRUE/FALSE/NULL give TRUE or FALSE only when every way of deciding the NULLs
gives that same answer.

Per condition (Python rule -> SQL):
- eq, ne, in, contains, starts_with: exact, case-sensitive text under the "C" collation
  (byte order; equality is exact under any deterministic collation anyway). Always decided.
  A value holding NUL never matches: stored text cannot hold NUL (the projection stores U+FFFD).
- exists: not blank after Python's `str.strip()`, whose full set of whitespace characters is
  trimmed in SQL. Always decided.
- gt/gte/lt/lte: Python's `float(value.strip())`, finite. Decided in SQL for plain ASCII
  decimals of up to 20+20 digits and a two-digit exponent (PostgreSQL and Python both round
  those correctly to the same double, and none overflows); FALSE for ASCII text without a
  digit (Python cannot read a finite number from it); NULL otherwise (underscores, Unicode
  digits or spaces, huge exponents...).
- before/after: ISO date or datetime as `_parse_moment` reads it. Decided through the SQL
  function segment_moment (migration 0007) for the common ISO forms; FALSE for ASCII text
  without a digit; NULL otherwise (week dates, basic format, other separators...). Relative
  bounds ("7 days ago") are resolved in Python against the `now` given to `compile_criteria`.
- in_list: membership in contact_list_members. Always decided.
- missing attribute: FALSE for every condition except `ne` (TRUE), as in Python.

The predicate reads the aliases `p` (contact_profiles) and `c` (contacts) of the caller's
query. Every value is a quoted literal (psycopg's sql.Literal), never spliced text.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from psycopg import sql

from schemas.segments import (
    ATTRIBUTE_PREFIX,
    After,
    All,
    AnyOf,
    Before,
    Contains,
    Criteria,
    Eq,
    Exists,
    Gt,
    Gte,
    In,
    InList,
    Lt,
    Lte,
    Ne,
    Not,
    StartsWith,
    resolve_date,
)

# Every character Python's str.strip() removes (str.isspace), for `exists`.
PYTHON_WHITESPACE = "".join(ch for ch in map(chr, range(0x110000)) if ch.isspace())
# The ASCII whitespace both float() and PostgreSQL's float8 input skip around a number.
_ASCII_SPACE = r"[ \t\n\r\f\v]*"
# Numbers SQL decides: at most 20 digits before and after the point and a two-digit exponent,
# so the magnitude stays within 1e-140..1e120: no overflow or underflow error in PostgreSQL
# (Python would give inf or 0.0 there), and both sides round the same text to the same double.
NUMBER_PATTERN = (
    rf"^{_ASCII_SPACE}[+-]?([0-9]{{1,20}}(\.[0-9]{{0,20}})?|\.[0-9]{{1,20}})"
    rf"([eE][+-]?[0-9]{{1,2}})?{_ASCII_SPACE}$"
)

_FIELDS = {"email": sql.SQL("p.email"), "first_name": sql.SQL("p.first_name"),
           "last_name": sql.SQL("p.last_name")}
TRUE, FALSE, UNKNOWN = sql.SQL("true"), sql.SQL("false"), sql.SQL("NULL::boolean")


def _field(path: str) -> tuple[sql.Composable, bool]:
    """The SQL value of a field path, and whether it can be missing (NULL)."""
    if path.startswith(ATTRIBUTE_PREFIX):
        name = path[len(ATTRIBUTE_PREFIX):]
        return sql.SQL("(p.attributes ->> {})").format(sql.Literal(name)), True
    return _FIELDS[path], False


def _text(value: str) -> sql.Composable:
    return sql.SQL("{} COLLATE \"C\"").format(sql.Literal(value))


def _decided(test: sql.Composable) -> sql.Composable:
    """A comparison on a possibly-missing value: a missing value makes it FALSE."""
    return sql.SQL("COALESCE({}, false)").format(test)


def _no_digit_ascii(value: sql.Composable) -> sql.Composable:
    # ASCII text (one byte per character in UTF-8) without 0-9 cannot hold a finite number
    # nor an ISO date for Python either: decided FALSE instead of evaluated in Python.
    return sql.SQL("(octet_length({v}) = char_length({v}) AND {v} !~ '[0-9]')").format(v=value)


def compile_criteria(expr: Criteria, now: datetime) -> sql.Composable:
    """The three-valued SQL predicate for `expr` at `now` (tz-aware: relative dates)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return _compile(expr, now)


def _join(parts: Sequence[sql.Composable], word: str) -> sql.Composable:
    return sql.SQL("({})").format(sql.SQL(f" {word} ").join(parts))


def _compile(expr: Criteria, now: datetime) -> sql.Composable:
    if isinstance(expr, All):
        return _join([_compile(c, now) for c in expr.conditions], "AND")
    if isinstance(expr, AnyOf):
        return _join([_compile(c, now) for c in expr.conditions], "OR")
    if isinstance(expr, Not):
        return sql.SQL("(NOT {})").format(_compile(expr.condition, now))
    if isinstance(expr, InList):
        return sql.SQL(
            "EXISTS (SELECT 1 FROM contact_list_members m WHERE m.tenant_id = c.tenant_id"
            " AND m.contact_id = c.contact_id AND m.list_id = {})"
        ).format(sql.Literal(expr.list_id))
    value, _ = _field(expr.field)
    if isinstance(expr, Ne):
        if "\x00" in expr.value:
            return TRUE
        return sql.SQL("({v} IS NULL OR {v} <> {x})").format(v=value, x=_text(expr.value))
    if isinstance(expr, Eq):
        if "\x00" in expr.value:
            return FALSE
        return _decided(sql.SQL("{} = {}").format(value, _text(expr.value)))
    if isinstance(expr, In):
        values = sorted({v for v in expr.values if "\x00" not in v})
        if not values:
            return FALSE
        return _decided(sql.SQL("{} COLLATE \"C\" = ANY({}::text[])").format(
            value, sql.Literal(values)))
    if isinstance(expr, Contains):
        if "\x00" in expr.value:
            return FALSE
        return _decided(sql.SQL("strpos({} COLLATE \"C\", {}) > 0").format(
            value, sql.Literal(expr.value)))
    if isinstance(expr, StartsWith):
        if "\x00" in expr.value:
            return FALSE
        return _decided(sql.SQL("starts_with({} COLLATE \"C\", {})").format(
            value, sql.Literal(expr.value)))
    if isinstance(expr, Exists):
        return _decided(sql.SQL("btrim({}, {}) <> ''").format(
            value, sql.Literal(PYTHON_WHITESPACE)))
    if isinstance(expr, Gt | Gte | Lt | Lte):
        op = {Gt: ">", Gte: ">=", Lt: "<", Lte: "<="}[type(expr)]
        return sql.SQL(
            "(CASE WHEN {v} IS NULL THEN false"
            " WHEN {v} ~ {pattern} THEN btrim({v}, {space})::float8 {op} {x}::float8"
            " WHEN {no_digit} THEN false END)"
        ).format(v=value, pattern=sql.Literal(NUMBER_PATTERN), space=sql.Literal(" \t\n\r\f\v"),
                 op=sql.SQL(op),
                 x=sql.Literal(repr(expr.value)), no_digit=_no_digit_ascii(value))
    if isinstance(expr, Before | After):
        bound = resolve_date(expr.value, now)
        return sql.SQL(
            "(CASE WHEN {v} IS NULL THEN false"
            " ELSE COALESCE(segment_moment({v}) {op} {bound}::timestamptz,"
            " CASE WHEN {no_digit} THEN false END) END)"
        ).format(v=value, op=sql.SQL("<" if isinstance(expr, Before) else ">"),
                 bound=sql.Literal(bound), no_digit=_no_digit_ascii(value))
    raise TypeError(f"unknown criteria node: {type(expr).__name__}")  # pragma: no cover
