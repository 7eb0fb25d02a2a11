"""The console's audience picker: what a person may choose, and how many recipients it reaches.

Guarantees:
- `AudienceChoice` holds exactly the fields of SendCampaign's audience (hand-picked contact
  ids, lists, segments, exclusion lists and segments), each id checked as an EntityId; bad
  ids are reported by name, never sent.
- `estimate` counts, within the caller's one snapshot of the read models, the distinct
  contacts the choice names, split by the reason the hydrator would leave each one out
  (deleted, suppressed, unsubscribed, excluded_list, excluded_segment) or `mailable`. Rows
  SQL decides are counted in SQL (projections/segment_sql.py's three-valued predicates); the
  rest are resolved by the hydrator's own `resolve_audience`, so each contact is judged by
  the same rules as at send time. It stays an estimate: the hydrator resolves its own
  replicas when sending starts (contacts changed or added meanwhile, read-model lag).
- Read-only: it never writes a read model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import psycopg
from psycopg import sql
from pydantic import TypeAdapter, ValidationError

from projections.segment_counts import (
    FALLBACK_FETCH_ROWS,
    CountsUnavailable,
    SegmentDefinition,
    contact_state_of,
    segment_definitions,
)
from projections.segment_sql import compile_criteria
from schemas.base import EntityId
from schemas.events import Audience, AudienceSegment
from services.hydrator.audience import EXCLUDED_BY_LIST, EXCLUDED_BY_SEGMENT, resolve_audience, to_stored

_ENTITY_ID: TypeAdapter[str] = TypeAdapter(EntityId)
# The form fields of a choice, in SendCampaign's names.
FIELDS = ("contact_ids", "list_ids", "segment_ids", "exclude_list_ids", "exclude_segment_ids")
# Reasons in the hydrator's order of precedence, then the contacts that would be mailed.
REASONS = ("deleted", "suppressed", "unsubscribed", EXCLUDED_BY_LIST, EXCLUDED_BY_SEGMENT)
MAILABLE = "mailable"
_UNDECIDED = "undecided"


def split_ids(values: Iterable[str]) -> list[str]:
    """Ids from form values: each value may hold several, separated by commas or spaces."""
    return [part for value in values for part in value.replace(",", " ").split() if part]


@dataclass(frozen=True, slots=True)
class AudienceChoice:
    contact_ids: tuple[str, ...] = ()
    list_ids: tuple[str, ...] = ()
    segment_ids: tuple[str, ...] = ()
    exclude_list_ids: tuple[str, ...] = ()
    exclude_segment_ids: tuple[str, ...] = ()
    faults: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_values(cls, values_of: Callable[[str], list[str]]) -> AudienceChoice:
        """The choice in a form or query string (`values_of(name)`: every value of a field),
        each id once in the order given; ids that are no EntityId go to `faults`."""
        chosen: dict[str, tuple[str, ...]] = {}
        faults: list[str] = []
        for name in FIELDS:
            good: list[str] = []
            for value in split_ids(values_of(name)):
                try:
                    good.append(_ENTITY_ID.validate_python(value))
                except ValidationError:
                    faults.append(f"{name}: {value[:80]!r} is not a valid id")
            chosen[name] = tuple(dict.fromkeys(good))
        return cls(**chosen, faults=tuple(faults))

    @property
    def empty(self) -> bool:
        """Nobody is named (exclusions alone reach nobody)."""
        return not (self.contact_ids or self.list_ids or self.segment_ids)

    def send_payload(self) -> dict[str, list[str]]:
        """SendCampaign's payload for this choice."""
        return {name: list(getattr(self, name)) for name in FIELDS}

    def query(self) -> str:
        """The choice as a query string (repeated fields), to carry it between pages."""
        return urlencode([(name, value) for name in FIELDS for value in getattr(self, name)])


@dataclass(frozen=True, slots=True)
class AudienceEstimate:
    """Distinct contacts a choice reaches now, by outcome (MAILABLE or one of REASONS);
    `unknown_contact_ids`: hand-picked ids that name no contact of the tenant;
    `unknown_segments`: chosen segment ids that name no live segment (the command handler
    would reject the send); `evaluated_in_python`: contacts SQL could not decide."""

    outcomes: dict[str, int]
    unknown_contact_ids: int
    unknown_segments: tuple[str, ...]
    evaluated_in_python: int
    as_of: datetime

    @property
    def mailable(self) -> int:
        return self.outcomes.get(MAILABLE, 0)

    @property
    def reached(self) -> int:
        return sum(self.outcomes.values())


