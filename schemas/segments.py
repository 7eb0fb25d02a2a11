"""Segments: named criteria over contact fields, attributes and list memberships.

A criteria expression is a tree of records discriminated by their `op` field:

- combinators: `all` (every condition), `any` (at least one), `not` (negation);
- string comparisons: `eq`, `ne`, `in`, `contains`, `starts_with` (exact, case-sensitive);
- numeric comparisons: `gt`, `gte`, `lt`, `lte` (the contact's value is parsed as a number);
- `exists` (present and not blank), `before` / `after` (dates), `in_list` (membership).

Fields are "email", "first_name", "last_name" or "attr.<name>" (an attribute). Evaluation
(`evaluate`) is pure and total: a missing attribute, a non-numeric value under a numeric
comparison or an unreadable date makes that comparison false, never an exception. `ne` is the
negation of `eq`, so a missing attribute is "not equal" to any value.

Dates: a bound is an ISO date ("2025-01-31", midnight UTC), an ISO datetime (naive means
UTC) or a relative date "N days|hours|weeks ago" computed from the `now` given to `evaluate`.
A contact's value is read the same way (ISO date or datetime; naive means UTC).

Invalid expressions are refused by pydantic; `parse_criteria` raises InvalidCriteria whose
message names the path of each fault without the union tags (`conditions.1.value: ...`).

Segment commands (DefineSegment, ChangeSegment, DeleteSegment) and events (SegmentDefined,
SegmentChanged, SegmentDeleted) are registered wire types; `decide_segment` and
`evolve_segment` are the pure aggregate. A send names segments by id (SendCampaign); the
command handler snapshots their criteria into the audience (events.AudienceSegment), which
the hydrator evaluates against each contact.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, StringConstraints, TypeAdapter, ValidationError, field_validator, model_validator

from schemas.base import EntityId, Record
from schemas.registry import message

if TYPE_CHECKING:  # only a type: schemas.contacts imports this module to register it
    from schemas.contacts import ContactState

# Deepest nesting of all/any/not accepted: deeper trees are almost surely generated garbage
# and would make evaluation (recursive) fail on the stack.
MAX_DEPTH = 32
# Conditions per all/any node, and values per `in`: bounds the cost of one evaluation.
MAX_CONDITIONS = 200
MAX_VALUES = 10_000

ATTRIBUTE_PREFIX = "attr."
FieldPath = Annotated[
    str, StringConstraints(pattern=r"^(email|first_name|last_name|attr\.[^\s\x00-\x1f]{1,200})$")
]
Text = Annotated[str, StringConstraints(max_length=1000)]

_RELATIVE = re.compile(r"^\s*(\d{1,6})\s+(hour|hours|day|days|week|weeks)\s+ago\s*$", re.IGNORECASE)
_UNITS = {"hour": timedelta(hours=1), "day": timedelta(days=1), "week": timedelta(weeks=1)}


def _parse_moment(text: str) -> datetime | None:
    """An ISO date (midnight UTC) or datetime (naive = UTC), or None when unreadable."""
    raw = text.strip()
    if not raw:
        return None
    try:
        if len(raw) == 10:
            day = date.fromisoformat(raw)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        moment = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def resolve_date(bound: str, now: datetime) -> datetime:
    """The moment a (validated) date bound stands for, relative ones counted back from `now`."""
    relative = _RELATIVE.match(bound)
    if relative:
        unit = relative.group(2).lower().removesuffix("s")
        return now - int(relative.group(1)) * _UNITS[unit]
    moment = _parse_moment(bound)
    if moment is None:
        raise ValueError(f"not a date: {bound!r}")
    return moment


def _check_date_bound(value: str) -> str:
    if _RELATIVE.match(value) or _parse_moment(value) is not None:
        return value
    raise ValueError('expected an ISO date or datetime, or "N days|hours|weeks ago"')


def _parse_number(text: str) -> float | None:
    try:
        number = float(text.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


# --- criteria ---------------------------------------------------------------------------------


class _Compare(Record):
    field: FieldPath


class Eq(_Compare):
    op: Literal["eq"]
    value: Text


class Ne(_Compare):
    op: Literal["ne"]
    value: Text


class In(_Compare):
    op: Literal["in"]
    values: list[Text] = Field(min_length=1, max_length=MAX_VALUES)


class Contains(_Compare):
    op: Literal["contains"]
    value: Text = Field(min_length=1)


class StartsWith(_Compare):
    op: Literal["starts_with"]
    value: Text = Field(min_length=1)


class _Numeric(_Compare):
    value: float = Field(allow_inf_nan=False)


class Gt(_Numeric):
    op: Literal["gt"]


class Gte(_Numeric):
    op: Literal["gte"]


class Lt(_Numeric):
    op: Literal["lt"]


class Lte(_Numeric):
    op: Literal["lte"]


class Exists(_Compare):
    op: Literal["exists"]


class _Dated(_Compare):
    value: str = Field(max_length=100)

    @field_validator("value")
    @classmethod
    def _is_a_date(cls, value: str) -> str:
        return _check_date_bound(value)


class Before(_Dated):
    op: Literal["before"]


class After(_Dated):
    op: Literal["after"]


class InList(Record):
    op: Literal["in_list"]
    list_id: EntityId


class All(Record):
    op: Literal["all"]
    conditions: list[Criteria] = Field(min_length=1, max_length=MAX_CONDITIONS)


class AnyOf(Record):
    op: Literal["any"]
    conditions: list[Criteria] = Field(min_length=1, max_length=MAX_CONDITIONS)


class Not(Record):
    op: Literal["not"]
    condition: Criteria


Criteria = Annotated[
    All | AnyOf | Not | Eq | Ne | In | Contains | StartsWith | Gt | Gte | Lt | Lte | Exists
    | Before | After | InList,
    Field(discriminator="op"),
]

for _model in (All, AnyOf, Not):
    _model.model_rebuild()

_TAGS = frozenset(
    {"all", "any", "not", "eq", "ne", "in", "contains", "starts_with", "gt", "gte", "lt", "lte",
     "exists", "before", "after", "in_list"}
)
_CRITERIA: TypeAdapter[Criteria] = TypeAdapter(Criteria)


def depth(expr: Criteria) -> int:
    """Nesting depth: a leaf is 1."""
    if isinstance(expr, All | AnyOf):
        return 1 + max(depth(c) for c in expr.conditions)
    if isinstance(expr, Not):
        return 1 + depth(expr.condition)
    return 1


class InvalidCriteria(ValueError):
    """A criteria expression that cannot be used; the message names the path of each fault."""


def error_paths(exc: ValidationError, *, strip: int = 0) -> list[str]:
    """`path: message` per error, union tags left out of the path (`conditions.1.value`).

    `strip` drops that many leading loc parts (e.g. 1 for "criteria" in a command)."""
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"][strip:] if not (isinstance(p, str) and p in _TAGS)]
        lines.append(f"{'.'.join(loc) or '(root)'}: {err['msg']}")
    return lines


def parse_criteria(data: Any) -> Criteria:
    """Validate a criteria expression from JSON-like data, or raise InvalidCriteria."""
    try:
        expr = _CRITERIA.validate_python(data)
    except ValidationError as exc:
        raise InvalidCriteria("; ".join(error_paths(exc))) from None
    if depth(expr) > MAX_DEPTH:
        raise InvalidCriteria(f"(root): nested deeper than {MAX_DEPTH} levels")
    return expr


def _check_depth(expr: Criteria | None) -> None:
    if expr is not None and depth(expr) > MAX_DEPTH:
        raise ValueError(f"criteria nested deeper than {MAX_DEPTH} levels")


# --- evaluation (pure) ------------------------------------------------------------------------


def field_value(contact: ContactState, path: str) -> str | None:
    """A contact's value for a field path; None when the attribute is missing."""
    if path.startswith(ATTRIBUTE_PREFIX):
        return contact.attributes.get(path[len(ATTRIBUTE_PREFIX):])
    if path == "email":
        return contact.email
    if path == "first_name":
        return contact.first_name
    return contact.last_name


