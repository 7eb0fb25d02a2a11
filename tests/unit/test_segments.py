"""Segments: criteria validation (with the path of each fault), evaluation, commands and events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from schemas import registry
from schemas.commands import SendCampaign
from schemas.contacts import ContactState
from schemas.envelope import SchemaViolation, decode, encode, wrap
from schemas.registry import load
from schemas.segments import (
    MAX_DEPTH,
    ChangeSegment,
    DefineSegment,
    DeleteSegment,
    InvalidCriteria,
    Segment,
    SegmentChanged,
    SegmentDefined,
    SegmentDeleted,
    SegmentRejected,
    decide_segment,
    error_paths,
    evaluate,
    evolve_segment,
    fold_segment,
    parse_criteria,
    resolve_date,
)

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)

ANN = ContactState(
    id="c1",
    email="ann@example.com",
    first_name="Ann",
    last_name="Lee",
    attributes={
        "city": "Paris", "age": "42", "score": " 7.5 ", "junk": "n/a", "blank": "  ",
        "signed_up": "2026-03-01", "last_seen": "2026-03-15T09:00:00+00:00", "naive": "2026-03-10T00:00:00",
    },
    lists=frozenset({"news", "vip"}),
)


def matches(expr: dict, contact: ContactState = ANN, now: datetime = NOW) -> bool:
    return evaluate(parse_criteria(expr), contact, now)


def leaf(op: str, field: str, value=None, key: str = "value") -> dict:
    expr = {"op": op, "field": field}
    if value is not None:
        expr[key] = value
    return expr


# --- operators -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        (leaf("eq", "email", "ann@example.com"), True),
        (leaf("eq", "first_name", "ann"), False),  # case-sensitive
        (leaf("eq", "last_name", "Lee"), True),
        (leaf("eq", "attr.city", "Paris"), True),
        (leaf("eq", "attr.missing", ""), False),
        (leaf("ne", "attr.city", "Rome"), True),
        (leaf("ne", "attr.city", "Paris"), False),
        (leaf("ne", "attr.missing", "x"), True),  # the negation of eq
        (leaf("in", "attr.city", ["Rome", "Paris"], "values"), True),
        (leaf("in", "attr.city", ["Rome"], "values"), False),
        (leaf("in", "attr.missing", ["x"], "values"), False),
        (leaf("contains", "email", "@example."), True),
        (leaf("contains", "attr.city", "ris"), True),
        (leaf("contains", "attr.city", "RIS"), False),
        (leaf("contains", "attr.missing", "x"), False),
        (leaf("starts_with", "email", "ann@"), True),
        (leaf("starts_with", "first_name", "nn"), False),
        (leaf("exists", "attr.city"), True),
        (leaf("exists", "attr.blank"), False),
        (leaf("exists", "attr.missing"), False),
        (leaf("exists", "first_name"), True),
        ({"op": "in_list", "list_id": "vip"}, True),
        ({"op": "in_list", "list_id": "other"}, False),
    ],
)
def test_string_membership_and_existence_operators(expr, expected):
    assert matches(expr) is expected


@pytest.mark.parametrize(
    ("op", "field", "value", "expected"),
    [
        ("gt", "attr.age", 41, True),
        ("gt", "attr.age", 42, False),
        ("gte", "attr.age", 42, True),
        ("gte", "attr.age", "42.0", True),  # a numeric string in the criteria is a number
        ("lt", "attr.age", 42.5, True),
        ("lt", "attr.age", 42, False),
        ("lte", "attr.age", 42, True),
        ("lte", "attr.score", 7.5, True),  # surrounding blanks in the contact's value are fine
        ("gt", "attr.score", 7, True),
        ("gt", "attr.junk", 0, False),     # non-numeric: false, not an exception
        ("lt", "attr.junk", 0, False),
        ("gt", "attr.missing", -1, False),
        ("gt", "attr.blank", -1, False),
        ("gt", "first_name", 0, False),
    ],
)
def test_numeric_operators_parse_the_contacts_value(op, field, value, expected):
    assert matches(leaf(op, field, value)) is expected


@pytest.mark.parametrize("weird", ["nan", "inf", "-Infinity"])
def test_non_finite_contact_values_compare_false(weird):
    contact = ContactState("c", "a@example.com", attributes={"n": weird})
    assert not matches(leaf("gt", "attr.n", 0), contact)
    assert not matches(leaf("lt", "attr.n", 0), contact)


@pytest.mark.parametrize(
    ("op", "field", "bound", "expected"),
    [
        ("after", "attr.signed_up", "2026-02-28", True),
        ("after", "attr.signed_up", "2026-03-01", False),  # equal is neither before nor after
        ("before", "attr.signed_up", "2026-03-02", True),
        ("before", "attr.signed_up", "2026-03-01T00:00:01Z", True),
        ("after", "attr.last_seen", "2026-03-15T08:00:00+00:00", True),
        ("after", "attr.last_seen", "2026-03-15T10:00:00+01:00", False),  # 09:00 UTC, equal
        ("after", "attr.naive", "2026-03-09T23:59:59Z", True),  # a naive value is UTC
        # relative bounds, counted back from NOW (2026-03-15 12:00 UTC)
        ("after", "attr.signed_up", "30 days ago", True),
        ("after", "attr.signed_up", "2 weeks ago", False),     # 2026-03-01 12:00 > 00:00
        ("before", "attr.signed_up", "2 weeks ago", True),
        ("after", "attr.last_seen", "3 hours ago", False),     # 09:00 is exactly 3 hours ago
        ("after", "attr.last_seen", "4 hours ago", True),
        ("before", "attr.last_seen", "1 hour ago", True),
        ("after", "attr.last_seen", "1 Day ago", True),
        ("after", "attr.junk", "30 days ago", False),           # unreadable: false
        ("before", "attr.missing", "30 days ago", False),
        ("before", "email", "2030-01-01", False),
    ],
)
def test_date_operators_with_iso_and_relative_bounds(op, field, bound, expected):
    assert matches(leaf(op, field, bound)) is expected


def test_relative_dates_follow_now():
    expr = leaf("after", "attr.signed_up", "7 days ago")
    assert matches(expr, now=datetime(2026, 3, 5, tzinfo=UTC))
    assert not matches(expr, now=datetime(2026, 3, 9, tzinfo=UTC))
    assert resolve_date("36 hours ago", NOW) == NOW - timedelta(hours=36)


def test_now_must_be_timezone_aware():
    with pytest.raises(ValueError, match="timezone-aware"):
        evaluate(parse_criteria(leaf("exists", "email")), ANN, datetime(2026, 1, 1))  # noqa: DTZ001


def test_nested_all_any_not():
    expr = {
        "op": "all",
        "conditions": [
            {"op": "in_list", "list_id": "news"},
            {"op": "any", "conditions": [leaf("eq", "attr.city", "Rome"), leaf("gte", "attr.age", 40)]},
            {"op": "not", "condition": {"op": "any", "conditions": [
                leaf("eq", "attr.city", "Berlin"), {"op": "in_list", "list_id": "blocked"}]}},
        ],
    }
    assert matches(expr)
    younger = ContactState("c2", "bo@example.com", attributes={"city": "Paris", "age": "30"},
                           lists=frozenset({"news"}))
    assert not matches(expr, younger)
    assert matches({"op": "not", "condition": {"op": "not", "condition": leaf("exists", "email")}})
    assert not matches({"op": "all", "conditions": [leaf("exists", "email"), leaf("exists", "attr.nope")]})
    assert matches({"op": "any", "conditions": [leaf("exists", "attr.nope"), leaf("exists", "email")]})


# --- validation ----------------------------------------------------------------------------------


def fault(expr) -> str:
    with pytest.raises(InvalidCriteria) as caught:
        parse_criteria(expr)
    return str(caught.value)


@pytest.mark.parametrize(
    ("expr", "path", "message"),
    [
        ({"op": "all", "conditions": [leaf("exists", "email"), leaf("gt", "attr.age", "old")]},
         "conditions.1.value", "valid number"),
        ({"op": "any", "conditions": [leaf("eq", "email")]}, "conditions.0.value", "Field required"),
        ({"op": "all", "conditions": [{"op": "nope"}]}, "conditions.0", "does not match any of the expected tags"),
        ({"op": "all", "conditions": [{"field": "email"}]}, "conditions.0", "Unable to extract tag"),
        ({"op": "not", "condition": leaf("eq", "phone", "1")}, "condition.field", "should match pattern"),
        ({"op": "not", "condition": leaf("eq", "attr.", "1")}, "condition.field", "should match pattern"),
        ({"op": "all", "conditions": []}, "conditions", "at least 1 item"),
        ({"op": "any", "conditions": [leaf("in", "email", [], "values")]}, "conditions.0.values", "at least 1"),
        ({"op": "all", "conditions": [{"op": "any", "conditions": [
            leaf("exists", "email"), leaf("before", "attr.d", "yesterday")]}]},
         "conditions.0.conditions.1.value", "ISO date"),
        ({"op": "in_list", "list_id": "bad id"}, "list_id", "should match pattern"),
        ({"op": "eq", "field": "email", "value": "x", "extra": 1}, "extra", "Extra inputs"),
        (leaf("gt", "attr.age", "inf"), "value", "finite number"),
        (leaf("contains", "email", ""), "value", "at least 1 character"),
    ],
)
def test_invalid_criteria_name_the_path_of_the_fault(expr, path, message):
    text = fault(expr)
    assert text.startswith(f"{path}: ") and message in text


def test_every_fault_is_reported():
    text = fault({"op": "all", "conditions": [leaf("gt", "attr.a", "x"), leaf("eq", "nope", "y")]})
    assert "conditions.0.value:" in text and "conditions.1.field:" in text


def test_too_deep_nesting_is_refused():
    expr: dict = leaf("exists", "email")
    for _ in range(MAX_DEPTH):
        expr = {"op": "not", "condition": expr}
    assert "deeper than" in fault(expr)
    with pytest.raises(ValidationError, match="deeper than"):
        DefineSegment(segment_id="s1", name="deep", criteria=expr)


def test_error_paths_can_strip_the_field_of_a_command():
    with pytest.raises(ValidationError) as caught:
        DefineSegment.model_validate({"segment_id": "s1", "name": "n", "criteria": {
            "op": "all", "conditions": [leaf("exists", "email"), leaf("lt", "attr.x", "?")]}})
    assert error_paths(caught.value) == ["criteria.conditions.1.value: " + caught.value.errors()[0]["msg"]]
    assert error_paths(caught.value, strip=1)[0].startswith("conditions.1.value: ")


# --- commands, events, aggregate -----------------------------------------------------------------

CRITERIA = parse_criteria({"op": "all", "conditions": [{"op": "in_list", "list_id": "news"},
                                                        leaf("after", "attr.signed_up", "30 days ago")]})


@pytest.mark.parametrize(
    "payload",
    [
        DefineSegment(segment_id="s1", name="Recent", criteria=CRITERIA),
        ChangeSegment(segment_id="s1", name="Renamed"),
        ChangeSegment(segment_id="s1", criteria=CRITERIA),
        DeleteSegment(segment_id="s1"),
        SegmentDefined(segment_id="s1", name="Recent", criteria=CRITERIA),
        SegmentChanged(segment_id="s1", name="Recent", criteria=CRITERIA),
        SegmentDeleted(segment_id="s1"),
    ],
)
def test_segment_messages_round_trip_on_the_wire(payload):
    message = decode(encode(wrap(payload, tenant_id="acme", aggregate_id="s1")))
    assert message.payload == payload
    assert registry.wire_name(type(payload)) == (type(payload).__name__, 1)


def test_an_invalid_definition_on_the_wire_is_a_schema_violation_naming_the_path():
    env = wrap(DefineSegment(segment_id="s1", name="n", criteria=CRITERIA), tenant_id="acme", aggregate_id="s1")
    bad = env.model_copy(update={"payload": {**env.payload, "criteria": {"op": "all", "conditions": [
        leaf("gt", "attr.age", "old")]}}})
    with pytest.raises(SchemaViolation, match=r"criteria\.all\.conditions\.0\.gt\.value"):
        decode(encode(bad))


def test_a_change_must_change_something():
    with pytest.raises(ValidationError, match="a name, criteria or both"):
        ChangeSegment(segment_id="s1")


def test_segment_aggregate_define_change_delete():
    define = DefineSegment(segment_id="s1", name="Recent", criteria=CRITERIA)
    [defined] = decide_segment(None, define)
    assert defined == SegmentDefined(segment_id="s1", name="Recent", criteria=CRITERIA)
    state = evolve_segment(None, defined)
    assert state == Segment("s1", "Recent", CRITERIA)
    with pytest.raises(SegmentRejected, match="already exists"):
        decide_segment(state, define)

    [changed] = decide_segment(state, ChangeSegment(segment_id="s1", name="Newer"))
    assert changed == SegmentChanged(segment_id="s1", name="Newer", criteria=CRITERIA)
    assert decide_segment(evolve_segment(state, changed), ChangeSegment(segment_id="s1", name="Newer")) == []

    [deleted] = decide_segment(state, DeleteSegment(segment_id="s1"))
    gone = fold_segment([defined, changed, deleted])
    assert gone is not None and gone.deleted
    for command in (ChangeSegment(segment_id="s1", name="x"), DeleteSegment(segment_id="s1")):
        with pytest.raises(SegmentRejected, match="does not exist"):
            decide_segment(gone, command)
        with pytest.raises(SegmentRejected, match="does not exist"):
            decide_segment(None, command)
    # A deleted segment's id may be defined again.
    assert decide_segment(gone, define) == [defined]


def test_send_campaign_v1_is_upcast_with_no_segments_or_exclusions():
    cmd = load("SendCampaign", 1, {"contact_ids": ["a"], "list_ids": ["news"]})
    assert cmd == SendCampaign(contact_ids=["a"], list_ids=["news"])
    assert cmd.segment_ids == cmd.exclude_list_ids == cmd.exclude_segment_ids == []
    with pytest.raises(ValidationError):
        SendCampaign(segment_ids=["bad id"])