# Each contact the choice may reach, with its outcome in SQL ('undecided': left to Python).
# OFFSET 0 keeps PostgreSQL from flattening the sub-select, which would evaluate the
# predicates once per CASE branch instead of once per contact.
_OUTCOMES = """
SELECT x.contact_id,
       CASE
         WHEN x.reach IS NULL THEN 'undecided'
         WHEN x.deleted THEN 'deleted'
         WHEN x.suppressed_reason IS NOT NULL THEN 'suppressed'
         WHEN x.globally_unsubscribed OR x.left_every_list THEN 'unsubscribed'
         WHEN x.in_excluded_list THEN 'excluded_list'
         WHEN x.in_excluded_segment IS NULL THEN 'undecided'
         WHEN x.in_excluded_segment THEN 'excluded_segment'
         ELSE 'mailable'
       END AS outcome
FROM (SELECT c.contact_id, c.deleted, c.suppressed_reason, c.globally_unsubscribed,
             {reach} AS reach,
             -- reached through some chosen lists and unsubscribed from every one of them
             (ml.lists && {lists} AND NOT EXISTS (SELECT 1 FROM unnest(ml.lists) l
                 WHERE l = ANY({lists}) AND NOT l = ANY(c.unsubscribed_lists))) AS left_every_list,
             ml.lists && {excluded_lists} AS in_excluded_list,
             {excluded} AS in_excluded_segment
      FROM contacts c
      LEFT JOIN contact_profiles p ON p.tenant_id = c.tenant_id AND p.contact_id = c.contact_id
      -- the contact's lists read once, not once per test below
      CROSS JOIN LATERAL (SELECT COALESCE(array_agg(m.list_id), '{{}}') AS lists
                          FROM contact_list_members m
                          WHERE m.tenant_id = c.tenant_id AND m.contact_id = c.contact_id) ml
      WHERE c.tenant_id = {tenant} AND {reach} IS NOT FALSE
      OFFSET 0) x
"""
_TALLY = sql.SQL("SELECT outcome, count(*) FROM (" + _OUTCOMES + ") o GROUP BY outcome")
_UNDECIDED_ROWS = sql.SQL("""
SELECT c.contact_id, p.email, p.first_name, p.last_name, p.attributes,
       ARRAY(SELECT m.list_id FROM contact_list_members m
             WHERE m.tenant_id = c.tenant_id AND m.contact_id = c.contact_id),
       c.deleted, c.globally_unsubscribed, c.suppressed_reason, c.unsubscribed_lists
FROM (""" + _OUTCOMES + """) o
JOIN contacts c ON c.tenant_id = {tenant} AND c.contact_id = o.contact_id
JOIN contact_profiles p ON p.tenant_id = c.tenant_id AND p.contact_id = c.contact_id
WHERE o.outcome = 'undecided'
""")


def _any_of(predicates: list[sql.Composable]) -> sql.Composable:
    return sql.SQL("({})").format(sql.SQL(" OR ").join(predicates)) if predicates else sql.SQL("false")


def _text_array(values: Iterable[str]) -> sql.Composable:
    return sql.SQL("{}::text[]").format(sql.Literal(list(values)))


def estimate(conn: psycopg.Connection[Any], tenant_id: str, choice: AudienceChoice,
             now: datetime) -> AudienceEstimate:
    """How many of the tenant's contacts `choice` reaches at `now`, by outcome (see the
    module's guarantee). Run it in one snapshot (the API's `tenant_snapshot`). Raises
    CountsUnavailable when a contact SQL cannot decide has no profile in the read models."""
    known = {d.segment_id: d for d in segment_definitions(conn, tenant_id)}
    named = [*choice.segment_ids, *choice.exclude_segment_ids]
    unknown_segments = tuple(dict.fromkeys(s for s in named if s not in known))
    segments = [known[s] for s in choice.segment_ids if s in known]
    excluded_segments = [known[s] for s in choice.exclude_segment_ids if s in known]
    lists = _text_array(choice.list_ids)
    reach = _any_of([
        sql.SQL("c.contact_id = ANY({})").format(_text_array(choice.contact_ids)),
        sql.SQL("ml.lists && {}").format(lists),
        *(compile_criteria(s.criteria, now) for s in segments),
    ])
    excluded = _any_of([compile_criteria(s.criteria, now) for s in excluded_segments])
    parts = {"reach": reach, "lists": lists, "excluded_lists": _text_array(choice.exclude_list_ids),
             "excluded": excluded, "tenant": sql.Literal(tenant_id)}
    outcomes = dict.fromkeys((MAILABLE, *REASONS), 0)
    undecided = 0
    if segments or excluded_segments:
        _require_profiles(conn, tenant_id)
    if not choice.empty:
        for outcome, count in conn.execute(_TALLY.format(**parts)).fetchall():
            if outcome == _UNDECIDED:
                undecided = int(count)
            else:
                outcomes[outcome] += int(count)
        if undecided:
            for outcome, count in _resolve_undecided(conn, tenant_id, choice, segments,
                                                     excluded_segments, parts, now).items():
                outcomes[outcome] += count
    return AudienceEstimate(outcomes, _unknown_ids(conn, tenant_id, choice.contact_ids),
                            unknown_segments, undecided, now)


