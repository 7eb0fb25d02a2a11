"""The send ledger: PostgreSQL's record of each campaign recipient's attempts and outcome.

Protocol, per batch: `claim` every recipient (with the attempt number its record carries)
before any SMTP transaction, `settle` every outcome after them. Each is one transaction for
the whole batch. The verdict of a claim is the pure function `judge_claim` of the row as it
was and the attempt claimed:

- FRESH: this attempt was never claimed -> mail it.
- UNSETTLED: this attempt was claimed but never settled (a sender died or lost its partition
  mid-send) -> its outcome is unknown; mail again and add 1 to `ambiguous` (a possible copy).
- SETTLED: a terminal outcome (sent / failed) is recorded -> do not mail; re-publish it, so a
  delivery event lost in a crash between settle and produce is not lost.
- DEFERRED: this attempt was settled as a transient failure -> re-publish the deferral (the
  retry record may have been lost the same way).
- STALE: a later attempt exists already -> this copy is obsolete; nothing to do.
- SKIPPED: the campaign is cancelled and nothing terminal is recorded -> not mailed again.

Row encoding (the table of migration 0002): `attempts` is the last attempt settled; a row
with status 'claimed' is in flight while `settled_at` is NULL, and deferred (or held, never
tried) once it is set; `claims` = 0 marks a row this claim has just inserted.

Guarantees:
- A recipient is mailed at most once per attempt number, except after an UNSETTLED claim,
  which is counted in `ambiguous` together with connection losses after the final ".": the
  number of possible duplicates is never under-counted.
- Claims lock their rows (in key order, so two senders never deadlock): two senders that
  race on one recipient during a rebalance see each other's claim (UNSETTLED), not two FRESH.
- A database error is raised, never swallowed: the caller must then not commit its Kafka
  offsets, and the redelivered batch meets the ledger state that did get committed.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import psycopg

from services.sender.delivery import Outcome, Status

LedgerKey = tuple[str, str]  # (campaign_id, contact_id)

_INSERT_NEW = """
INSERT INTO send_ledger (campaign_id, contact_id, tenant_id, message_id, claims)
SELECT c, k, t, m, 0 FROM json_to_recordset(%s::json) AS u(c text, k text, t text, m text)
ON CONFLICT (campaign_id, contact_id) DO NOTHING
"""

_LOCK = """
SELECT l.campaign_id, l.contact_id, l.status, l.claims, l.attempts, l.ambiguous,
       l.settled_at IS NULL, l.smtp_code, l.smtp_reply, l.reason, l.permanent
FROM send_ledger AS l
JOIN json_to_recordset(%s::json) AS u(c text, k text) ON l.campaign_id = u.c AND l.contact_id = u.k
ORDER BY l.campaign_id, l.contact_id
FOR UPDATE OF l
"""

_WRITE_CLAIMS = """
UPDATE send_ledger AS l
SET claims = u.claims,
    ambiguous = u.ambiguous,
    settled_at = CASE WHEN u.in_flight THEN NULL ELSE coalesce(l.settled_at, now()) END,
    claimed_at = CASE WHEN u.in_flight THEN now() ELSE l.claimed_at END
FROM json_to_recordset(%s::json)
     AS u(campaign_id text, contact_id text, claims int, ambiguous int, in_flight bool)
WHERE l.campaign_id = u.campaign_id AND l.contact_id = u.contact_id
"""

# Deferred and held outcomes keep status 'claimed' (not terminal) and only end the flight;
# a held one (never tried) leaves `attempts` as it was.
_SETTLE = """
UPDATE send_ledger AS l
SET status = CASE WHEN u.status IN ('sent', 'failed') THEN u.status ELSE 'claimed' END,
    attempts = CASE WHEN u.status = 'held' THEN l.attempts ELSE u.attempt END,
    ambiguous = l.ambiguous + u.ambiguous,
    smtp_code = CASE WHEN u.status = 'held' THEN l.smtp_code ELSE u.smtp_code END,
    smtp_reply = CASE WHEN u.status = 'held' THEN l.smtp_reply ELSE u.smtp_reply END,
    reason = CASE WHEN u.status = 'held' THEN l.reason ELSE u.reason END,
    permanent = CASE WHEN u.status = 'held' THEN l.permanent ELSE u.permanent END,
    settled_at = now()
