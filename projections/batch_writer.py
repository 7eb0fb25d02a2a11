"""Writes a planned batch (projections.read_models.BatchChanges) in set-based SQL.

Guarantee: inside the caller's transaction, a fixed number of statements per batch whatever its
size; recipients go through a binary COPY into a temporary staging table (a small batch: as
arrays) and one statement that looks up and locks their rows, updates the ones whose status
climbs, inserts the new ones, and from the returned transitions (previous status -> new status)
moves the campaign counters, the per-tenant daily sends and the per-second throughput, so a
counter moves exactly when a row does. A staged batch whose rows are expected to be all new (a
backlog, a campaign's start) first tries a plain insert counted from the staging table (every
transition is then from nothing) under a savepoint; if any row exists the insert fails on the
primary key, is rolled back to the savepoint, and the general statement runs: the same result
either way.

Lock order, the same in every transaction (so the projector's lanes, which write the same
campaigns concurrently, and two instances during a rebalance cannot deadlock): first contact,
list-membership and segment rows (in key order; only the main lane writes them), then every
campaign row of the batch, in campaign id order, then recipient rows in key order, then the
per-tenant and per-campaign counter rows. Since a recipient row is only written under its
campaign's lock, two transactions never race to insert the same recipient: the second one
waits for the first to end and then finds its row.

Array parameters are sent in binary (`%b`): psycopg's text array dumper quotes every element in
Python, about three times the CPU (a live delivery batch: ~0.25 ms of its ~1.1 ms of Python).
"""

from __future__ import annotations

import weakref
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import compress, repeat
from operator import attrgetter, itemgetter, sub
from typing import Any

import psycopg

from projections import segment_projection
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

# Facts that happen once keep their first value (COALESCE); pause state takes the batch's.
_CAMPAIGN_FACTS = """
UPDATE campaigns AS c
SET name = COALESCE(c.name, u.name),
    subject = COALESCE(c.subject, u.subject),
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
            %b::timestamptz[], %b::timestamptz[], %b::text[], %b::text[], %b::bigint[])
     AS u(tenant_id, campaign_id, name, subject, created_at, started_at, total, hydrated_at,
          cancelled_at, paused, paused_at, resumed_at, pause_reason, paused_automatically,
          scheduled_for, schedule_missed_at, schedule_missed_reason, unknown_contact_ids,
          unknown_contact_count)
WHERE c.campaign_id = u.campaign_id AND c.tenant_id = u.tenant_id
"""