def evaluate(expr: Criteria, contact: ContactState, now: datetime) -> bool:
    """Whether `contact` matches `expr` at `now` (tz-aware; used only for relative dates)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return _evaluate(expr, contact, now)


def _evaluate(expr: Criteria, contact: ContactState, now: datetime) -> bool:
    if isinstance(expr, All):
        return all(_evaluate(c, contact, now) for c in expr.conditions)
    if isinstance(expr, AnyOf):
        return any(_evaluate(c, contact, now) for c in expr.conditions)
    if isinstance(expr, Not):
        return not _evaluate(expr.condition, contact, now)
    if isinstance(expr, InList):
        return expr.list_id in contact.lists
    value = field_value(contact, expr.field)
    if isinstance(expr, Ne):
        return value != expr.value
    if value is None:
        return False
    if isinstance(expr, Eq):
        return value == expr.value
    if isinstance(expr, In):
        return value in expr.values
    if isinstance(expr, Contains):
        return expr.value in value
    if isinstance(expr, StartsWith):
        return value.startswith(expr.value)
    if isinstance(expr, Exists):
        return bool(value.strip())
    if isinstance(expr, Gt | Gte | Lt | Lte):
        number = _parse_number(value)
        if number is None:
            return False
        if isinstance(expr, Gt):
            return number > expr.value
        if isinstance(expr, Gte):
            return number >= expr.value
        if isinstance(expr, Lt):
            return number < expr.value
        return number <= expr.value
    moment = _parse_moment(value)
    if moment is None:
        return False
    bound = resolve_date(expr.value, now)
    return moment < bound if isinstance(expr, Before) else moment > bound


# --- commands ---------------------------------------------------------------------------------

SegmentName = Annotated[str, StringConstraints(min_length=1, max_length=200)]


@message("DefineSegment", 1)
class DefineSegment(Record):
    """Define a new segment of a tenant's contacts."""

    segment_id: EntityId
    name: SegmentName
    criteria: Criteria

    @model_validator(mode="after")
    def _not_too_deep(self) -> DefineSegment:
        _check_depth(self.criteria)
        return self


