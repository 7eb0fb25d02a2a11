"""Writes a planned batch (projections.read_models.BatchChanges) in set-based SQL.

Guarantee: inside the caller's transaction, a fixed number of statements per batch whatever its
size. Recipients take one path: a binary COPY into a temporary staging table, then one
statement that looks up and locks their rows, updates the ones whose status climbs, inserts the
new ones, and from the returned transitions (previous status -> new status) moves the campaign
counters, the per-tenant daily sends and the per-second throughput, so a counter moves exactly
when a row does.

Lock order, the same in every transaction (so the projector's lanes, which write the same
campaigns concurrently, and two instances during a rebalance cannot deadlock): first contact,
list-membership and segment rows (in key order; only the main lane writes them), then every
campaign row of the batch, in campaign id order, then recipient rows in key order, then the
per-tenant and per-campaign counter rows. Since a recipient row is only written under its
campaign's lock, two transactions never race to insert the same recipient: the second one
waits for the first to end and then finds its row.

Array parameters are sent in binary (`%b`): psycopg's text array dumper quotes every element in
Python, about three times the CPU.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import psycopg

from projections import erase, lists_projection, segment_projection
from projections.read_models import BatchChanges, ContactKey, RecipientRow
from schemas.contacts import ContactState, fold_contact

# Ensure a row per campaign of the batch (an insert racing ours waits for it, then does
# nothing).
_ENSURE_CAMPAIGNS = """
INSERT INTO campaigns (tenant_id, campaign_id)
SELECT * FROM unnest(%b::text[], %b::text[]) AS b(tenant_id, campaign_id) ORDER BY campaign_id
ON CONFLICT (campaign_id) DO NOTHING
"""

# Then lock them all, in campaign id order (the sort runs below the row locking, so the locks
# are taken in this order), and name their owners. A separate statement: its snapshot sees the
# rows a concurrent transaction inserted while the one above waited for it.
_LOCK_CAMPAIGNS = """
SELECT campaign_id, tenant_id FROM campaigns WHERE campaign_id = ANY(%b::text[])
ORDER BY campaign_id FOR UPDATE
"""

# Facts that happen once keep their first value (COALESCE); pause state takes the batch's;
# an edit (CampaignUpdated) replaces name and subject.
_CAMPAIGN_FACTS = """
UPDATE campaigns AS c
SET name = COALESCE(u.edited_name, c.name, u.name),
    subject = COALESCE(u.edited_subject, c.subject, u.subject),
    created_at = COALESCE(c.created_at, u.created_at),
    started_at = COALESCE(c.started_at, u.started_at),
    total = COALESCE(c.total, u.total),
    hydrated_at = COALESCE(c.hydrated_at, u.hydrated_at),
    unknown_contact_ids = COALESCE(c.unknown_contact_ids, u.unknown_contact_ids::jsonb),
    unknown_contact_count = COALESCE(c.unknown_contact_count, u.unknown_contact_count),
    cancelled_at = COALESCE(c.cancelled_at, u.cancelled_at),
    paused = COALESCE(u.paused, c.paused),
    paused_at = COALESCE(u.paused_at, c.paused_at),
    resumed_at = COALESCE(u.resumed_at, c.resumed_at),
    pause_reason = CASE WHEN u.paused_at IS NULL THEN c.pause_reason ELSE u.pause_reason END,
    paused_automatically = COALESCE(u.paused_automatically, c.paused_automatically),
    scheduled_for = COALESCE(c.scheduled_for, u.scheduled_for),
    schedule_missed_reason = CASE WHEN c.schedule_missed_at IS NULL
                                  THEN u.schedule_missed_reason
                                  ELSE c.schedule_missed_reason END,
    schedule_missed_at = COALESCE(c.schedule_missed_at, u.schedule_missed_at),
    updated_at = now()
FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::timestamptz[],
            %b::timestamptz[], %b::bigint[], %b::timestamptz[], %b::timestamptz[],
            %b::boolean[], %b::timestamptz[], %b::timestamptz[], %b::text[], %b::boolean[],
            %b::timestamptz[], %b::timestamptz[], %b::text[], %b::text[], %b::bigint[],
            %b::text[], %b::text[])
     AS u(tenant_id, campaign_id, name, subject, created_at, started_at, total, hydrated_at,
          cancelled_at, paused, paused_at, resumed_at, pause_reason, paused_automatically,
          scheduled_for, schedule_missed_at, schedule_missed_reason, unknown_contact_ids,
          unknown_contact_count, edited_name, edited_subject)
