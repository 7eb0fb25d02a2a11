"""The send ledger: PostgreSQL's record of which recipient was mailed, with what outcome.

Protocol, per batch: `claim` every recipient before its SMTP transaction, `settle` every
outcome after it. Each is one statement, so one transaction, for the whole batch.

Guarantees:
- A claim tells the sender what happened to the recipient before:
  FRESH (never claimed) -> mail it;
  SETTLED (outcome recorded) -> do not mail again, re-publish the recorded outcome, so a
  delivery event lost in a crash between settle and produce is not lost;
  UNSETTLED (claimed, never settled: a sender died or lost its partition mid-send) -> the
  outcome is unknown; the sender mails again and the claim adds 1 to `ambiguous`: the
  recipient may now have two copies. Two senders racing on one recipient during a rebalance
  also land here. (Issue 4 will refine this case.)
- Settling adds the delivery's attempts and its own ambiguous attempts (connection lost
  after the final ".") to the row, so `ambiguous` counts every possible duplicate.
- A database error is raised, never swallowed: the caller must then not commit its Kafka
  offsets, and the redelivered batch meets the ledger state that did get committed.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from services.sender.delivery import Outcome

LedgerKey = tuple[str, str]  # (campaign_id, contact_id)

# Redeliveries of a settled recipient bump `claims` only; an unsettled one is a possible
# duplicate from here on, so it is counted in `ambiguous` at claim time.
_CLAIM = """
INSERT INTO send_ledger AS l (campaign_id, contact_id, tenant_id, message_id)
SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[])
ON CONFLICT (campaign_id, contact_id) DO UPDATE
SET claims = l.claims + 1,
    ambiguous = l.ambiguous + (l.status = 'claimed')::int,
    claimed_at = CASE WHEN l.status = 'claimed' THEN now() ELSE l.claimed_at END
RETURNING l.campaign_id, l.contact_id, l.status, l.claims, l.attempts, l.ambiguous,
          l.smtp_code, l.smtp_reply, l.reason, l.permanent
"""

_SETTLE = """
UPDATE send_ledger AS l
SET status = u.status,
    attempts = l.attempts + u.attempts,
    ambiguous = l.ambiguous + u.ambiguous,
    smtp_code = u.smtp_code,
    smtp_reply = u.smtp_reply,
    reason = u.reason,
    permanent = u.permanent,
    settled_at = now()
FROM unnest(%s::text[], %s::text[], %s::text[], %s::int[], %s::int[], %s::int[], %s::text[],
            %s::text[], %s::bool[])
     AS u(campaign_id, contact_id, status, attempts, ambiguous, smtp_code, smtp_reply, reason,
          permanent)
WHERE l.campaign_id = u.campaign_id AND l.contact_id = u.contact_id
"""


class ClaimState(enum.Enum):
    FRESH = "fresh"
    UNSETTLED = "unsettled"
    SETTLED = "settled"


@dataclass(frozen=True)
class Claim:
    state: ClaimState
    # The recorded outcome, when SETTLED.
    outcome: Outcome | None = None

    @property
    def must_send(self) -> bool:
        return self.state is not ClaimState.SETTLED


@dataclass(frozen=True)
class LedgerEntry:
    campaign_id: str
    contact_id: str
    tenant_id: str
    message_id: str

    @property
    def key(self) -> LedgerKey:
        return (self.campaign_id, self.contact_id)


class SendLedger:
    """Claims and settlements of one sender process, over its own connection."""

    def __init__(self, database_url: str) -> None:
        # Autocommit: each batch statement is its own transaction, committed when it returns.
        self._conn = psycopg.connect(database_url, autocommit=True)

    def claim(self, entries: Sequence[LedgerEntry]) -> dict[LedgerKey, Claim]:
        """Claim distinct recipients; what each one's earlier history says to do."""
        if not entries:
            return {}
        columns = list(zip(*((e.campaign_id, e.contact_id, e.tenant_id, e.message_id)
                             for e in entries), strict=True))
        rows = self._conn.execute(_CLAIM, [list(column) for column in columns]).fetchall()
        return {(row[0], row[1]): _claim_from_row(row) for row in rows}

    def settle(self, outcomes: Mapping[LedgerKey, Outcome]) -> None:
        """Record the outcome of every claimed recipient that was mailed."""
        if not outcomes:
            return
        rows = [
            (
                campaign_id,
                contact_id,
                "sent" if o.sent else "failed",
                o.attempts,
                o.ambiguous,
                o.smtp_code,
                o.detail if o.sent else None,
                None if o.sent else o.detail,
                None if o.sent else o.permanent,
            )
            for (campaign_id, contact_id), o in outcomes.items()
        ]
        self._conn.execute(_SETTLE, [list(column) for column in zip(*rows, strict=True)])

    def close(self) -> None:
        self._conn.close()


def _claim_from_row(row: tuple[Any, ...]) -> Claim:
    _, _, status, claims, attempts, ambiguous, smtp_code, smtp_reply, reason, permanent = row
    if status == "claimed":
        return Claim(ClaimState.FRESH if claims == 1 else ClaimState.UNSETTLED)
    sent = status == "sent"
    outcome = Outcome(
        sent=sent,
        attempts=attempts,
        smtp_code=smtp_code,
        detail=(smtp_reply if sent else reason) or "",
        permanent=bool(permanent),
        ambiguous=ambiguous,
    )
    return Claim(ClaimState.SETTLED, outcome)