_CAMPAIGN_FACT_FIELDS = (
    "tenant_id", "campaign_id", "name", "subject", "created_at", "started_at", "total",
    "hydrated_at", "cancelled_at", "paused", "paused_at", "resumed_at", "pause_reason",
    "paused_automatically", "scheduled_for", "schedule_missed_at", "schedule_missed_reason",
    "unknown_contact_ids", "unknown_contact_count",
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

_STAGE_COLUMNS = RecipientRow._fields
# The staging table's column types, in _STAGE_COLUMNS order: binary COPY with declared types
# takes psycopg's C dumpers for every value (~0.7 us a row instead of ~2.4 us for text COPY
# with a dumper looked up per value) and spares the server parsing timestamps.
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

_RANK_NEW = ("CASE s.status WHEN 'excluded' THEN 0 WHEN 'queued' THEN 1"
             " WHEN 'retrying' THEN 2 ELSE 3 END")
_RANK_OLD = "CASE o.status WHEN 'excluded' THEN 0 WHEN 'queued' THEN 1 WHEN 'retrying' THEN 2 END"

# From the transitions per tenant, campaign and second (`per_second`, defined before): the
# campaign counters, the per-tenant daily sends and the per-second throughput.
_COUNTERS = """), per_campaign AS (
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
"""

# `look` finds each staged recipient's row (one index probe per row, never a scan, whatever
# the planner thinks of the unanalysed staging table) and locks it, so `prev` is the status
# the row has until this transaction ends, even with another projector instance writing it
# (READ COMMITTED: a lock waits for that writer and then reads its version). Rows that
# exist and climb are updated in place by their tuple id (no second index probe; HOT when
# the page has room); rows that do not exist are plainly inserted (no ON CONFLICT machinery:
# the look-up already said they are new, and nobody else can insert them meanwhile: the
# campaign's row lock is held). The transitions `moved`
# (previous -> new) are all the counters add. The staging rows arrive in key order, so rows
# are locked in key order.
_RECIPIENTS_FROM = f"""
WITH look AS MATERIALIZED (
    SELECT s.*, o.row_id, o.status AS prev,
           o.row_id IS NOT NULL AND o.tenant_id = s.tenant_id
           AND o.status IN ('excluded', 'queued', 'retrying')
           AND ({_RANK_NEW} > {_RANK_OLD}
                OR (o.status = 'retrying' AND s.status = 'retrying'
                    AND s.attempts > o.attempts)) AS climbs
    FROM {{source}}
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
    ORDER BY campaign_id, contact_id
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
{_COUNTERS}
-- Rows that existed (the next batch tries the all-new statement only if none did).
SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM counted),
       (SELECT count(*) FROM look WHERE row_id IS NOT NULL)
"""

# The staged rows as all new: a plain insert (no look-up per row), counted from the staging
# table, where every transition is from nothing (prev NULL) to the staged status. If any row
# exists, the insert fails on the primary key (UniqueViolation) and the caller rolls the
# attempt back to its savepoint; else the counters are exactly those of _RECIPIENTS.
_RECIPIENTS_NEW = f"""
WITH inserted AS (
    INSERT INTO campaign_recipients
        (tenant_id, campaign_id, contact_id, email, status, attempts, last_error, reason,
         smtp_code, ambiguous, last_event_at)
    SELECT tenant_id, campaign_id, contact_id, email, status, attempts, last_error, reason,
           smtp_code, ambiguous, event_at
    FROM recipient_stage
    ORDER BY campaign_id, contact_id
    RETURNING 1
), per_second AS (
    SELECT tenant_id, campaign_id,
           CASE WHEN status IN ('sent', 'failed', 'skipped')
                THEN date_trunc('second', event_at) END AS second,
           count(*) FILTER (WHERE status <> 'excluded') AS queued,
           count(*) FILTER (WHERE status = 'excluded') AS excluded,
           count(*) FILTER (WHERE status = 'retrying') AS retrying,
           count(*) FILTER (WHERE status = 'sent') AS sent,
           count(*) FILTER (WHERE status = 'failed') AS failed,
           count(*) FILTER (WHERE status = 'skipped') AS skipped,
           coalesce(sum(ambiguous) FILTER (WHERE status IN ('sent', 'failed')), 0) AS ambiguous,
           max(event_at) FILTER (WHERE status IN ('sent', 'failed', 'skipped'))
             AS last_delivery_at
    FROM recipient_stage GROUP BY 1, 2, 3
{_COUNTERS}
SELECT (SELECT count(*) FROM inserted), (SELECT count(*) FROM counted)
"""  # noqa: S608

# The all-new try when the session may COPY straight into campaign_recipients (row-level
# security does not apply to it: a superuser, a BYPASSRLS login, or the table's owner without
# FORCE; PostgreSQL refuses COPY FROM into a table whose policies apply to the copier). COPY
# inserts in bulk (one WAL record per page of rows instead of one per row) and skips the
# staging table: a cold drain of 200,000 deliveries spent ~0.15 s of PostgreSQL CPU on the
# staging COPY, ~0.65 s on the insert from it and ~0.15 s on counting the staged rows. The
# counters then come from the rows as sent (`_totals`): every row is new, so each transition
# is from nothing to its status, as in _RECIPIENTS_NEW.
# The staging table's columns as the read model names them (RecipientRow's event_at is the
# row's last_event_at), so the same rows and _STAGE_TYPES serve both COPYs.
_RECIPIENT_COLUMNS = tuple("last_event_at" if c == "event_at" else c for c in _STAGE_COLUMNS)
_COPY_RECIPIENTS = (f"COPY campaign_recipients ({', '.join(_RECIPIENT_COLUMNS)})"
                    " FROM STDIN (FORMAT BINARY)")
_COUNT_COPIED = f"""
WITH per_second AS (
    SELECT * FROM unnest(%b::text[], %b::text[], %b::timestamptz[], %b::int8[], %b::int8[],
                         %b::int8[], %b::int8[], %b::int8[], %b::int8[], %b::int8[],
                         %b::timestamptz[])
        AS p(tenant_id, campaign_id, second, queued, excluded, retrying, sent, failed, skipped,
             ambiguous, last_delivery_at)
{_COUNTERS}
SELECT (SELECT count(*) FROM counted)
"""
# Whether this session may COPY into campaign_recipients (asked once per connection).
_MAY_COPY_DIRECT = "SELECT NOT row_security_active('campaign_recipients')"
_TERMINAL = frozenset({"sent", "failed", "skipped"})
_AMBIGUOUS_COUNTED = frozenset({"sent", "failed"})
_TENANT_OF, _CAMPAIGN_OF, _STATUS_OF, _EVENT_AT_OF, _AMBIGUOUS_OF = (
    itemgetter(RecipientRow._fields.index(name))
    for name in ("tenant_id", "campaign_id", "status", "event_at", "ambiguous"))
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DAYS, _SECONDS = attrgetter("days"), attrgetter("seconds")
# _COUNT_COPIED's per_second column (after queued, 0) each status adds to.
_COUNTED_SLOT = {"excluded": 1, "retrying": 2, "sent": 3, "failed": 4, "skipped": 5}

# Up to this many recipients a batch passes them as arrays; more go through COPY into the
# staging table. Touching a temporary table makes PostgreSQL truncate the ON COMMIT DELETE
# ROWS tables at commit (a few file operations, ~1-3 ms): negligible for a backlog batch of
# thousands, most of the cost of a small batch of fresh deliveries (projection lag). Arrays
# cost more per row than COPY, so large batches keep the staging table.
ARRAY_BATCH_MAX = 500
_RECIPIENTS = _RECIPIENTS_FROM.format(source="recipient_stage AS s")
_RECIPIENTS_ARRAYS = _RECIPIENTS_FROM.format(source="""unnest(
        %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::int[], %b::text[],
        %b::text[], %b::int[], %b::int[], %b::timestamptz[])
    AS s(tenant_id, campaign_id, contact_id, email, status, attempts, last_error, reason,
         smtp_code, ambiguous, event_at)""")

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


# Connections whose last batch through the staging table found some of its rows existing:
# their next batch goes straight to _RECIPIENTS. The others try _RECIPIENTS_NEW first (a
# backlog of new recipients, the hydrator's RecipientQueued burst at a campaign's start), which
# costs ~45% less database time than _RECIPIENTS; a failed try costs the work up to the first
# existing row. Only a guess about the next batch: either way the result is the same.
_FOUND_EXISTING: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()
# Connections whose session already holds the staging table (`prepare_session`).
_PREPARED: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()
# Connection -> whether it may COPY straight into campaign_recipients (_MAY_COPY_DIRECT).
_COPIES_DIRECT: weakref.WeakKeyDictionary[psycopg.Connection[Any], bool] = (
    weakref.WeakKeyDictionary())


def prepare_session(conn: psycopg.Connection[Any]) -> None:
    """Create the session's staging table once, outside any batch (autocommit `conn`).

    Optional: `apply` creates it inside the batch otherwise, at the price of a round trip per
    large batch (and a round trip early in a batch waits for the GIL while the projector's
    driving thread decodes the next batch: ~5 ms each).
    """
    conn.execute(_STAGE_TABLE)
    _PREPARED.add(conn)
    _may_copy_direct(conn)


def _may_copy_direct(conn: psycopg.Connection[Any]) -> bool:
    known = _COPIES_DIRECT.get(conn)
    if known is None:
        row = conn.execute(_MAY_COPY_DIRECT).fetchone()
        known = _COPIES_DIRECT[conn] = bool(row and row[0])
    return known


def _columns(rows: Iterable[Any], *names: str) -> list[list[Any]]:
    materialised = list(rows)
    return [[getattr(row, name) for row in materialised] for name in names]


def apply(conn: psycopg.Connection[Any], changes: BatchChanges) -> list[tuple[str, str]]:
    """Apply a planned batch inside the caller's transaction.

    Returns the (tenant_id, campaign_id) of campaigns this batch completed.
    """
    if changes.is_empty():
        return []
    with conn.cursor() as cur:
        # Contacts and segments first, before any campaign row is locked: no campaign work
        # depends on them, and the delivery lane (which never touches them) waits for every
        # campaign lock this transaction takes; a contacts import projected in the same
        # batch as a campaign's start held deliveries up ~3 s under load (make bench).
        if changes.contacts:
            _write_contacts(cur, changes)  # and the contacts' profiles
        if changes.segments:
            segment_projection.write_segments(cur, changes.segments)
        ids = changes.campaign_ids()
        if ids:
            # One round trip for both (they still run one after the other, each with its own
            # snapshot).
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
                "event_id", "tenant_id", "campaign_id", "command_id", "command_type", "reason",
                "occurred_at", "correlation_id",
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
                "event_id", "tenant_id", "campaign_id", "contact_id", "attempt", "smtp_code",
                "detail", "retry_at", "occurred_at",
            ))
        if changes.recipients:
            _write_recipients(cur, changes)
        completed: list[tuple[str, str]] = []
        ids = changes.campaign_ids()
        if ids:
            cur.execute(_STATUS, (ids,))
            completed = [(tenant, campaign) for tenant, campaign, old, new in cur.fetchall()
                         if new == "completed" and old != "completed"]
        return completed


