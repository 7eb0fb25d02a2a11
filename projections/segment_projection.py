"""The read models behind per-segment counts: segment definitions (segments.events) and the
contact fields criteria read (contacts.events), written inside the projector's batch
transaction.

Guarantee: called from `projections.batch_writer.apply` with a batch's events, in consumption
order, inside the transaction that also stores the consumer positions, these writes are
exactly-once like the rest of the read models, and rebuildable from offset zero:
- `segments` holds each segment as `schemas.segments.evolve_segment` leaves it (a deleted one
  kept, flagged), the last event of a segment in the batch winning (one partition carries
  every event of a segment, so "last" is its latest);
- `contact_profiles` holds e-mail, names, attributes and the deleted flag of every contact,
  folded by `schemas.contacts.apply_contact_event` from the stored profile, so a profile row
  exists exactly when a `contacts` row does. NUL, which PostgreSQL text cannot hold, is stored
  as U+FFFD (segment counts read the stored value; projections/read_models.py does the same
  for names and reasons).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from schemas.contacts import ContactEvent, ContactState, fold_contact
from schemas.segments import SegmentChanged, SegmentDefined, SegmentDeleted, SegmentEvent

ContactKey = tuple[str, str]  # (tenant_id, contact_id)


def _text(value: str) -> str:
    return value.replace("\x00", "\ufffd")


def _criteria_json(event: SegmentDefined | SegmentChanged) -> str:
    # JSON text escapes NUL as \u0000, which a text column keeps (jsonb would refuse it).
    return event.criteria.model_dump_json()


_UPSERT_SEGMENTS = """
INSERT INTO segments AS s (tenant_id, segment_id, name, criteria, deleted, defined_at, changed_at)
SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::boolean[],
                     %b::timestamptz[], %b::timestamptz[])
ORDER BY 1, 2
ON CONFLICT (tenant_id, segment_id) DO UPDATE
SET name = EXCLUDED.name, criteria = EXCLUDED.criteria, deleted = EXCLUDED.deleted,
    changed_at = EXCLUDED.changed_at
"""

# A SegmentDefined is always a (re)definition (the aggregate refuses it on a live segment), so
# its time replaces defined_at; a batch with changes only keeps the stored one.
_REDEFINED = """
UPDATE segments SET defined_at = k.at
FROM unnest(%b::text[], %b::text[], %b::timestamptz[]) AS k(tenant_id, segment_id, at)
WHERE segments.tenant_id = k.tenant_id AND segments.segment_id = k.segment_id
"""

_DELETE_SEGMENTS = """
UPDATE segments SET deleted = true, changed_at = k.at
FROM unnest(%b::text[], %b::text[], %b::timestamptz[]) AS k(tenant_id, segment_id, at)
WHERE segments.tenant_id = k.tenant_id AND segments.segment_id = k.segment_id
"""


def write_segments(
    cur: psycopg.Cursor[Any], events: Sequence[tuple[str, SegmentEvent, datetime]]
) -> None:
    """Store (tenant id, event, occurred at) of segments.events, in consumption order."""
    # Per segment: its latest definition in this batch (None: only deleted here), whether it
    # ends deleted, when it was (re)defined in this batch, and its last event's time.
    final: dict[tuple[str, str], tuple[SegmentDefined | SegmentChanged | None, bool,
                                       datetime | None, datetime]] = {}
    for tenant, event, at in events:
        key = (tenant, event.segment_id)
        definition, _, defined, _ = final.get(key, (None, False, None, at))
        if isinstance(event, SegmentDeleted):
            final[key] = (definition, True, defined, at)
        else:
            final[key] = (event, False, at if isinstance(event, SegmentDefined) else defined, at)
    upserts = [(key, d, gone, defined, at)
               for key, (d, gone, defined, at) in sorted(final.items()) if d is not None]
    deletes = [(key, at) for key, (d, _, _, at) in sorted(final.items()) if d is None]
    if upserts:
        cur.execute(_UPSERT_SEGMENTS, (
            [k[0] for k, *_ in upserts], [k[1] for k, *_ in upserts],
            [_text(d.name) for _, d, *_ in upserts], [_criteria_json(d) for _, d, *_ in upserts],
            [gone for _, _, gone, _, _ in upserts],
            [defined or at for *_, defined, at in upserts], [at for *_, at in upserts],
        ))
        redefined = [(key, defined) for key, _, _, defined, _ in upserts if defined is not None]
        if redefined:
            cur.execute(_REDEFINED, ([k[0] for k, _ in redefined], [k[1] for k, _ in redefined],
                                     [at for _, at in redefined]))
    if deletes:
        cur.execute(_DELETE_SEGMENTS, (
            [k[0] for k, _ in deletes], [k[1] for k, _ in deletes], [at for _, at in deletes]))


_LOAD_PROFILES = """
SELECT p.tenant_id, p.contact_id, p.email, p.first_name, p.last_name, p.attributes, p.deleted
FROM contact_profiles p
JOIN unnest(%b::text[], %b::text[]) AS k(tenant_id, contact_id) USING (tenant_id, contact_id)
"""

_UPSERT_PROFILES = """
INSERT INTO contact_profiles AS p
    (tenant_id, contact_id, email, first_name, last_name, attributes, deleted)
SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::jsonb[],
                     %b::boolean[])
ORDER BY 1, 2
ON CONFLICT (tenant_id, contact_id) DO UPDATE
SET email = EXCLUDED.email, first_name = EXCLUDED.first_name, last_name = EXCLUDED.last_name,
    attributes = EXCLUDED.attributes, deleted = EXCLUDED.deleted
"""


def write_profiles(
    cur: psycopg.Cursor[Any], contacts: Mapping[ContactKey, Sequence[ContactEvent]]
) -> None:
    """Fold each touched contact's events (in order) over its stored profile; store it."""
    if not contacts:
        return
    keys = sorted(contacts)
    cur.execute(_LOAD_PROFILES, ([t for t, _ in keys], [c for _, c in keys]))
    states: dict[ContactKey, ContactState | None] = {}
    for tenant, contact, email, first, last, attributes, deleted in cur.fetchall():
        states[(tenant, contact)] = profile_state(contact, email, first, last, attributes,
                                                  deleted)
    for key in keys:
        states[key] = fold_contact(contacts[key], states.get(key))
    store_profiles(cur, states)


def profile_state(contact_id: str, email: str, first_name: str, last_name: str,
                  attributes: Mapping[str, str], deleted: bool) -> ContactState:
    """A stored profile row as the state the fold starts from."""
    return ContactState(contact_id, email, first_name, last_name, attributes=dict(attributes),
                        deleted=deleted)


def store_profiles(cur: psycopg.Cursor[Any],
                   states: Mapping[ContactKey, ContactState | None]) -> None:
    """Store folded profiles (None: the contact does not exist, nothing is written)."""
    kept = [(key, s) for key, s in sorted(states.items()) if s is not None]
    if not kept:
        return
    cur.execute(_UPSERT_PROFILES, (
        [t for (t, _), _ in kept], [c for (_, c), _ in kept],
        [_text(s.email) for _, s in kept], [_text(s.first_name) for _, s in kept],
        [_text(s.last_name) for _, s in kept],
        [Jsonb({_text(k): _text(v) for k, v in s.attributes.items()}) for _, s in kept],
        [s.deleted for _, s in kept],
    ))