WHERE c.campaign_id = u.campaign_id AND c.tenant_id = u.tenant_id
"""

_CAMPAIGN_FACT_FIELDS = (
    "tenant_id", "campaign_id", "name", "subject", "created_at", "started_at", "total",
    "hydrated_at", "cancelled_at", "paused", "paused_at", "resumed_at", "pause_reason",
    "paused_automatically", "scheduled_for", "schedule_missed_at", "schedule_missed_reason",
    "unknown_contact_ids", "unknown_contact_count", "edited_name", "edited_subject",
)

_REJECTIONS = """
INSERT INTO command_rejections
    (event_id, tenant_id, campaign_id, command_id, command_type, reason, occurred_at,
     correlation_id)
SELECT * FROM unnest(%b::uuid[], %b::text[], %b::text[], %b::uuid[], %b::text[], %b::text[],
                     %b::timestamptz[], %b::uuid[])
ON CONFLICT (event_id) DO NOTHING
"""

_OUTCOMES = """
INSERT INTO command_outcomes
    (event_id, tenant_id, causation_id, aggregate_id, event_type, occurred_at)
SELECT * FROM unnest(%b::uuid[], %b::text[], %b::uuid[], %b::text[], %b::text[],
                     %b::timestamptz[])
ON CONFLICT (event_id) DO NOTHING
"""

_ATTEMPTS = """
INSERT INTO recipient_attempts
    (event_id, tenant_id, campaign_id, contact_id, attempt, smtp_code, detail, retry_at,
     occurred_at)
SELECT * FROM unnest(%b::uuid[], %b::text[], %b::text[], %b::text[], %b::int[], %b::int[],
                     %b::text[], %b::timestamptz[], %b::timestamptz[])
ON CONFLICT (event_id) DO NOTHING
"""

# The staging table's column types, in _COPY_STAGE's column order (RecipientRow's fields):
# binary COPY with declared types takes psycopg's C dumpers for every value and spares the
# server parsing timestamps.
_STAGE_TYPES = ("text", "text", "text", "text", "text", "int4", "text", "text", "int4", "int4",
                "timestamptz")

# ON COMMIT DELETE ROWS: the staging table is empty at the start of every batch.
_STAGE_TABLE = """
CREATE TEMPORARY TABLE IF NOT EXISTS recipient_stage (
    tenant_id text NOT NULL, campaign_id text NOT NULL, contact_id text NOT NULL,
    email text NOT NULL, status text NOT NULL, attempts integer NOT NULL, last_error text,
    reason text, smtp_code integer, ambiguous integer NOT NULL, event_at timestamptz NOT NULL
) ON COMMIT DELETE ROWS
"""

_COPY_STAGE = """
COPY recipient_stage (tenant_id, campaign_id, contact_id, email, status, attempts, last_error,
                      reason, smtp_code, ambiguous, event_at)
