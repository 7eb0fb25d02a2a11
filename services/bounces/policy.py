"""When a bounce or complaint suppresses its contact: pure rules, no I/O.

- A complaint, and a hard bounce, suppress (ContactSuppressed complaint / hard_bounce).
- Soft bounces suppress when the contact's last `limit` campaigns in a row soft-bounced
  (`soft_bounce_streak` over the contact's history; several soft bounces of one campaign,
  e.g. a delay warning and the final failure, count once; an engagement, or a campaign
  delivered without a bounce, ends the streak). The suppression's reason is hard_bounce (the
  contact schema's reasons are fixed), its detail says "N soft bounces in a row".
- A recipient found only from the returned original's unsigned headers does not suppress
  unless trusted by configuration: anyone can write those headers, and a suppression is
  not undone by itself.

Where the history lives is left to the caller (see services/bounces/receiver.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from schemas.contacts import SuppressionReason

Outcome = Literal["soft_bounce", "hard_bounce", "complaint", "delivered", "engaged"]


@dataclass(frozen=True, slots=True)
class ContactOutcome:
    """One fact of a contact's history: what happened to a campaign's mail to it."""

    at: datetime
    campaign_id: str
    outcome: Outcome


def soft_bounce_streak(history: Iterable[ContactOutcome]) -> int:
    """Distinct campaigns whose mail soft-bounced in a row, counted back from the latest
    fact; a campaign that was delivered or engaged with (and had no bounce) ends it."""
    per_campaign: dict[str, tuple[datetime, set[str]]] = {}
    for fact in history:
        first, outcomes = per_campaign.get(fact.campaign_id, (fact.at, set()))
        per_campaign[fact.campaign_id] = (min(first, fact.at), outcomes | {fact.outcome})
    streak = 0
    for _, outcomes in sorted(per_campaign.values(), key=lambda entry: entry[0], reverse=True):
        if "engaged" in outcomes or outcomes <= {"delivered"}:
            break
        if "soft_bounce" in outcomes:
            streak += 1
    return streak


def suppression(kind: Literal["hard", "soft", "complaint"], *, trusted: bool, streak: int = 0,
                soft_limit: int = 0) -> tuple[SuppressionReason, str] | None:
    """(reason, detail) of the ContactSuppressed a report leads to, or None. `streak` counts
    the report itself (see soft_bounce_streak); soft_limit 0 never suppresses soft bounces."""
    if not trusted:
        return None
    if kind == "complaint":
        return "complaint", "complaint"
    if kind == "hard":
        return "hard_bounce", "hard bounce"
    if soft_limit > 0 and streak >= soft_limit:
        return "hard_bounce", f"{streak} soft bounces in a row"
    return None
