"""The GDPR erase in the read models: after a ContactDeleted, no read model holds the
contact's address, names or attributes, and no free text quoting an address stays on its rows.

Guarantees (inside the projector's batch transaction, so exactly once with its positions):
- `erase_contacts`, for the contacts a batch deleted: campaign_recipients.email is emptied
  and addresses in its last_error / reason are replaced by ERASED; the same for the SMTP
  replies in recipient_attempts.detail and send_ledger (smtp_reply, reason) and for the
  engagement rows' url and detail. contact_profiles is emptied by the contact fold itself
  (schemas.contacts.apply_contact_event), contacts never held an address. Rows are kept,
  only their personal fields change: every count (campaign counters, daily sends, list and
  segment counts, engagement) stays what it was.
- `forget_staged`, after each write of recipients: a recipient row written for a contact
  that is deleted now (a RecipientQueued projected after the ContactDeleted: another topic,
  a rebuild's interleaving, a late SMTP reply) is emptied the same way, so the order the
  topics are replayed in does not bring an address back. A contact upserted again after its
  deletion is a live contact again: its new rows keep their address.
- The engagement lane (its own consumer and transactions) does the same for its rows:
  `erase_engagement` for the contacts a batch of its own deleted (it reads contacts.events
  too), after the batch's rows are in; `forget_engagement` for the rows it just inserted whose
  contact is deleted now. With the main projector's erase, every order of the two lanes ends
  with the rows scrubbed, save one: the engagement batch checks while the main projector's
  batch that deletes the contact is still open and commits after that batch's erase ran (two
  transactions of milliseconds overlapping); the next deletion or a rebuild scrubs it.

Locks: the erase runs last in its batch and updates recipient rows of campaigns it has not
locked first (batch_writer's lock order); a deadlock with the delivery lane is possible in
principle (both on the same recipients and tenant day at once), PostgreSQL breaks it and the
projector retries the batch (read_model_store: ROW_CONFLICT), which commits or rolls back
whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from projections.read_models import ContactKey

ERASED = "[erased]"
# An address inside free text (an SMTP reply, a URL's query): anything@anything, up to the
# characters that delimit it in replies and URLs.
_ADDRESS = r'[^\s<>()\[\]",;:/?&=]+@[^\s<>()\[\]",;:/?&=]+'



def _scrub(column: str) -> str:
    return f"regexp_replace({column}, '{_ADDRESS}', '{ERASED}', 'g')"


def _erased(column: str) -> str:
    return f"({column} IS NOT NULL AND {column} ~ '{_ADDRESS}')"


_KEYS = "unnest(%b::text[], %b::text[]) AS k(tenant_id, contact_id)"
# Tables keyed by (campaign, contact) are reached through the tenant's campaigns: one primary
# key probe per campaign of the tenant, so no index by contact is needed on the big tables.
_BY_CAMPAIGN = f"{_KEYS} JOIN campaigns c ON c.tenant_id = k.tenant_id"

_RECIPIENTS = f"""
UPDATE campaign_recipients r
SET email = '', last_error = {_scrub('r.last_error')}, reason = {_scrub('r.reason')}
FROM {_BY_CAMPAIGN}
WHERE r.campaign_id = c.campaign_id AND r.contact_id = k.contact_id AND r.tenant_id = k.tenant_id
  AND (r.email <> '' OR {_erased('r.last_error')} OR {_erased('r.reason')})
"""

_ATTEMPTS = f"""
UPDATE recipient_attempts a SET detail = {_scrub('a.detail')}
FROM {_BY_CAMPAIGN}
WHERE a.campaign_id = c.campaign_id AND a.contact_id = k.contact_id AND a.tenant_id = k.tenant_id
  AND {_erased('a.detail')}
"""

_LEDGER = f"""
UPDATE send_ledger l
SET smtp_reply = {_scrub('l.smtp_reply')}, reason = {_scrub('l.reason')}
FROM {_BY_CAMPAIGN}
WHERE l.campaign_id = c.campaign_id AND l.contact_id = k.contact_id AND l.tenant_id = k.tenant_id
  AND ({_erased('l.smtp_reply')} OR {_erased('l.reason')})
"""

_ENGAGEMENT = f"""
UPDATE engagement_events e SET url = {_scrub('e.url')}, detail = {_scrub('e.detail')}
FROM {_KEYS}
WHERE e.tenant_id = k.tenant_id AND e.contact_id = k.contact_id
  AND ({_erased('e.url')} OR {_erased('e.detail')})
