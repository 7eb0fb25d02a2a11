"""Which campaigns are complete: pure per-campaign bookkeeping, no I/O.

A campaign is complete when it is hydrated (its `total` is known), not cancelled, and `total`
distinct recipients have a terminal delivery (EmailSent or EmailFailed). A recipient counts
once, by its first terminal delivery: duplicates (a sender re-publishing after a crash) never
count twice, and deliveries read before the CampaignHydrated count as soon as it arrives. A
total of 0 completes on hydration. A CampaignCompleted already on the log marks the campaign
done, so it is never decided twice; a cancelled campaign is never completed here.

The first tenant to name a campaign id owns it (as in the read models): facts naming the same
campaign under another tenant are ignored.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Literal

from schemas.base import Record
from schemas.envelope import Message
from schemas.events import (
    CampaignCancelled,
    CampaignCompleted,
    CampaignHydrated,
    EmailFailed,
    EmailSent,
)

TerminalStatus = Literal["sent", "failed"]


@dataclass
class CampaignProgress:
    """What the tracker knows of one campaign."""

    tenant_id: str
    # None until CampaignHydrated.
    total: int | None = None
    # The flow of the send (the CampaignHydrated's correlation id), carried on to the completion.
    correlation_id: uuid.UUID | None = None
    # contact id -> first terminal status; emptied once the campaign is done (bounds memory).
    outcomes: dict[str, TerminalStatus] = field(default_factory=dict)
    sent: int = 0
    failed: int = 0
    cancelled: bool = False
    completed: bool = False

    @property
    def done(self) -> bool:
        """Nothing can change any more: completed (decided or seen on the log) or cancelled."""
        return self.completed or self.cancelled

    def is_complete(self) -> bool:
        return (
            not self.done and self.total is not None and self.sent + self.failed >= self.total
        )


@dataclass(frozen=True, slots=True)
class Completion:
    """A decision: publish this CampaignCompleted, caused by the event `causation_id`."""

    tenant_id: str
    campaign_id: str
    event: CampaignCompleted
    correlation_id: uuid.UUID
    causation_id: uuid.UUID


class CompletionTracker:
    """Progress of the campaigns of one partition number of campaign.events and
    campaign.deliveries (both keyed by campaign id, so a campaign's facts share it).

    `apply` folds one decoded message in and returns a Completion the first time the campaign
    becomes complete, never again. Replaying the log into a fresh tracker (and dropping the
    returned completions, which were published before) rebuilds the same state.
    """

    def __init__(self) -> None:
        self.campaigns: dict[str, CampaignProgress] = {}
        # Facts refused because their campaign belongs to another tenant.
        self.dropped = 0

    def apply(self, message: Message[Record]) -> Completion | None:
        env, payload = message.envelope, message.payload
        if isinstance(payload, EmailSent | EmailFailed):
            campaign_id = payload.campaign_id
        elif isinstance(payload, CampaignHydrated | CampaignCancelled | CampaignCompleted):
            campaign_id = env.aggregate_id
        else:
            return None  # other campaign facts do not bear on completion
        progress = self.campaigns.get(campaign_id)
        if progress is None:
            progress = self.campaigns[campaign_id] = CampaignProgress(tenant_id=env.tenant_id)
        elif progress.tenant_id != env.tenant_id:
            self.dropped += 1
            return None
        if progress.done:
            return None

        if isinstance(payload, CampaignCompleted):
            self._finish(progress, completed=True)
            return None
        if isinstance(payload, CampaignCancelled):
            self._finish(progress, completed=False)
            return None
        if isinstance(payload, CampaignHydrated):
            if progress.total is None:  # a repeated hydration does not change the audience
                progress.total = payload.total
                progress.correlation_id = env.correlation_id
        else:
            status: TerminalStatus = "sent" if isinstance(payload, EmailSent) else "failed"
            if payload.contact_id in progress.outcomes:
                return None  # this recipient was counted before: a duplicate changes nothing
            progress.outcomes[payload.contact_id] = status
            if status == "sent":
                progress.sent += 1
            else:
                progress.failed += 1

        if not progress.is_complete():
            return None
        assert progress.total is not None
        completion = Completion(
            tenant_id=progress.tenant_id,
            campaign_id=campaign_id,
            event=CampaignCompleted(
                total=progress.total, sent=progress.sent, failed=progress.failed
            ),
            correlation_id=progress.correlation_id or env.correlation_id,
            causation_id=env.id,
        )
        self._finish(progress, completed=True)
        return completion

    @staticmethod
    def _finish(progress: CampaignProgress, *, completed: bool) -> None:
        if completed:
            progress.completed = True
        else:
            progress.cancelled = True
        progress.outcomes = {}
