"""Campaign control as senders fold it from campaign.events."""

from __future__ import annotations

from schemas.events import (
    CampaignCancelled,
    CampaignCompleted,
    CampaignHydrated,
    CampaignPaused,
    CampaignResumed,
)
from services.sender.control import Control, ControlBoard, next_control


def test_pause_resume_cancel() -> None:
    assert next_control(Control.SENDING, CampaignPaused()) is Control.PAUSED
    assert next_control(Control.PAUSED, CampaignResumed()) is Control.SENDING
    assert next_control(Control.PAUSED, CampaignCancelled()) is Control.CANCELLED
    assert next_control(Control.SENDING, CampaignHydrated(total=3)) is Control.SENDING


def test_cancel_is_final() -> None:
    for event in (CampaignResumed(), CampaignPaused(), CampaignCompleted(total=1, sent=1, failed=0)):
        assert next_control(Control.CANCELLED, event) is Control.CANCELLED


def test_board_counts_changes_only() -> None:
    board = ControlBoard()
    assert board.apply("c1", CampaignPaused(reason="x"))
    assert not board.apply("c1", CampaignPaused(reason="again"))
    assert board.state("c1") is Control.PAUSED and board.state("c2") is Control.SENDING
    assert board.apply("c1", CampaignResumed())
    assert board.state("c1") is Control.SENDING
    assert board.version == 2 and board.released == 1
    assert board.apply("c2", CampaignCancelled())
    assert board.released == 1  # c2 was not paused: nothing held to release