FROM json_to_recordset(%s::json)
     AS u(campaign_id text, contact_id text, status text, attempt int, ambiguous int,
          smtp_code int, smtp_reply text, reason text, permanent bool)
WHERE l.campaign_id = u.campaign_id AND l.contact_id = u.contact_id
"""


# Field names of the JSON rows of _WRITE_CLAIMS and _SETTLE, in the order of their tuples.
_CLAIM_FIELDS = ("campaign_id", "contact_id", "claims", "ambiguous", "in_flight")
_SETTLE_FIELDS = ("campaign_id", "contact_id", "status", "attempt", "ambiguous", "smtp_code",
                  "smtp_reply", "reason", "permanent")

# Outcomes that were never tried (held, skipped, throttled) only end the flight.
_SETTLED_AS = {Status.SENT: "sent", Status.FAILED: "failed", Status.DEFERRED: "deferred"}


class ClaimState(enum.Enum):
    FRESH = "fresh"
    UNSETTLED = "unsettled"
    SETTLED = "settled"
    DEFERRED = "deferred"
    STALE = "stale"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class LedgerRow:
    """One recipient's row, as far as claims are concerned."""

    status: str  # 'claimed' | 'sent' | 'failed'
    claims: int
    attempts: int
    ambiguous: int
    in_flight: bool
    smtp_code: int | None = None
    smtp_reply: str | None = None
    reason: str | None = None
    permanent: bool | None = None

    @property
    def recorded(self) -> Outcome | None:
        """The outcome on record: terminal, or the deferral of attempt `attempts`."""
        if self.status in ("sent", "failed"):
            sent = self.status == "sent"
            return Outcome(
                Status.SENT if sent else Status.FAILED, self.attempts, self.smtp_code,
                (self.smtp_reply if sent else self.reason) or "", bool(self.permanent),
                self.ambiguous,
            )
        if self.attempts > 0 and not self.in_flight:
            return Outcome(Status.DEFERRED, self.attempts, self.smtp_code, self.reason or "",
                           ambiguous=self.ambiguous)
        return None


@dataclass(frozen=True)
class Claim:
    state: ClaimState
    # SETTLED: the terminal outcome; DEFERRED: the recorded deferral.
    outcome: Outcome | None = None
    # Possible duplicates recorded for the recipient so far (this claim's included).
    ambiguous: int = 0

    @property
    def must_send(self) -> bool:
        return self.state in (ClaimState.FRESH, ClaimState.UNSETTLED)


@dataclass(frozen=True)
class LedgerEntry:
    campaign_id: str
    contact_id: str
    tenant_id: str
    message_id: str
    attempt: int = 1
    # The campaign was cancelled: look up, never start a new attempt.
    cancelled: bool = False

    @property
    def key(self) -> LedgerKey:
        return (self.campaign_id, self.contact_id)