@message("ChangeSegment", 1)
class ChangeSegment(Record):
    """Rename a segment, change its criteria, or both."""

    segment_id: EntityId
    name: SegmentName | None = None
    criteria: Criteria | None = None

    @model_validator(mode="after")
    def _changes_something(self) -> ChangeSegment:
        if self.name is None and self.criteria is None:
            raise ValueError("a change needs a name, criteria or both")
        _check_depth(self.criteria)
        return self


@message("DeleteSegment", 1)
class DeleteSegment(Record):
    """Delete a segment; sends already hydrated are not affected."""

    segment_id: EntityId


# --- events -----------------------------------------------------------------------------------


@message("SegmentDefined", 1)
class SegmentDefined(Record):
    segment_id: EntityId
    name: SegmentName
    criteria: Criteria


@message("SegmentChanged", 1)
class SegmentChanged(Record):
    """The segment's whole definition after the change."""

    segment_id: EntityId
    name: SegmentName
    criteria: Criteria


@message("SegmentDeleted", 1)
class SegmentDeleted(Record):
    segment_id: EntityId


SegmentCommand = DefineSegment | ChangeSegment | DeleteSegment
SegmentEvent = SegmentDefined | SegmentChanged | SegmentDeleted


# --- aggregate (pure) -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Segment:
    segment_id: str
    name: str
    criteria: Criteria
    deleted: bool = False


class SegmentRejected(Exception):
    """A segment command refused, with the reason."""


def decide_segment(state: Segment | None, command: SegmentCommand) -> list[SegmentEvent]:
    """Events for a command on the segment in `state`; raises SegmentRejected."""
    exists = state is not None and not state.deleted
    if isinstance(command, DefineSegment):
        if exists:
            raise SegmentRejected(f"segment {command.segment_id!r} already exists")
        return [SegmentDefined(segment_id=command.segment_id, name=command.name, criteria=command.criteria)]
    if state is None or not exists:
        raise SegmentRejected(f"segment {command.segment_id!r} does not exist")
    if isinstance(command, ChangeSegment):
        name = command.name if command.name is not None else state.name
        criteria = command.criteria if command.criteria is not None else state.criteria
        if name == state.name and criteria == state.criteria:
            return []
        return [SegmentChanged(segment_id=command.segment_id, name=name, criteria=criteria)]
    return [SegmentDeleted(segment_id=command.segment_id)]


def evolve_segment(state: Segment | None, event: SegmentEvent) -> Segment | None:
    """The segment after an event."""
    if isinstance(event, SegmentDefined | SegmentChanged):
        return Segment(event.segment_id, event.name, event.criteria)
    if state is None:
        return None
    return Segment(state.segment_id, state.name, state.criteria, deleted=True)


def fold_segment(events: Iterable[SegmentEvent]) -> Segment | None:
    state: Segment | None = None
    for event in events:
        state = evolve_segment(state, event)
    return state