@dataclass(frozen=True, slots=True)
class PreparedRecipients:
    """A batch's recipient rows in key order and, if they are expected to go straight into
    campaign_recipients as all new, their counters (`_totals`)."""

    rows: list[RecipientRow]
    totals: list[list[Any]] | None


def prepare(changes: BatchChanges, conn: psycopg.Connection[Any] | None) -> None:
    """Compute ahead, in the calling thread, what `apply` computes from the recipient rows
    before and after their COPY (sorting, counting), and keep it on `changes` for `apply`.

    The projector calls it from its driving thread while the writer thread waits on
    PostgreSQL for the previous batch; in the writer thread the same work held up the
    transaction, and PostgreSQL idled meanwhile. `conn` is the connection `apply` will use
    (None if not open yet): whether it takes the all-new COPY is read from it, a guess only
    (a wrong one costs the work, never the result).
    """
    changes.prepared = _prepared(changes.recipients, conn)


def _prepared(recipients: dict[tuple[str, str], RecipientRow],
              conn: psycopg.Connection[Any] | None) -> PreparedRecipients | None:
    """The recipients of a batch that goes through COPY, prepared; None for a small batch
    (passed as arrays). Counted only if `conn` is expected to take the all-new COPY."""
    if len(recipients) <= ARRAY_BATCH_MAX:
        return None
    rows = _sorted_rows(recipients)
    all_new = conn is not None and conn not in _FOUND_EXISTING and bool(_COPIES_DIRECT.get(conn))
    return PreparedRecipients(rows, _totals(rows) if all_new else None)


