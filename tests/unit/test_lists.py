"""Lists as entities and what a deletion does to sends and duplicates: pure rules, no I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TypedDict

import pytest

from schemas.commands import CreateCampaign, DuplicateCampaign, ScheduleCampaign, SendCampaign
from schemas.events import AudienceSegment, CampaignCreated, CampaignScheduleMissed
from schemas.lists import (
    ContactList,
    CreateList,
    DeleteList,
    ListCreated,
    ListDeleted,
    ListRejected,
    ListRenamed,
    RenameList,
    decide_list,
    evolve_list,
    lists_in,
)
from schemas.segments import parse_criteria
from services.command_handler.campaign import Campaign, Rejected, ScheduleDue, decide, evolve


class Ids(TypedDict):
    campaign_id: str
    tenant_id: str


IDS: Ids = {"campaign_id": "c1", "tenant_id": "acme"}


def fold_list(*commands) -> ContactList | None:
    state = None
    for command in commands:
        for event in decide_list(state, command):
            state = evolve_list(state, event)
    return state


def test_a_list_is_created_renamed_and_deleted_for_good():
    created = fold_list(CreateList(list_id="news", name="News"))
    assert created == ContactList("news", "News")
    assert decide_list(created, RenameList(list_id="news", name="Weekly")) == [
        ListRenamed(list_id="news", name="Weekly")]
    assert decide_list(created, RenameList(list_id="news", name="News")) == []  # no change
    assert decide_list(created, DeleteList(list_id="news")) == [ListDeleted(list_id="news")]
    gone = fold_list(CreateList(list_id="news", name="News"), DeleteList(list_id="news"))
    assert gone == ContactList("news", "News", deleted=True)
    with pytest.raises(ListRejected, match="already exists"):
        decide_list(created, CreateList(list_id="news", name="Again"))
    # A deleted list's id is not reused: its memberships would come back.
    with pytest.raises(ListRejected, match="not reused"):
        decide_list(gone, CreateList(list_id="news", name="Again"))
    for command in (RenameList(list_id="news", name="x"), DeleteList(list_id="news")):
        with pytest.raises(ListRejected, match="unknown list"):
            decide_list(None, command)
        with pytest.raises(ListRejected, match="unknown list"):
            decide_list(gone, command)


def test_list_names_are_one_line_of_text():
    with pytest.raises(ValueError):
        CreateList(list_id="news", name="News\nBcc: x")
    with pytest.raises(ValueError):
        CreateList(list_id="news", name="")
    assert evolve_list(None, ListCreated(list_id="n", name="N")) == ContactList("n", "N")


def test_lists_tested_anywhere_in_segment_criteria():
    criteria = parse_criteria({"op": "all", "conditions": [
        {"op": "in_list", "list_id": "a"},
        {"op": "not", "condition": {"op": "any", "conditions": [
            {"op": "in_list", "list_id": "b"}, {"op": "eq", "field": "email", "value": "x"}]}},
    ]})
    assert sorted(lists_in(criteria)) == ["a", "b"]


def draft() -> Campaign:
    create = CreateCampaign(name="Spring", subject="Hello", from_address="news@example.com",
                            body_text="Hi", body_html="<p>Hi</p>", track_opens=True)
    [event] = decide(None, create, **IDS)
    state = evolve(None, event, **IDS)
    assert state is not None
    return state


@pytest.mark.parametrize("send", [
    SendCampaign(list_ids=["gone", "kept"]),
    SendCampaign(list_ids=["kept"], exclude_list_ids=["gone"]),
    SendCampaign(segment_ids=["s1"]),
])
def test_a_send_naming_a_deleted_list_is_rejected(send):
    segment = AudienceSegment(segment_id="s1",
                              criteria=parse_criteria({"op": "in_list", "list_id": "gone"}))
    with pytest.raises(Rejected, match="deleted list.*gone"):
        decide(draft(), send, segments={"s1": segment}, deleted_lists={"gone"}, **IDS)
    with pytest.raises(Rejected, match="deleted list"):
        decide(draft(), ScheduleCampaign(send_at=datetime.now(UTC), send=send),
               segments={"s1": segment}, deleted_lists={"gone"}, **IDS)
    # Other deleted lists do not matter.
    assert decide(draft(), send, segments={"s1": segment}, deleted_lists={"other"}, **IDS)


def test_a_schedule_whose_list_was_deleted_is_missed_with_the_reason():
    at = datetime(2030, 1, 1, tzinfo=UTC)
    send = SendCampaign(list_ids=["news"])
    [scheduled] = decide(draft(), ScheduleCampaign(send_at=at, send=send), **IDS)
    state = evolve(draft(), scheduled, **IDS)
    [missed] = decide(state, ScheduleDue(at + timedelta(seconds=1)), deleted_lists={"news"},
                      **IDS)
    assert isinstance(missed, CampaignScheduleMissed)
    assert "deleted list(s): news" in missed.reason


def test_a_duplicate_is_a_new_draft_with_the_sources_content_and_tracking():
    source = draft()
    [copy] = decide(None, DuplicateCampaign(source_campaign_id="c1"), source=source,
                    campaign_id="c2", tenant_id="acme")
    assert copy == CampaignCreated(name="Spring (copy)", template=source.template,
                                   track_opens=True, track_clicks=False)
    [named] = decide(None, DuplicateCampaign(source_campaign_id="c1", name="Autumn"),
                     source=source, campaign_id="c2", tenant_id="acme")
    assert isinstance(named, CampaignCreated) and named.name == "Autumn"
    long_name = evolve(None, CampaignCreated(name="x" * 200, template=source.template),
                       campaign_id="c3", tenant_id="acme")
    [trimmed] = decide(None, DuplicateCampaign(source_campaign_id="c3"), source=long_name,
                       campaign_id="c4", tenant_id="acme")
    assert isinstance(trimmed, CampaignCreated) and len(trimmed.name) == 200


def test_a_duplicate_of_an_unknown_or_foreign_campaign_or_onto_an_existing_one_is_rejected():
    source = draft()
    command = DuplicateCampaign(source_campaign_id="c1")
    with pytest.raises(Rejected, match="unknown campaign 'c1'"):
        decide(None, command, source=None, campaign_id="c2", tenant_id="acme")
    with pytest.raises(Rejected, match="unknown campaign 'c1'"):
        decide(None, command, source=source, campaign_id="c2", tenant_id="other")
    with pytest.raises(Rejected, match="already exists"):
        decide(source, command, source=source, **IDS)
