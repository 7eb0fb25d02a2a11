"""Per-segment counts: how many of a tenant's contacts match each segment now, and how many
of those may be mailed.

Guarantee: `segment_counts` equals, for every segment, what `schemas.segments.evaluate` and
`schemas.contacts.exclusion_reason` give over the tenant's contacts as the read models hold
them, within one snapshot. Contacts the SQL predicate cannot decide (projections/segment_sql.py)
are streamed and evaluated in Python; if the read models lack a contact's profile (rows
projected before migration 0007 and not rebuilt since), the count is refused with
CountsUnavailable rather than guessed. Reads only the given tenant's rows (explicit filter;
row-level security adds its own for analyst logins). Run it inside one transaction
(`tenant_transaction` / the API's `tenant_snapshot`) so every figure comes from one snapshot.

The categories follow exclusion_reason's precedence for a send that targets the segment (no
list ids): deleted, then suppressed, then (globally) unsubscribed; a list-scoped unsubscribe
does not make a contact unmailable for a segment send. matching = mailable + unsubscribed +
suppressed + deleted. Deleted contacts are evaluated as their emptied state, as the hydrator
does, so a negated condition can match them; they are counted, never mailable.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from projections.segment_sql import compile_criteria
from schemas.contacts import ContactState, exclusion_reason
from schemas.segments import Criteria, InvalidCriteria, evaluate, parse_criteria

# Rows fetched per round trip when undecided contacts are evaluated in Python.
FALLBACK_FETCH_ROWS = 2_000


class CountsUnavailable(RuntimeError):
    """The read models cannot give an exact count; the message says why."""


@dataclass(frozen=True, slots=True)
class SegmentDefinition:
    segment_id: str
    name: str
    criteria: Criteria
    defined_at: datetime
    changed_at: datetime


@dataclass(frozen=True, slots=True)
class SegmentCounts:
    """Contacts matching a segment now; `evaluated_in_python` of them (matching or not) were
    decided by the Python fallback rather than by SQL."""

    segment_id: str
    name: str
    matching: int
    mailable: int
    unsubscribed: int
    suppressed: int
    deleted: int
    evaluated_in_python: int
    as_of: datetime


def segment_definitions(
    conn: psycopg.Connection[Any], tenant_id: str, segment_id: str | None = None
) -> list[SegmentDefinition]:
    """The tenant's live (not deleted) segments, by id; one when `segment_id` is given."""
    rows = conn.execute(
        "SELECT segment_id, name, criteria::text, defined_at, changed_at FROM segments"
        " WHERE tenant_id = %s AND NOT deleted AND (%s::text IS NULL OR segment_id = %s)"
        " ORDER BY segment_id",
        (tenant_id, segment_id, segment_id),
    ).fetchall()
    found = []
    for sid, name, criteria, defined_at, changed_at in rows:
        try:
            parsed = parse_criteria(json.loads(criteria))
        except (InvalidCriteria, ValueError) as exc:  # stored by the projector: never expected
            raise CountsUnavailable(f"segment {sid!r} holds unreadable criteria: {exc}") from None
        found.append(SegmentDefinition(sid, name, parsed, defined_at, changed_at))
    return found


# OFFSET 0 keeps the sub-select from being flattened: otherwise PostgreSQL substitutes the
# predicate into every FILTER below and evaluates it once per count, not once per contact.
_TALLY = sql.SQL("""
SELECT count(*) FILTER (WHERE x.hit),
       count(*) FILTER (WHERE x.hit AND x.deleted),
       count(*) FILTER (WHERE x.hit AND NOT x.deleted AND x.suppressed_reason IS NOT NULL),
       count(*) FILTER (WHERE x.hit AND NOT x.deleted AND x.suppressed_reason IS NULL
                          AND x.globally_unsubscribed),
       count(*) FILTER (WHERE x.hit IS NULL AND x.profiled),
       count(*) FILTER (WHERE NOT x.profiled)
FROM (SELECT c.deleted, c.suppressed_reason, c.globally_unsubscribed,
             p.contact_id IS NOT NULL AS profiled, {predicate} AS hit
      FROM contacts c
      LEFT JOIN contact_profiles p ON p.tenant_id = c.tenant_id AND p.contact_id = c.contact_id
      WHERE c.tenant_id = %s
      OFFSET 0) x
""")

