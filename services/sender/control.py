"""Campaign control as every sender sees it: which campaigns are paused or cancelled.

`ControlBoard` folds CampaignPaused / CampaignResumed / CampaignCancelled / CampaignCompleted
(pure `next_control`, thread-safe board). `ControlFeed` keeps a board up to date from all of
campaign.events on a background thread (see feeds.TopicFeed for what every instance reads
and when it has caught up): a sender that waits for it never mails a recipient of a campaign
paused or cancelled before it started, and sees later changes within about FEED_WAIT_MS.

Cancellation is final: a resume after a cancel does not revive the campaign.
"""

from __future__ import annotations

import enum
import threading

import structlog
from confluent_kafka import Message

from schemas.base import Record
from schemas.envelope import SchemaViolation, decode
from schemas.events import CampaignCancelled, CampaignCompleted, CampaignPaused, CampaignResumed
from services.common.settings import Settings
from services.common.topics import EVENTS
from services.sender.feeds import TopicFeed

log = structlog.get_logger("sender.control")


class Control(enum.StrEnum):
    SENDING = "sending"
    PAUSED = "paused"
    CANCELLED = "cancelled"


def next_control(current: Control, event: Record) -> Control:
    """The control state after `event` (events that are not control events change nothing)."""
    if current is Control.CANCELLED:
        return current
    match event:
        case CampaignCancelled():
            return Control.CANCELLED
        case CampaignPaused():
            return Control.PAUSED
        case CampaignResumed() | CampaignCompleted():
            return Control.SENDING
    return current


class ControlBoard:
    """Control state of every campaign that is not simply sending; `version` grows with each
    change, `released` with each campaign leaving PAUSED (resumed or cancelled), so a reader
    can tell cheaply that something changed, or that held recipients may go."""

    def __init__(self) -> None:
        self._states: dict[str, Control] = {}
        self._lock = threading.Lock()
        self.version = 0
        self.released = 0

    def apply(self, campaign_id: str, event: Record) -> bool:
        """Fold one campaign event in; True when the campaign's state changed."""
        with self._lock:
            before = self._states.get(campaign_id, Control.SENDING)
            after = next_control(before, event)
            if after is before:
                return False
            if after is Control.SENDING:
                del self._states[campaign_id]
            else:
                self._states[campaign_id] = after
            self.version += 1
            self.released += before is Control.PAUSED
            return True

    def state(self, campaign_id: str) -> Control:
        with self._lock:
            return self._states.get(campaign_id, Control.SENDING)


class ControlFeed(TopicFeed):
    """All of campaign.events, folded into a ControlBoard (see feeds.TopicFeed)."""

    def __init__(self, settings: Settings, board: ControlBoard) -> None:
        super().__init__(settings, EVENTS, "control")
        self.board = board

    def apply(self, record: Message) -> None:
        try:
            message = decode(record.value())
        except SchemaViolation:
            return  # not a control fact; the events topic has other readers to judge it
        if self.board.apply(message.envelope.aggregate_id, message.payload):
            log.info("campaign control", campaign_id=message.envelope.aggregate_id,
                     control=str(self.board.state(message.envelope.aggregate_id)))
