"""The Campaign aggregate: decide/evolve rules, without I/O."""

from __future__ import annotations

from typing import TypedDict

import pytest

from schemas.base import Record
from schemas.commands import (
    AutoPauseCampaign,
    CancelCampaign,
    CreateCampaign,
    DuplicateCampaign,
    PauseCampaign,
    ResumeCampaign,
    SendCampaign,
    UpdateCampaign,
)
from schemas.events import (
    AudienceSegment,
    CampaignCancelled,
    CampaignCreated,
    CampaignPaused,
    CampaignResumed,
    CampaignScheduleMissed,
    CampaignSendRequested,
    CampaignUpdated,
)
from services.command_handler.campaign import Campaign, Rejected, Status, decide, evolve

CREATE = CreateCampaign(name="Spring", subject="Hello {{ first_name }}", from_address="news@example.com",
                        body_text="Hi")


class Ids(TypedDict):
    campaign_id: str
    tenant_id: str


IDS: Ids = {"campaign_id": "c1", "tenant_id": "acme"}


def fold(*commands: Record) -> Campaign | None:
    state: Campaign | None = None
    for command in commands:
        for event in decide(state, command, contacts_snapshot={0: 5}, **IDS):
            state = evolve(state, event, **IDS)
    return state


def folded(*commands: Record) -> Campaign:
    """`fold` for a history that creates the campaign."""
    state = fold(*commands)
    assert state is not None
    return state


def evolved(state: Campaign | None, event: Record) -> Campaign:
    new = evolve(state, event, **IDS)
    assert new is not None
    return new


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
    assert evolved(state, event).status is Status.SENDING


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


def test_another_tenants_id_is_refused_for_a_create_without_naming_its_owner():
    state = fold(CREATE)
    assert state is not None
    for create in (CREATE, DuplicateCampaign(source_campaign_id="c0")):
        with pytest.raises(Rejected, match="campaign id 'c1' is not available") as refused:
            decide(state, create, campaign_id="c1", tenant_id="intruder",
                   source=state)
        assert state.tenant_id not in str(refused.value)


def test_cancel_then_cancel_again():
    state = folded(CREATE, CancelCampaign(reason="typo"))
    assert state.status is Status.CANCELLED
    with pytest.raises(Rejected, match="already cancelled"):
        decide(state, CancelCampaign(), **IDS)
    with pytest.raises(Rejected, match="cancelled, not draft"):
        decide(state, SendCampaign(list_ids=["l"]), **IDS)


def test_evolve_ignores_foreign_events_before_creation():
    assert evolve(None, CampaignCancelled(), **IDS) is None


SENDING = (CREATE, SendCampaign(list_ids=["l"]))


def test_pause_and_resume_a_sending_campaign():
    state = fold(*SENDING)
    [paused] = decide(state, PauseCampaign(reason="check the link"), **IDS)
    assert paused == CampaignPaused(reason="check the link", automatic=False)
    state = evolved(state, paused)
    assert state.status is Status.PAUSED
    [resumed] = decide(state, ResumeCampaign(), **IDS)
    assert resumed == CampaignResumed()
    assert evolved(state, resumed).status is Status.SENDING


def test_automatic_pause_says_so():
    [paused] = decide(fold(*SENDING), AutoPauseCampaign(reason="failure rate 60%"), **IDS)
    assert paused == CampaignPaused(reason="failure rate 60%", automatic=True)


@pytest.mark.parametrize(
    ("history", "command", "reason"),
    [
        ((CREATE,), PauseCampaign(), "is draft, not sending"),
        ((*SENDING, PauseCampaign()), PauseCampaign(), "is paused, not sending"),
        ((*SENDING, PauseCampaign()), AutoPauseCampaign(reason="r"), "is paused, not sending"),
        ((*SENDING,), ResumeCampaign(), "is sending, not paused"),
        ((*SENDING, CancelCampaign()), ResumeCampaign(), "is cancelled, not paused"),
        ((*SENDING, CancelCampaign()), PauseCampaign(), "is cancelled, not sending"),
        ((), PauseCampaign(), "unknown campaign"),
    ],
)
def test_pause_and_resume_are_refused_out_of_turn(history, command, reason):
    with pytest.raises(Rejected, match=reason):
        decide(fold(*history), command, **IDS)


def test_a_paused_campaign_can_be_cancelled_and_stays_cancelled():
    state = folded(*SENDING, PauseCampaign(), CancelCampaign(reason="wrong list"))
    assert state.status is Status.CANCELLED
    # A stray resume event on the log does not revive it.
    assert evolved(state, CampaignResumed()).status is Status.CANCELLED


def test_schedule_fires_when_due_within_its_grace():
    from datetime import UTC, datetime, timedelta

    from schemas.commands import ScheduleCampaign
    from schemas.events import CampaignScheduled
    from services.command_handler.campaign import ScheduleDue, send_order

    at = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
    send = SendCampaign(list_ids=["l1"])
    state = fold(CREATE)
    [scheduled] = decide(state, ScheduleCampaign(send_at=at, send=send, grace_seconds=600), **IDS)
    assert scheduled == CampaignScheduled(send_at=at, grace_seconds=600, send=send)
    state = evolved(state, scheduled)
    assert state.status is Status.SCHEDULED and send_order(state, ScheduleDue(at)) == send
    assert decide(state, ScheduleDue(at - timedelta(seconds=1)), **IDS) == []
    [fired] = decide(state, ScheduleDue(at + timedelta(seconds=600)), contacts_snapshot={0: 9}, **IDS)
    assert isinstance(fired, CampaignSendRequested) and fired.audience.list_ids == ["l1"]
    assert fired.contacts_snapshot == {0: 9}
    state = evolved(state, fired)
    assert state.status is Status.SENDING and state.schedule is None
    assert decide(state, ScheduleDue(at + timedelta(seconds=5)), **IDS) == []  # fires once


