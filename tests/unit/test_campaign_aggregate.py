"""The Campaign aggregate: decide/evolve rules, without I/O."""

from __future__ import annotations

import pytest

from schemas.commands import CancelCampaign, CreateCampaign, SendCampaign
from schemas.events import CampaignCancelled, CampaignCreated, CampaignSendRequested
from services.command_handler.campaign import Campaign, Rejected, Status, decide, evolve

CREATE = CreateCampaign(name="Spring", subject="Hello {{ first_name }}", from_address="news@example.com",
                        body_text="Hi")
IDS = {"campaign_id": "c1", "tenant_id": "acme"}


def fold(*commands):
    state: Campaign | None = None
    for command in commands:
        for event in decide(state, command, contacts_snapshot={0: 5}, **IDS):
            state = evolve(state, event, **IDS)
    return state


def test_create_makes_a_draft_with_the_template():
    events = decide(None, CREATE, **IDS)
    assert len(events) == 1 and isinstance(events[0], CampaignCreated)
    state = evolve(None, events[0], **IDS)
    assert state is not None and state.status is Status.DRAFT
    assert state.template.subject == "Hello {{ first_name }}"


def test_create_twice_is_rejected():
    with pytest.raises(Rejected, match="already exists"):
        decide(fold(CREATE), CREATE, **IDS)


def test_send_carries_audience_and_snapshot():
    state = fold(CREATE)
    events = decide(state, SendCampaign(contact_ids=["b", "a", "a"], list_ids=["l1"]),
                    contacts_snapshot={0: 7, 1: 3}, **IDS)
    [event] = events
    assert isinstance(event, CampaignSendRequested)
    assert event.audience.contact_ids == ["a", "b"]
    assert event.contacts_snapshot == {0: 7, 1: 3}
    assert evolve(state, event, **IDS).status is Status.SENDING


def test_send_with_empty_audience_is_rejected():
    with pytest.raises(Rejected, match="empty audience"):
        decide(fold(CREATE), SendCampaign(), **IDS)


def test_send_unknown_campaign_is_rejected():
    with pytest.raises(Rejected, match="unknown campaign"):
        decide(None, SendCampaign(list_ids=["l"]), **IDS)


def test_send_twice_is_rejected():
    state = fold(CREATE, SendCampaign(list_ids=["l"]))
    with pytest.raises(Rejected, match="is sending, not draft"):
        decide(state, SendCampaign(list_ids=["l"]), **IDS)


def test_other_tenant_sees_unknown_campaign():
    state = fold(CREATE)
    with pytest.raises(Rejected, match="unknown campaign"):
        decide(state, SendCampaign(list_ids=["l"]), campaign_id="c1", tenant_id="intruder")


def test_cancel_then_cancel_again():
    state = fold(CREATE, CancelCampaign(reason="typo"))
    assert state.status is Status.CANCELLED
    with pytest.raises(Rejected, match="already cancelled"):
        decide(state, CancelCampaign(), **IDS)
    with pytest.raises(Rejected, match="cancelled, not draft"):
        decide(state, SendCampaign(list_ids=["l"]), **IDS)


def test_evolve_ignores_foreign_events_before_creation():
    assert evolve(None, CampaignCancelled(), **IDS) is None