FROM STDIN (FORMAT BINARY)
"""

# The staged recipients into campaign_recipients and their transitions into every counter.
# `look` finds each staged recipient's row (one index probe per row, never a scan, whatever
# the planner thinks of the unanalysed staging table) and locks it, so `prev` is the status
# the row has until this transaction ends, even with another projector instance writing it
# (READ COMMITTED: a lock waits for that writer and then reads its version). Rows that exist
# and climb are updated in place by their tuple id (no second index probe); rows that do not
# exist are plainly inserted, unsorted (nobody else can insert them meanwhile: the campaign's
# row lock is held). The transitions `moved` (previous -> new) are all the counters add: the
# campaign counters, the per-tenant daily sends and the per-second throughput. Staged rows
# arrive in key order, so rows are locked in key order.
_RECIPIENTS = """
WITH look AS MATERIALIZED (
    SELECT s.*, o.row_id, o.status AS prev,
           o.row_id IS NOT NULL AND o.tenant_id = s.tenant_id
           AND o.status IN ('excluded', 'queued', 'retrying')
           AND (CASE s.status WHEN 'excluded' THEN 0 WHEN 'queued' THEN 1
                              WHEN 'retrying' THEN 2 ELSE 3 END
                > CASE o.status WHEN 'excluded' THEN 0 WHEN 'queued' THEN 1
                                WHEN 'retrying' THEN 2 END
                OR (o.status = 'retrying' AND s.status = 'retrying'
                    AND s.attempts > o.attempts)) AS climbs
    FROM recipient_stage AS s
    LEFT JOIN LATERAL (SELECT o.ctid AS row_id, o.tenant_id, o.status, o.attempts
                       FROM campaign_recipients o
                       WHERE o.campaign_id = s.campaign_id AND o.contact_id = s.contact_id
                       FOR UPDATE) o ON true
), updated AS (
    UPDATE campaign_recipients AS r
    SET status = s.status, attempts = s.attempts, last_error = s.last_error, reason = s.reason,
        smtp_code = s.smtp_code, ambiguous = s.ambiguous, last_event_at = s.event_at,
        updated_at = now(), email = CASE WHEN s.email = '' THEN r.email ELSE s.email END
    FROM look s
    -- The tuple-id list makes it a TID scan (the join alone may be planned as a seq scan).
    WHERE r.ctid = ANY (ARRAY(SELECT row_id FROM look WHERE climbs))
      AND r.ctid = s.row_id AND s.climbs
    RETURNING r.tenant_id, r.campaign_id, r.contact_id, r.status, r.ambiguous,
              r.last_event_at, s.prev
), inserted AS (
    INSERT INTO campaign_recipients
        (tenant_id, campaign_id, contact_id, email, status, attempts, last_error, reason,
         smtp_code, ambiguous, last_event_at)
    SELECT tenant_id, campaign_id, contact_id, email, status, attempts, last_error, reason,
           smtp_code, ambiguous, event_at
    FROM look WHERE row_id IS NULL
    RETURNING tenant_id, campaign_id, contact_id, status, ambiguous, last_event_at,
              NULL::text AS prev
), moved AS (
    SELECT * FROM updated UNION ALL SELECT * FROM inserted
), per_second AS (
    -- One pass over the transitions; everything below works on these few rows.
    SELECT tenant_id, campaign_id,
           CASE WHEN status IN ('sent', 'failed', 'skipped')
                THEN date_trunc('second', last_event_at) END AS second,
           count(*) FILTER (WHERE status <> 'excluded'
                              AND (prev IS NULL OR prev = 'excluded')) AS queued,
           count(*) FILTER (WHERE prev IS NULL AND status = 'excluded')
             - count(*) FILTER (WHERE prev = 'excluded') AS excluded,
           count(*) FILTER (WHERE status = 'retrying' AND prev IS DISTINCT FROM 'retrying')
             - count(*) FILTER (WHERE prev = 'retrying' AND status <> 'retrying') AS retrying,
           count(*) FILTER (WHERE status = 'sent') AS sent,
           count(*) FILTER (WHERE status = 'failed') AS failed,
           count(*) FILTER (WHERE status = 'skipped') AS skipped,
           coalesce(sum(ambiguous) FILTER (WHERE status IN ('sent', 'failed')), 0) AS ambiguous,
           max(last_event_at) FILTER (WHERE status IN ('sent', 'failed', 'skipped'))
             AS last_delivery_at
    FROM moved GROUP BY 1, 2, 3
), per_campaign AS (
    SELECT campaign_id, sum(queued) AS queued, sum(excluded) AS excluded,
           sum(retrying) AS retrying, sum(sent) AS sent, sum(failed) AS failed,
           sum(skipped) AS skipped, sum(ambiguous) AS ambiguous,
           max(last_delivery_at) AS last_delivery_at
    FROM per_second GROUP BY campaign_id
), counted AS (
    UPDATE campaigns AS c
    SET queued = c.queued + p.queued, excluded = c.excluded + p.excluded,
        retrying = c.retrying + p.retrying, sent = c.sent + p.sent,
        failed = c.failed + p.failed, skipped = c.skipped + p.skipped,
        ambiguous = c.ambiguous + p.ambiguous,
        last_delivery_at = GREATEST(c.last_delivery_at, p.last_delivery_at),
        updated_at = now()
    FROM per_campaign p WHERE c.campaign_id = p.campaign_id
    RETURNING 1
), daily AS (
    INSERT INTO tenant_daily_sends AS d (tenant_id, day, sent, failed, skipped)
    SELECT tenant_id, (second AT TIME ZONE 'UTC')::date, sum(sent), sum(failed), sum(skipped)
    FROM per_second WHERE second IS NOT NULL
    GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (tenant_id, day) DO UPDATE
    SET sent = d.sent + EXCLUDED.sent, failed = d.failed + EXCLUDED.failed,
        skipped = d.skipped + EXCLUDED.skipped
    RETURNING 1
), throughput AS (
    INSERT INTO campaign_throughput AS t (tenant_id, campaign_id, second, settled)
    SELECT tenant_id, campaign_id, second, sent + failed + skipped
    FROM per_second WHERE second IS NOT NULL
    ORDER BY campaign_id, second
    ON CONFLICT (campaign_id, second) DO UPDATE SET settled = t.settled + EXCLUDED.settled
    RETURNING 1
)
SELECT count(*) FROM moved
"""

# The status follows from the facts kept on the row; returns the campaigns this batch
# completed (`o` is the row as it was before this statement). completed_at comes from event
# times only, so replaying the topics in another interleaving gives the same row.
_STATUS = """
UPDATE campaigns AS c
SET status = s.status,
    completed_at = CASE s.status WHEN 'cancelled' THEN c.cancelled_at
                                 WHEN 'completed' THEN GREATEST(c.hydrated_at, c.last_delivery_at)
                   END,
    updated_at = now()
