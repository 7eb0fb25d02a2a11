"""A send naming segments: their criteria are snapshotted into the audience; unknown
segments reject the send; exclusions are carried as given."""

from __future__ import annotations

from typing import Any

import pytest

from schemas.commands import CreateCampaign, SendCampaign
from schemas.events import AudienceSegment, CampaignSendRequested
from schemas.segments import parse_criteria
from services.command_handler.campaign import Campaign, Rejected, decide, evolve

CREATE = CreateCampaign(name="n", subject="s", from_address="news@example.com", body_text="b")
IDS: dict[str, Any] = {"campaign_id": "c1", "tenant_id": "acme"}
PRO = AudienceSegment(segment_id="pro", criteria=parse_criteria({"op": "eq", "field": "attr.plan", "value": "pro"}))
NEW = AudienceSegment(segment_id="new", criteria=parse_criteria(
    {"op": "after", "field": "attr.signup", "value": "30 days ago"}))


def draft() -> Campaign:
    [created] = decide(None, CREATE, **IDS)
    state = evolve(None, created, **IDS)
    assert state is not None
    return state


def test_segments_and_exclusions_are_snapshotted_into_the_audience():
    command = SendCampaign(list_ids=["l2", "l1"], segment_ids=["pro", "pro"], exclude_list_ids=["vip"],
                           exclude_segment_ids=["new"])
    [event] = decide(draft(), command, segments={"pro": PRO, "new": NEW}, **IDS)
    assert isinstance(event, CampaignSendRequested)
    assert event.audience.list_ids == ["l1", "l2"]
    assert event.audience.segments == [PRO]
    assert event.audience.exclude_list_ids == ["vip"]
    assert event.audience.exclude_segments == [NEW]


def test_a_segment_alone_is_an_audience_but_an_unknown_one_is_rejected():
    [event] = decide(draft(), SendCampaign(segment_ids=["pro"]), segments={"pro": PRO}, **IDS)
    assert isinstance(event, CampaignSendRequested)
    with pytest.raises(Rejected, match="unknown segment.*new"):
        decide(draft(), SendCampaign(segment_ids=["pro"], exclude_segment_ids=["new"]), segments={"pro": PRO}, **IDS)
    with pytest.raises(Rejected, match="empty audience"):
        decide(draft(), SendCampaign(exclude_list_ids=["vip"]), **IDS)