def judge_claim(
    row: LedgerRow | None, attempt: int, *, cancelled: bool = False
) -> tuple[Claim, LedgerRow | None]:
    """The verdict of claiming `attempt` on `row` (None: no row), and the row to write back
    (None: leave it as it is). Pure."""
    if row is None or (row.claims == 0 and row.status == "claimed"):
        if cancelled:
            return Claim(ClaimState.SKIPPED), None
        fresh = LedgerRow("claimed", 1, 0 if row is None else row.attempts, 0, True)
        return Claim(ClaimState.FRESH), fresh
    if row.status in ("sent", "failed"):
        return Claim(ClaimState.SETTLED, row.recorded, row.ambiguous), replace(row, claims=row.claims + 1)
    if cancelled:
        if row.in_flight:
            # The claimed attempt may have reached the inbox before its sender died.
            after = replace(row, ambiguous=row.ambiguous + 1, in_flight=False)
            return Claim(ClaimState.SKIPPED, ambiguous=after.ambiguous), after
        return Claim(ClaimState.SKIPPED, ambiguous=row.ambiguous), None
    if row.attempts >= attempt:
        if row.attempts == attempt and not row.in_flight:
            return Claim(ClaimState.DEFERRED, row.recorded, row.ambiguous), None
        return Claim(ClaimState.STALE, ambiguous=row.ambiguous), None
    if row.in_flight:
        after = replace(row, claims=row.claims + 1, ambiguous=row.ambiguous + 1)
        return Claim(ClaimState.UNSETTLED, ambiguous=after.ambiguous), after
    after = replace(row, claims=row.claims + 1, in_flight=True)
    return Claim(ClaimState.FRESH, ambiguous=row.ambiguous), after


class SendLedger:
    """Claims and settlements of one sender process, over its own connection."""

    def __init__(self, database_url: str) -> None:
        # Autocommit: settle is one statement; claim opens its own transaction.
        self._conn = psycopg.connect(database_url, autocommit=True)

    def claim(self, entries: Sequence[LedgerEntry]) -> dict[LedgerKey, Claim]:
        """Claim distinct recipients; what each one's history says to do now."""
        if not entries:
            return {}
        ordered = sorted(entries, key=lambda e: e.key)
        new = [e for e in ordered if not e.cancelled]
        verdicts: dict[LedgerKey, Claim] = {}
        writes: list[tuple[str, str, int, int, bool]] = []
        with self._conn.transaction():
            if new:
                self._conn.execute(_INSERT_NEW, _rows(
                ("c", "k", "t", "m"),
                ((e.campaign_id, e.contact_id, e.tenant_id, e.message_id) for e in new)))
            rows = self._conn.execute(_LOCK, _rows(("c", "k"), (e.key for e in ordered))).fetchall()
            current = {(r[0], r[1]): _row(r) for r in rows}
            for entry in ordered:
                claim, after = judge_claim(current.get(entry.key), entry.attempt,
                                           cancelled=entry.cancelled)
                verdicts[entry.key] = claim
                if after is not None:
                    writes.append((*entry.key, after.claims, after.ambiguous, after.in_flight))
            if writes:
                self._conn.execute(_WRITE_CLAIMS, _rows(_CLAIM_FIELDS, writes))
        return verdicts

    def settle(self, outcomes: Mapping[LedgerKey, Outcome]) -> None:
        """Record the outcome of every claimed recipient that was tried (or held back)."""
        rows = [
            (
                campaign_id,
                contact_id,
                _SETTLED_AS.get(o.status, "held"),
                o.attempt,
                o.ambiguous,
                o.smtp_code,
                o.detail if o.status is Status.SENT else None,
                None if o.status is Status.SENT else o.detail,
                o.permanent if o.status is Status.FAILED else None,
            )
            for (campaign_id, contact_id), o in outcomes.items()
        ]
        if rows:
            self._conn.execute(_SETTLE, _rows(_SETTLE_FIELDS, rows))

    def close(self) -> None:
        self._conn.close()


def _rows(fields: tuple[str, ...], rows: Iterable[tuple[Any, ...]]) -> tuple[str]:
    """Rows -> the one JSON parameter json_to_recordset() reads. One text parameter instead of
    one array per column: psycopg adapts arrays value by value in Python (about 30 us of
    sender CPU per recipient over claim and settle), json.dumps does it in C."""
    return (json.dumps([dict(zip(fields, row, strict=True)) for row in rows]),)


def _row(r: tuple[Any, ...]) -> LedgerRow:
    _, _, status, claims, attempts, ambiguous, in_flight, code, reply, reason, permanent = r
    return LedgerRow(status, claims, attempts, ambiguous, bool(in_flight) and claims > 0,
                     code, reply, reason, permanent)