FROM campaigns o, LATERAL (SELECT CASE
        WHEN o.cancelled_at IS NOT NULL THEN 'cancelled'
        WHEN o.total IS NOT NULL AND o.sent + o.failed + o.skipped >= o.total THEN 'completed'
        WHEN o.paused THEN 'paused'
        WHEN o.started_at IS NOT NULL OR o.hydrated_at IS NOT NULL THEN 'sending'
        WHEN o.scheduled_for IS NOT NULL AND o.schedule_missed_at IS NULL THEN 'scheduled'
        ELSE 'draft' END AS status) s
WHERE c.campaign_id = ANY(%b::text[]) AND o.campaign_id = c.campaign_id
  AND c.status <> s.status
RETURNING c.tenant_id, c.campaign_id, o.status, c.status
"""

# Each touched contact's stored state: its contacts row with its memberships and its profile
# row (segment_projection), either of them NULL where it does not exist.
_LOAD_CONTACTS = """
SELECT k.tenant_id, k.contact_id,
       c.contact_id IS NOT NULL, c.deleted, c.globally_unsubscribed, c.suppressed_reason,
       c.unsubscribed_lists,
       CASE WHEN c.contact_id IS NOT NULL THEN
           ARRAY(SELECT m.list_id FROM contact_list_members m
                 WHERE m.tenant_id = k.tenant_id AND m.contact_id = k.contact_id) END,
       p.contact_id IS NOT NULL, p.email, p.first_name, p.last_name, p.attributes, p.deleted
FROM unnest(%b::text[], %b::text[]) AS k(tenant_id, contact_id)
LEFT JOIN contacts c ON c.tenant_id = k.tenant_id AND c.contact_id = k.contact_id
LEFT JOIN contact_profiles p ON p.tenant_id = k.tenant_id AND p.contact_id = k.contact_id
"""

_UPSERT_CONTACTS = """
INSERT INTO contacts AS c
    (tenant_id, contact_id, deleted, globally_unsubscribed, suppressed_reason,
     unsubscribed_lists)
SELECT u.tenant_id, u.contact_id, u.deleted, u.unsub, u.suppressed,
       COALESCE(string_to_array(NULLIF(u.lists, ''), chr(31)), '{}')
FROM unnest(%b::text[], %b::text[], %b::boolean[], %b::boolean[], %b::text[], %b::text[])
     AS u(tenant_id, contact_id, deleted, unsub, suppressed, lists)
ORDER BY 1, 2
ON CONFLICT (tenant_id, contact_id) DO UPDATE
SET deleted = EXCLUDED.deleted, globally_unsubscribed = EXCLUDED.globally_unsubscribed,
    suppressed_reason = EXCLUDED.suppressed_reason,
    unsubscribed_lists = EXCLUDED.unsubscribed_lists