def test_a_schedule_found_late_is_reported_missed_and_can_be_forced():
    from datetime import UTC, datetime, timedelta

    from schemas.commands import ForceScheduledSend, ScheduleCampaign
    from services.command_handler.campaign import ScheduleDue

    at = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
    state = fold(CREATE, ScheduleCampaign(send_at=at, send=SendCampaign(list_ids=["l"]),
                                          grace_seconds=60))
    late = at + timedelta(hours=2)
    [missed] = decide(state, ScheduleDue(late), **IDS)
    assert missed == CampaignScheduleMissed(send_at=at, noticed_at=late,
                                            reason="found 7200 s late, grace 60 s")
    state = evolve(state, missed, **IDS)
    assert decide(state, ScheduleDue(late + timedelta(seconds=1)), **IDS) == []  # reported once
    with pytest.raises(Rejected, match="is scheduled, not draft"):
        decide(state, SendCampaign(list_ids=["l"]), **IDS)
    [forced] = decide(state, ForceScheduledSend(), **IDS)
    assert isinstance(forced, CampaignSendRequested)
    with pytest.raises(Rejected, match="is draft, not scheduled"):
        decide(fold(CREATE), ForceScheduledSend(), **IDS)


def test_a_schedule_with_an_invalid_audience_is_refused_or_reported():
    from datetime import UTC, datetime

    from schemas.commands import ScheduleCampaign
    from services.command_handler.campaign import ScheduleDue

    at = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
    with pytest.raises(Rejected, match="unknown segment"):
        decide(fold(CREATE), ScheduleCampaign(send_at=at, send=SendCampaign(segment_ids=["gone"])),
               **IDS)
    # Valid when scheduled, invalid when due (the segment was deleted): reported, not sent.
    state = fold(CREATE)
    state = evolve(state, decide(state, ScheduleCampaign(send_at=at, send=SendCampaign(
        list_ids=["l"], exclude_segment_ids=["s1"])), segments={"s1": _segment("s1")}, **IDS)[0],
        **IDS)
    [missed] = decide(state, ScheduleDue(at), segments={}, **IDS)
    assert isinstance(missed, CampaignScheduleMissed) and "unknown segment" in missed.reason
    state = fold(CREATE, CancelCampaign())
    assert decide(state, ScheduleDue(at), **IDS) == []


def _segment(segment_id: str) -> AudienceSegment:
    from schemas.segments import parse_criteria

    return AudienceSegment(segment_id=segment_id,
                           criteria=parse_criteria({"op": "eq", "field": "attr.plan", "value": "pro"}))


SEND = SendCampaign(contact_ids=["k1"])


def test_an_update_changes_only_the_fields_it_gives():
    state = folded(CREATE, UpdateCampaign(subject="New subject", track_clicks=True))
    assert state.template.subject == "New subject"
    assert (state.name, state.template.body_text, state.template.from_address) == (
        "Spring", "Hi", "news@example.com")
    assert (state.track_opens, state.track_clicks) == (False, True)
    # The send carries the edited tracking to every recipient through the template.
    [send] = decide(state, SendCampaign(contact_ids=["k1"]), contacts_snapshot={}, **IDS)
    assert isinstance(send, CampaignSendRequested)
    assert (send.template.track_opens, send.template.track_clicks) == (False, True)


def test_an_update_carries_the_whole_content_and_the_send_takes_it():
    state = folded(CREATE, UpdateCampaign(name="Summer", body_html="<p>Hi</p>", body_text=""))
    [send] = decide(state, SEND, contacts_snapshot={}, **IDS)
    assert isinstance(send, CampaignSendRequested)
    assert (send.template.body_text, send.template.body_html) == (None, "<p>Hi</p>")
    [event] = decide(folded(CREATE), UpdateCampaign(name="Summer"), **IDS)
    assert isinstance(event, CampaignUpdated)
    assert event.template == folded(CREATE).template and event.name == "Summer"


def test_an_update_that_removes_the_last_body_is_rejected():
    with pytest.raises(Rejected, match="needs body_text, body_html or both"):
        decide(folded(CREATE), UpdateCampaign(body_text=""), **IDS)


def test_an_update_is_rejected_once_sending_started():
    state = folded(CREATE, SEND)
    with pytest.raises(Rejected, match="fixed once sending starts"):
        decide(state, UpdateCampaign(subject="Too late"), **IDS)
    with pytest.raises(Rejected, match="unknown campaign"):
        decide(None, UpdateCampaign(subject="Nothing"), **IDS)


def test_an_update_that_changes_nothing_is_invalid():
    with pytest.raises(ValueError, match="nothing to change"):
        UpdateCampaign()
