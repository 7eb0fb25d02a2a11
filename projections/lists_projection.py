"""The `lists` read model: each contact list as segments.events leave it (ListCreated,
ListRenamed, ListDeleted; schemas/lists.py), written inside the projector's batch transaction.

Guarantee: called from `projections.batch_writer.apply` with a batch's list events in
consumption order, inside the transaction that also stores the consumer positions, the rows
are exactly-once like the rest of the read models and rebuildable from offset zero. One
partition carries every event of a list, so the last event of a list in the batch is its
latest: its row holds that name and deleted flag; `created_at` is the ListCreated's time
(kept from the stored row when the batch only renames or deletes). A rename or delete of a
list with no row (which the command handler never decides) writes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from schemas.lists import ListCreated, ListDeleted, ListEvent

_CREATE = """
INSERT INTO lists AS l (tenant_id, list_id, name, deleted, created_at, changed_at)
SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::boolean[], %b::timestamptz[],
                     %b::timestamptz[])
ORDER BY 1, 2
ON CONFLICT (tenant_id, list_id) DO UPDATE
SET name = EXCLUDED.name, deleted = EXCLUDED.deleted, created_at = EXCLUDED.created_at,
    changed_at = EXCLUDED.changed_at
"""

_CHANGE = """
UPDATE lists AS l SET name = coalesce(k.name, l.name), deleted = k.deleted, changed_at = k.at
FROM unnest(%b::text[], %b::text[], %b::text[], %b::boolean[], %b::timestamptz[])
     AS k(tenant_id, list_id, name, deleted, at)
WHERE l.tenant_id = k.tenant_id AND l.list_id = k.list_id
"""


def write_lists(cur: psycopg.Cursor[Any], events: Sequence[tuple[str, ListEvent, datetime]]) -> None:
    """Store (tenant id, event, occurred at) of segments.events' list events, in order."""
    final: dict[tuple[str, str], _Final] = {}
    for tenant, event, at in events:
        key = (tenant, event.list_id)
        row = final.setdefault(key, _Final(changed_at=at))
        row.changed_at = at
        if isinstance(event, ListCreated):
            row.name, row.deleted, row.created_at = _text(event.name), False, at
        elif isinstance(event, ListDeleted):
            row.deleted = True
        else:
            row.name = _text(event.name)
    created = [(k, v) for k, v in sorted(final.items()) if v.created_at is not None]
    changed = [(k, v) for k, v in sorted(final.items()) if v.created_at is None]
    if created:
        cur.execute(_CREATE, (
            [k[0] for k, _ in created], [k[1] for k, _ in created], [v.name for _, v in created],
            [v.deleted for _, v in created], [v.created_at for _, v in created],
            [v.changed_at for _, v in created]))
    if changed:
        cur.execute(_CHANGE, (
            [k[0] for k, _ in changed], [k[1] for k, _ in changed], [v.name for _, v in changed],
            [v.deleted for _, v in changed], [v.changed_at for _, v in changed]))


@dataclass(slots=True)
class _Final:
    """A list after the batch: its name (None: unchanged), deleted, when it was created in
    this batch (None: earlier) and its last event's time."""

    changed_at: datetime
    name: str | None = None
    deleted: bool = False
    created_at: datetime | None = None


def _text(value: str) -> str:
    return value.replace("\x00", "\ufffd")  # PostgreSQL text cannot hold NUL