"""

_CLEAR_MEMBERSHIPS = """
DELETE FROM contact_list_members m
USING unnest(%b::text[], %b::text[]) AS k(tenant_id, contact_id)
WHERE m.tenant_id = k.tenant_id AND m.contact_id = k.contact_id
"""

_ADD_MEMBERSHIPS = """
INSERT INTO contact_list_members (tenant_id, list_id, contact_id)
SELECT * FROM unnest(%b::text[], %b::text[], %b::text[]) ORDER BY 1, 2, 3
ON CONFLICT DO NOTHING
"""

# Separates list ids inside one array element (list ids never hold control characters).
_LIST_SEPARATOR = "\x1f"


def _columns(rows: Iterable[Any], *names: str) -> list[list[Any]]:
    materialised = list(rows)
    return [[getattr(row, name) for row in materialised] for name in names]


def prepare(changes: BatchChanges) -> None:
    """Sort the batch's recipient rows into key order ahead of `BatchWriter.apply`, in the
    calling thread (the projector's driving thread, while the writer thread waits on
    PostgreSQL for the previous batch); kept on `changes`."""
    changes.prepared = _sorted_rows(changes.recipients)


def _sorted_rows(recipients: dict[tuple[str, str], RecipientRow]) -> list[RecipientRow]:
    # In key order: the rows are then inserted and locked in one global order (_RECIPIENTS).
    return [recipients[key] for key in sorted(recipients)]


class BatchWriter:
    """Applies planned batches through one connection, inside the caller's transaction.

    Its only state is whether this connection's session already holds the staging table
    (created once per session, outside a batch, by `prepare_session`; else inside the batch).
    """

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self._staging_ready = False

    def prepare_session(self) -> None:
        """Create the session's staging table once, outside any batch (autocommit `conn`):
        a round trip less in every batch. And turn JIT off for the session: the planner
        cannot know the staging table's size, its estimate of a batch's statement crosses
        the JIT thresholds, and compiling then costs many times the statement itself."""
        self.conn.execute("SET jit = off")
        self.conn.execute(_STAGE_TABLE)
        self._staging_ready = True

    def apply(self, changes: BatchChanges) -> list[tuple[str, str]]:
        """Apply a planned batch inside the caller's transaction.

        Returns the (tenant_id, campaign_id) of campaigns this batch completed.
        """
        if changes.is_empty():
            return []
        conn = self.conn
        with conn.cursor() as cur:
            # Contacts and segments first, before any campaign row is locked: no campaign
            # work depends on them, and the delivery lane (which never touches them) waits
            # for every campaign lock this transaction takes.
            erased = _write_contacts(cur, changes) if changes.contacts else []
            if changes.segments:
                segment_projection.write_segments(cur, changes.segments)
            if changes.lists:
                lists_projection.write_lists(cur, changes.lists)
            ids = changes.campaign_ids()
            if ids:
                # One round trip for both (they still run one after the other, each with its
                # own snapshot).
                with conn.cursor() as ensure, conn.pipeline():
                    ensure.execute(_ENSURE_CAMPAIGNS, ([changes.owners[c] for c in ids], ids))
                    cur.execute(_LOCK_CAMPAIGNS, (ids,))
                changes.drop_campaigns([campaign for campaign, owner in cur.fetchall()
                                        if owner != changes.owners[campaign]])
            if changes.campaigns:
                cur.execute(_CAMPAIGN_FACTS, _columns(
                    sorted(changes.campaigns.values(), key=lambda c: c.campaign_id),
                    *_CAMPAIGN_FACT_FIELDS,
                ))
            if changes.rejections:
                cur.execute(_REJECTIONS, _columns(
                    changes.rejections.values(),
                    "event_id", "tenant_id", "campaign_id", "command_id", "command_type",
                    "reason", "occurred_at", "correlation_id",
                ))
            if changes.outcomes:
                cur.execute(_OUTCOMES, _columns(
                    changes.outcomes.values(),
                    "event_id", "tenant_id", "causation_id", "aggregate_id", "event_type",
                    "occurred_at",
                ))
            if changes.attempts:
                cur.execute(_ATTEMPTS, _columns(
                    changes.attempts.values(),
                    "event_id", "tenant_id", "campaign_id", "contact_id", "attempt",
                    "smtp_code", "detail", "retry_at", "occurred_at",
                ))
                erase.forget_attempts(cur, list(changes.attempts))
            if changes.recipients:
                self._write_recipients(cur, changes.prepared or _sorted_rows(changes.recipients))
            completed: list[tuple[str, str]] = []
            ids = changes.campaign_ids()
            if ids:
                cur.execute(_STATUS, (ids,))
                completed = [(tenant, campaign) for tenant, campaign, old, new in cur.fetchall()
                             if new == "completed" and old != "completed"]
            erase.erase_contacts(cur, erased)  # last: see projections/erase.py on locks
            return completed

    def _write_recipients(self, cur: psycopg.Cursor[Any], rows: list[RecipientRow]) -> None:
        """The one way recipients are written: a binary COPY into the staging table, then
        _RECIPIENTS."""
        if not self._staging_ready:
            cur.execute(_STAGE_TABLE)
        with cur.copy(_COPY_STAGE) as copy:
            copy.set_types(_STAGE_TYPES)
            write = copy.write_row
            for row in rows:
                write(row)  # RecipientRow's fields are _COPY_STAGE's columns, in order
        cur.execute(_RECIPIENTS)
        erase.forget_staged(cur)


def apply(conn: psycopg.Connection[Any], changes: BatchChanges) -> list[tuple[str, str]]:
    """`BatchWriter.apply` for a caller that holds no writer of its own (tools, tests)."""
    return BatchWriter(conn).apply(changes)


def _write_contacts(cur: psycopg.Cursor[Any], changes: BatchChanges) -> list[ContactKey]:
    """Fold each touched contact's events over its stored state, then store the result: the
    contacts row with its memberships, and its profile (segment_projection). Returns the
    contacts the batch touched that are deleted now, for the erase (projections/erase.py).

    One fold serves both tables where their stored rows agree (both there with the same
    deleted flag, or neither): apply_contact_event moves each field by the event and that
    field alone, deciding only on whether the state exists and is deleted, so the fold of
    the whole state equals the two folds of its halves (and costs half: the fold is most of
    a contact's Python time here). Where they disagree, each half is folded on its own, as
    before the two were merged.
    """
    keys = sorted(changes.contacts)
    cur.execute(_LOAD_CONTACTS, ([t for t, _ in keys], [c for _, c in keys]))
    states: dict[ContactKey, ContactState | None] = {}
    profiles: dict[ContactKey, ContactState | None] = {}
    for (tenant, contact, has_row, deleted, unsub, suppressed, unsub_lists, lists,
         has_profile, email, first, last, attributes, profile_deleted) in cur.fetchall():
        key = (tenant, contact)
        events = changes.contacts[key]
        if not has_row and not has_profile:
            profiles[key] = states[key] = fold_contact(events)
        elif has_row and has_profile and deleted == profile_deleted:
            profiles[key] = states[key] = fold_contact(events, ContactState(
                contact, email, first, last, attributes=dict(attributes),
                lists=frozenset(lists), unsubscribed_lists=frozenset(unsub_lists),
                globally_unsubscribed=unsub, suppressed_reason=suppressed, deleted=deleted,
            ))
        else:
            states[key] = fold_contact(events, None if not has_row else ContactState(
                contact, "", lists=frozenset(lists), unsubscribed_lists=frozenset(unsub_lists),
                globally_unsubscribed=unsub, suppressed_reason=suppressed, deleted=deleted,
            ))
            profiles[key] = fold_contact(events, None if not has_profile else (
                segment_projection.profile_state(contact, email, first, last, attributes,
                                                 profile_deleted)))
    kept = [(key, s) for key, s in sorted(states.items()) if s is not None]
    if kept:
        cur.execute(_UPSERT_CONTACTS, (
            [t for (t, _), _ in kept], [c for (_, c), _ in kept],
            [s.deleted for _, s in kept], [s.globally_unsubscribed for _, s in kept],
            [s.suppressed_reason for _, s in kept],
            [_LIST_SEPARATOR.join(sorted(s.unsubscribed_lists)) for _, s in kept],
        ))
        cur.execute(_CLEAR_MEMBERSHIPS, ([t for (t, _), _ in kept], [c for (_, c), _ in kept]))
        members = [(t, list_id, c) for (t, c), s in kept for list_id in sorted(s.lists)]
        if members:
            cur.execute(_ADD_MEMBERSHIPS, ([m[0] for m in members], [m[1] for m in members],
                                           [m[2] for m in members]))
    segment_projection.store_profiles(cur, profiles)
    # Every touched contact left deleted, also one a flag made without an upsert (stored
    # address-less as deleted): the erase of staged rows (erase.forget_staged) treats such a
    # contact as erased too, so live and rebuilt read models agree whatever the topics' order.
    return [key for key, s in kept if s.deleted]
