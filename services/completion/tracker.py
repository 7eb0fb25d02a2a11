"""Which campaigns are complete, and which fail too often: pure bookkeeping, no I/O.

A campaign is complete when it is hydrated (its `total` is known), not cancelled, and `total`
distinct recipients have a terminal delivery (EmailSent, EmailFailed or RecipientSkipped;
EmailDeferred is not terminal). A recipient counts once, by its first terminal delivery:
duplicates (a sender re-publishing after a crash) never count twice, and deliveries read
before the CampaignHydrated count as soon as it arrives. A total of 0 completes on hydration.
A CampaignCompleted already on the log marks the campaign done, so it is never decided twice;
a cancelled campaign is never completed here (its end is the cancellation; the recipients it
left end as RecipientSkipped("cancelled")).

Failure-rate guard: once at least `min_deliveries` recipients of a campaign were sent or
failed and the failed share exceeds `failure_rate`, the tracker decides an `AutoPause` (once
per campaign; a person who resumes it has the last word). Deterministic in the facts read, so
a replay decides it at the same fact, and drops it like any decision already published.

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
    RecipientSkipped,
)

TerminalStatus = Literal["sent", "failed", "skipped"]


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
    skipped: int = 0
    cancelled: bool = False
    completed: bool = False
    # The failure-rate guard asked for a pause already (never twice).
    pause_requested: bool = False

    @property
    def done(self) -> bool:
        """Nothing can change any more: completed (decided or seen on the log) or cancelled."""
        return self.completed or self.cancelled

    def is_complete(self) -> bool:
        return (
            not self.done and self.total is not None
            and self.sent + self.failed + self.skipped >= self.total
        )


@dataclass(frozen=True, slots=True)
class Completion:
    """A decision: publish this CampaignCompleted, caused by the event `causation_id`."""

    tenant_id: str
    campaign_id: str
    event: CampaignCompleted
    correlation_id: uuid.UUID
    causation_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class AutoPause:
    """A decision: ask the command handler to pause this campaign (AutoPauseCampaign)."""

    tenant_id: str
    campaign_id: str
    reason: str
    correlation_id: uuid.UUID
    causation_id: uuid.UUID


Decision = Completion | AutoPause


@dataclass(frozen=True)
class FailureGuard:
    """When a campaign fails too often to go on: more than `failure_rate` of at least
    `min_deliveries` sent-or-failed recipients failed. `failure_rate` None: never."""

    # Too few deliveries say nothing about a campaign: a handful of bad addresses must not
    # stop it.
    min_deliveries: int = 100
    failure_rate: float | None = 0.5

    def trips(self, sent: int, failed: int) -> bool:
        attempted = sent + failed
        return (self.failure_rate is not None and attempted >= self.min_deliveries
                and failed > self.failure_rate * attempted)


class CompletionTracker:
    """Progress of the campaigns of one partition number of campaign.events and
    campaign.deliveries (both keyed by campaign id, so a campaign's facts share it).

    `apply` folds one decoded message in and returns a Completion the first time the campaign
    becomes complete, never again. Replaying the log into a fresh tracker (and dropping the
    returned completions, which were published before) rebuilds the same state.
    """

    def __init__(self, guard: FailureGuard | None = None) -> None:
        self.guard = guard or FailureGuard()
        self.campaigns: dict[str, CampaignProgress] = {}
        # Facts refused because their campaign belongs to another tenant.
        self.dropped = 0

    def apply(self, message: Message[Record]) -> Decision | None:
        env, payload = message.envelope, message.payload
        if isinstance(payload, EmailSent | EmailFailed | RecipientSkipped):
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
            status: TerminalStatus = (
                "sent" if isinstance(payload, EmailSent)
                else "failed" if isinstance(payload, EmailFailed) else "skipped"
            )
            if payload.contact_id in progress.outcomes:
                return None  # this recipient was counted before: a duplicate changes nothing
            progress.outcomes[payload.contact_id] = status
            if status == "sent":
                progress.sent += 1
            elif status == "failed":
                progress.failed += 1
            else:
                progress.skipped += 1

        if not progress.is_complete():
            return self._guard(progress, campaign_id, env.id, env.correlation_id)
        assert progress.total is not None
        completion = Completion(
            tenant_id=progress.tenant_id,
            campaign_id=campaign_id,
            event=CampaignCompleted(
                total=progress.total, sent=progress.sent, failed=progress.failed,
                skipped=progress.skipped,
            ),
            correlation_id=progress.correlation_id or env.correlation_id,
            causation_id=env.id,
        )
        self._finish(progress, completed=True)
        return completion

    def _guard(self, progress: CampaignProgress, campaign_id: str, cause: uuid.UUID,
               correlation: uuid.UUID) -> AutoPause | None:
        if progress.pause_requested or not self.guard.trips(progress.sent, progress.failed):
            return None
        progress.pause_requested = True
        attempted = progress.sent + progress.failed
        reason = (f"failure rate {progress.failed / attempted:.0%} of {attempted} deliveries "
                  f"exceeds {self.guard.failure_rate:.0%}")
        return AutoPause(progress.tenant_id, campaign_id, reason,
                         progress.correlation_id or correlation, cause)

    @staticmethod
    def _finish(progress: CampaignProgress, *, completed: bool) -> None:
        if completed:
            progress.completed = True
        else:
            progress.cancelled = True
        progress.outcomes = {}