_UNDECIDED = sql.SQL("""
SELECT c.contact_id, p.email, p.first_name, p.last_name, p.attributes,
       ARRAY(SELECT m.list_id FROM contact_list_members m
             WHERE m.tenant_id = c.tenant_id AND m.contact_id = c.contact_id),
       c.deleted, c.globally_unsubscribed, c.suppressed_reason, c.unsubscribed_lists
FROM contacts c
JOIN contact_profiles p ON p.tenant_id = c.tenant_id AND p.contact_id = c.contact_id
WHERE c.tenant_id = %s AND ({predicate}) IS NULL
""")


def contact_state_of(row: tuple[Any, ...]) -> ContactState:
    """The contact of one row of the undecided-contacts query (contacts joined with profiles)."""
    contact_id, email, first, last, attributes, lists, deleted, unsub, suppressed, unsub_lists = row
    return ContactState(
        contact_id, email, first, last, attributes=dict(attributes), lists=frozenset(lists),
        unsubscribed_lists=frozenset(unsub_lists), globally_unsubscribed=unsub,
        suppressed_reason=suppressed, deleted=deleted,
    )


def _python_tally(states: Iterable[ContactState], criteria: Criteria, now: datetime) -> list[int]:
    """[matching, deleted, suppressed, unsubscribed] among `states`, by evaluation in Python."""
    tally = [0, 0, 0, 0]
    for state in states:
        if not evaluate(criteria, state, now):
            continue
        tally[0] += 1
        reason = exclusion_reason(state)
        if reason == "deleted":
            tally[1] += 1
        elif reason is not None and reason.startswith("suppressed"):
            tally[2] += 1
        elif reason == "unsubscribed":
            tally[3] += 1
    return tally


def count_segment(
    conn: psycopg.Connection[Any], tenant_id: str, segment: SegmentDefinition, now: datetime
) -> SegmentCounts:
    """One segment's counts at `now` (the moment relative dates are read against)."""
    predicate = compile_criteria(segment.criteria, now)
    row = conn.execute(_TALLY.format(predicate=predicate), (tenant_id,)).fetchone()
    assert row is not None  # an aggregate without GROUP BY always returns one row
    matching, deleted, suppressed, unsubscribed, undecided, unprofiled = row
    if unprofiled:
        raise CountsUnavailable(
            f"{unprofiled} contacts of tenant {tenant_id!r} have no profile in the read models"
            " (projected before segment counts existed): rebuild the projections")
    if undecided:
        with conn.cursor(name=f"undecided_{segment.segment_id[:40]}") as cur:
            cur.itersize = FALLBACK_FETCH_ROWS
            cur.execute(_UNDECIDED.format(predicate=predicate), (tenant_id,))
            extra = _python_tally((contact_state_of(r) for r in cur), segment.criteria, now)
        matching, deleted, suppressed, unsubscribed = (
            a + b for a, b in zip((matching, deleted, suppressed, unsubscribed), extra, strict=True))
    return SegmentCounts(
        segment_id=segment.segment_id, name=segment.name, matching=matching,
        mailable=matching - deleted - suppressed - unsubscribed, unsubscribed=unsubscribed,
        suppressed=suppressed, deleted=deleted, evaluated_in_python=undecided, as_of=now,
    )


def segment_counts(
    conn: psycopg.Connection[Any], tenant_id: str, now: datetime, segment_id: str | None = None
) -> list[SegmentCounts]:
    """Counts for each live segment of the tenant (or the one named), by segment id."""
    return [count_segment(conn, tenant_id, s, now)
            for s in segment_definitions(conn, tenant_id, segment_id)]
