"""The segment criteria compiler's pure parts: the character sets and number pattern it relies
on, and that every value reaches SQL as a quoted literal."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime

import pytest

from projections.segment_sql import NUMBER_PATTERN, PYTHON_WHITESPACE, compile_criteria
from schemas.segments import parse_criteria

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)


def test_the_whitespace_set_is_exactly_what_str_strip_removes() -> None:
    assert {ch for ch in PYTHON_WHITESPACE} == {chr(i) for i in range(0x110000) if chr(i).isspace()}
    assert "\x00" not in PYTHON_WHITESPACE


@pytest.mark.parametrize("text", ["0", "-3", "+.5", "5.", " 12.5 ", "1e3", "1E-02", "\t7\n",
                                  "9" * 20 + "." + "9" * 20 + "e99", "." + "0" * 19 + "1e-99"])
def test_numbers_the_sql_decides_are_finite_python_floats(text: str) -> None:
    # ARE and Python's re agree on this pattern (classes, counted repeats, anchors only).
    assert re.fullmatch(NUMBER_PATTERN, text)
    assert math.isfinite(float(text.strip()))


@pytest.mark.parametrize("text", ["1_000", "\u0663", "\xa012", "1e400", "9" * 21, "inf", "nan",
                                  "0x10", "", " ", "1e", "e5", "--1", "1.2.3", "12v"])
def test_anything_else_is_left_to_python(text: str) -> None:
    assert re.fullmatch(NUMBER_PATTERN, text) is None


def test_values_and_attribute_names_are_quoted_literals() -> None:
    hostile = "x'); DROP TABLE contacts; --"
    expr = parse_criteria({"op": "any", "conditions": [
        {"op": "eq", "field": "attr.a'b", "value": hostile},
        {"op": "in", "field": "email", "values": [hostile, "ok"]},
        {"op": "contains", "field": "first_name", "value": hostile}]})
    text = compile_criteria(expr, NOW).as_string(None)
    assert "'x''); DROP TABLE contacts; --'" in text
    assert "(p.attributes ->> 'a''b')" in text
    assert text.count("DROP TABLE") == 3  # each inside a literal, never as SQL


def test_values_with_nul_are_decided_without_reaching_sql() -> None:
    # Stored text never holds NUL (U+FFFD replaces it), so these are constant.
    for op, constant in (("eq", "false"), ("ne", "true"), ("contains", "false"),
                         ("starts_with", "false")):
        expr = parse_criteria({"op": op, "field": "attr.x", "value": "a\x00"})
        assert compile_criteria(expr, NOW).as_string(None) == constant
    only_nul = parse_criteria({"op": "in", "field": "attr.x", "values": ["\x00"]})
    assert compile_criteria(only_nul, NOW).as_string(None) == "false"


def test_relative_dates_are_resolved_against_the_moment_given() -> None:
    expr = parse_criteria({"op": "after", "field": "attr.d", "value": "2 days ago"})
    assert "'2026-03-13 12:00:00+00:00'::timestamptz" in compile_criteria(expr, NOW).as_string(None)
    with pytest.raises(ValueError, match="timezone-aware"):
        compile_criteria(expr, datetime(2026, 3, 15))  # noqa: DTZ001