def _copy_rows(copy: psycopg.Copy, rows: list[RecipientRow]) -> None:
    """Send the rows (in _STAGE_COLUMNS order) into a binary COPY by psycopg's own dumpers."""
    copy.set_types(_STAGE_TYPES)
    write = copy.write_row
    for row in rows:
        write(row)  # RecipientRow's fields are _STAGE_COLUMNS, in order


def _sorted_rows(recipients: dict[tuple[str, str], RecipientRow]) -> list[RecipientRow]:
    # In key order: the rows are then inserted and locked in one global order (see
    # _RECIPIENTS_FROM).
    return [recipients[key] for key in sorted(recipients)]


def _write_recipients(cur: psycopg.Cursor[Any], changes: BatchChanges) -> None:
    # Not prepared ahead (a caller other than the projector): counted later, if need be.
    prepared = changes.prepared or _prepared(changes.recipients, None)
    if prepared is None:
        rows = _sorted_rows(changes.recipients)
        cur.execute(_RECIPIENTS_ARRAYS, [list(column) for column in zip(*rows, strict=True)])
        return
    rows = prepared.rows
    conn = cur.connection
    if (conn not in _FOUND_EXISTING and _may_copy_direct(conn)
            and _copy_all_new(cur, prepared)):
        return
    if conn not in _PREPARED:
        cur.execute(_STAGE_TABLE)
    columns = ", ".join(_STAGE_COLUMNS)
    with cur.copy(  # noqa: S608
            f"COPY recipient_stage ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
        _copy_rows(copy, rows)
    if conn not in _FOUND_EXISTING and not _COPIES_DIRECT.get(conn) and _insert_all_new(cur):
        return
    cur.execute(_RECIPIENTS)
    result = cur.fetchone()
    if result is not None and result[2]:
        _FOUND_EXISTING.add(conn)
    else:
        _FOUND_EXISTING.discard(conn)


def _copy_all_new(cur: psycopg.Cursor[Any], prepared: PreparedRecipients) -> bool:
    """COPY the rows straight into campaign_recipients and count them (with the totals
    computed ahead, if any): True if that did it; False if some row existed, in which case
    nothing of the attempt remains (rolled back to a savepoint)."""
    conn = cur.connection
    rows, totals = prepared.rows, prepared.totals
    cur.execute("SAVEPOINT all_new")
    try:
        with cur.copy(_COPY_RECIPIENTS) as copy:
            _copy_rows(copy, rows)  # the same columns, types and order
    except psycopg.errors.UniqueViolation:
        with conn.pipeline():
            cur.execute("ROLLBACK TO SAVEPOINT all_new")
            cur.execute("RELEASE SAVEPOINT all_new")
        _FOUND_EXISTING.add(conn)
        return False
    with conn.pipeline():
        cur.execute(_COUNT_COPIED, totals if totals is not None else _totals(rows))
        cur.execute("RELEASE SAVEPOINT all_new")
    return True


def _totals(rows: list[RecipientRow]) -> list[list[Any]]:
    """_COUNTERS' per_second rows (as columns) for rows that are all new: per tenant,
    campaign and second of a terminal event (None for the others), the transitions from
    nothing to each status, and the latest terminal event (on each of the campaign's rows).

    Rows come in (campaign, contact) order, so each campaign's rows are one slice; within
    it, rows are counted by C-level maps over (status, days, seconds) keys, the whole
    seconds since the epoch as a timedelta holds them (by (tenant, status, days, seconds)
    only in a slice naming several tenants): ~0.6 us a row, where one Counter over
    (tenant, campaign, status, int(timestamp())) took ~1.05 us."""
    groups: dict[tuple[str, str, tuple[int, int] | None], list[Any]] = {}
    campaigns = list(map(_CAMPAIGN_OF, rows))
    start = 0
    for campaign in sorted(set(campaigns)):
        end = bisect_right(campaigns, campaign, lo=start)
        part = rows[start:end]
        start = end
        statuses = list(map(_STATUS_OF, part))
        since_epoch = list(map(sub, map(_EVENT_AT_OF, part), repeat(_EPOCH)))
        days, seconds = map(_DAYS, since_epoch), map(_SECONDS, since_epoch)
        latest = max(compress(map(_EVENT_AT_OF, part), map(_TERMINAL.__contains__, statuses)),
                     default=None)
        tenants = set(map(_TENANT_OF, part))
        if len(tenants) == 1:
            tenant = tenants.pop()
            counted = [((tenant, status, day, second), count) for (status, day, second), count
                       in Counter(zip(statuses, days, seconds, strict=True)).items()]
        else:
            counted = list(Counter(zip(map(_TENANT_OF, part), statuses, days, seconds,
                                       strict=True)).items())
        for (tenant, status, day, second), count in counted:
            key = (tenant, campaign, (day, second) if status in _TERMINAL else None)
            group = groups.get(key)
            if group is None:
                group = groups[key] = [0, 0, 0, 0, 0, 0, 0, latest]
            if status != "excluded":
                group[0] += count
            slot = _COUNTED_SLOT.get(status)
            if slot is not None:
                group[slot] += count
    # Ambiguous outcomes of sent and failed rows: few rows carry any.
    for row in compress(rows, map(_AMBIGUOUS_OF, rows)):
        if row.status in _AMBIGUOUS_COUNTED:
            delta = row.event_at - _EPOCH
            groups[(row.tenant_id, row.campaign_id, (delta.days, delta.seconds))][6] += (
                row.ambiguous)
    keys = list(groups)
    values = list(groups.values())
    return [[k[0] for k in keys], [k[1] for k in keys],
            [None if k[2] is None else _EPOCH + timedelta(*k[2]) for k in keys],
            *([v[i] for v in values] for i in range(8))]


def _insert_all_new(cur: psycopg.Cursor[Any]) -> bool:
    """Apply the staged rows with _RECIPIENTS_NEW: True if that did it; False if some row
    existed, in which case nothing of the attempt remains (rolled back to a savepoint)."""
    # One round trip for the three (an error skips the rest of the pipeline).
    try:
        with cur.connection.pipeline():
            cur.execute("SAVEPOINT all_new")
            cur.execute(_RECIPIENTS_NEW)
            cur.execute("RELEASE SAVEPOINT all_new")
    except psycopg.errors.UniqueViolation:
        with cur.connection.pipeline():
            cur.execute("ROLLBACK TO SAVEPOINT all_new")
            cur.execute("RELEASE SAVEPOINT all_new")
        _FOUND_EXISTING.add(cur.connection)
        return False
    return True


def _write_contacts(cur: psycopg.Cursor[Any], changes: BatchChanges) -> None:
    """Fold each touched contact's events over its stored state, then store the result: the
    contacts row with its memberships, and its profile (segment_projection).

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