def _resolve_undecided(conn: psycopg.Connection[Any], tenant_id: str, choice: AudienceChoice,
                       segments: list[SegmentDefinition], excluded_segments: list[SegmentDefinition],
                       parts: dict[str, sql.Composable], now: datetime) -> dict[str, int]:
    """The outcomes of the rows SQL left undecided, by the hydrator's own resolution."""
    audience = Audience(
        contact_ids=list(choice.contact_ids), list_ids=list(choice.list_ids),
        segments=[AudienceSegment(segment_id=s.segment_id, criteria=s.criteria) for s in segments],
        exclude_list_ids=list(choice.exclude_list_ids),
        exclude_segments=[AudienceSegment(segment_id=s.segment_id, criteria=s.criteria)
                          for s in excluded_segments])
    tally: dict[str, int] = {}
    with conn.cursor(name="console_audience_undecided") as cur:
        cur.itersize = FALLBACK_FETCH_ROWS
        cur.execute(_UNDECIDED_ROWS.format(**parts))
        # One partition, every contact known before the snapshot: the whole tenant at once.
        stored = ((f"{tenant_id}:{row[0]}", to_stored(contact_state_of(row), partition=0, first_offset=0))
                  for row in cur)
        for _, _, reason in resolve_audience(stored, tenant_id=tenant_id, partition=0,
                                             audience=audience, snapshot_offset=1, now=now):
            outcome = MAILABLE if reason is None else reason.split(":")[0]
            tally[outcome] = tally.get(outcome, 0) + 1
    return tally


def _require_profiles(conn: psycopg.Connection[Any], tenant_id: str) -> None:
    # Segment criteria read the profile: without it a contact's match cannot be decided.
    row = conn.execute("SELECT count(*) FROM contacts c WHERE c.tenant_id = %s AND NOT EXISTS"
                       " (SELECT 1 FROM contact_profiles p WHERE p.tenant_id = c.tenant_id"
                       " AND p.contact_id = c.contact_id)", (tenant_id,)).fetchone()
    if row and row[0]:
        raise CountsUnavailable(
            f"{row[0]} contacts of tenant {tenant_id!r} have no profile in the read models"
            " (projected before segment counts existed): rebuild the projections")


def _unknown_ids(conn: psycopg.Connection[Any], tenant_id: str, contact_ids: tuple[str, ...]) -> int:
    if not contact_ids:
        return 0
    row = conn.execute("SELECT count(*) FROM contacts WHERE tenant_id = %s AND contact_id = ANY(%s)",
                       (tenant_id, list(contact_ids))).fetchone()
    return len(contact_ids) - (int(row[0]) if row else 0)


@dataclass(frozen=True, slots=True)
class ListMember:
    contact_id: str
    email: str
    first_name: str
    last_name: str
    mailable: bool


def list_members(conn: psycopg.Connection[Any], tenant_id: str, list_id: str, *,
                 after: str | None, limit: int) -> tuple[list[ListMember], bool]:
    """Up to `limit` members of a list ordered by contact id after `after`, and whether more
    follow; `mailable` as analyst_list_counts counts it for this list."""
    rows = conn.execute(
        "SELECT m.contact_id, COALESCE(p.email, ''), COALESCE(p.first_name, ''),"
        " COALESCE(p.last_name, ''),"
        " NOT (COALESCE(c.deleted, false) OR COALESCE(c.globally_unsubscribed, false)"
        "      OR c.suppressed_reason IS NOT NULL OR m.list_id = ANY(COALESCE(c.unsubscribed_lists, '{}')))"
        " FROM contact_list_members m"
        " LEFT JOIN contacts c ON c.tenant_id = m.tenant_id AND c.contact_id = m.contact_id"
        " LEFT JOIN contact_profiles p ON p.tenant_id = m.tenant_id AND p.contact_id = m.contact_id"
        " WHERE m.tenant_id = %s AND m.list_id = %s AND (%s::text IS NULL OR m.contact_id > %s)"
        " ORDER BY m.contact_id LIMIT %s",
        (tenant_id, list_id, after, after, limit + 1)).fetchall()
    return [ListMember(*row) for row in rows[:limit]], len(rows) > limit