"""

# The contact's published events in the API's outbox: their envelopes hold the address and
# the relay never reads a published row again. Unpublished ones are still on their way.
_OUTBOX = f"""
DELETE FROM command_outbox o USING {_KEYS}
WHERE o.tenant_id = k.tenant_id AND o.aggregate_id = k.contact_id
  AND o.published_at IS NOT NULL
"""

# Recipients just staged (batch_writer's recipient_stage) whose contact is deleted now; the
# partial index contacts_deleted (migration 0012) makes each probe one into a small index,
# and the few rows found are then updated by primary key.
_STAGED = f"""
WITH gone AS MATERIALIZED (
    SELECT s.tenant_id, s.campaign_id, s.contact_id FROM recipient_stage s
    WHERE EXISTS (SELECT 1 FROM contacts c WHERE c.tenant_id = s.tenant_id
                  AND c.contact_id = s.contact_id AND c.deleted)
)
UPDATE campaign_recipients r
SET email = '', last_error = {_scrub('r.last_error')}, reason = {_scrub('r.reason')}
FROM gone s
WHERE r.campaign_id = s.campaign_id AND r.contact_id = s.contact_id
  AND r.tenant_id = s.tenant_id
  AND (r.email <> '' OR {_erased('r.last_error')} OR {_erased('r.reason')})
"""

_STAGED_ATTEMPTS = f"""
UPDATE recipient_attempts a SET detail = {_scrub('a.detail')}
FROM contacts c
WHERE a.event_id = ANY(%b::uuid[]) AND c.tenant_id = a.tenant_id
  AND c.contact_id = a.contact_id AND c.deleted AND {_erased('a.detail')}
"""

_STAGED_ENGAGEMENT = f"""
UPDATE engagement_events e SET url = {_scrub('e.url')}, detail = {_scrub('e.detail')}
FROM unnest(%b::text[], %b::text[]) AS k(tenant_id, event_id), contacts c
WHERE e.tenant_id = k.tenant_id AND e.event_id = k.event_id AND c.tenant_id = e.tenant_id
  AND c.contact_id = e.contact_id AND c.deleted AND ({_erased('e.url')} OR {_erased('e.detail')})
"""


def erase_contacts(cur: psycopg.Cursor[Any], keys: Sequence[ContactKey]) -> None:
    """Erase the personal data of these (deleted) contacts from every read model."""
    if not keys:
        return
    ordered = sorted(keys)
    columns = ([t for t, _ in ordered], [c for _, c in ordered])
    for statement in (_RECIPIENTS, _ATTEMPTS, _ENGAGEMENT):
        cur.execute(statement, columns)
    # The sender's ledger and the API's outbox are not read models: a rebuild's schema has
    # neither (its search_path finds none), and the live projector erases them already.
    row = cur.execute("SELECT to_regclass('send_ledger'), to_regclass('command_outbox')").fetchone()
    ledger, outbox = row if row else (None, None)
    if ledger is not None:
        cur.execute(_LEDGER, columns)
    if outbox is not None:
        cur.execute(_OUTBOX, columns)


def forget_staged(cur: psycopg.Cursor[Any]) -> None:
    """Empty the personal fields of the recipient rows just staged whose contact is deleted."""
    cur.execute(_STAGED)


def erase_engagement(cur: psycopg.Cursor[Any], keys: Sequence[ContactKey]) -> None:
    """Erase the personal data of these (deleted) contacts from engagement_events."""
    if keys:
        ordered = sorted(keys)
        cur.execute(_ENGAGEMENT, ([t for t, _ in ordered], [c for _, c in ordered]))


def forget_engagement(cur: psycopg.Cursor[Any], rows: Sequence[tuple[str, str]]) -> None:
    """Scrub the engagement rows just stored (these tenant and event ids) of contacts that are
    deleted now."""
    if rows:
        cur.execute(_STAGED_ENGAGEMENT, ([t for t, _ in rows], [e for _, e in rows]))


def forget_attempts(cur: psycopg.Cursor[Any], event_ids: Sequence[Any]) -> None:
    """Scrub the SMTP replies just stored (these attempts) of contacts that are deleted."""
    if event_ids:
        cur.execute(_STAGED_ATTEMPTS, (list(event_ids),))
