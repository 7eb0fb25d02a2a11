"""What a schedule became, as the API and the CLI show it, and what the aggregate answers a
send of a campaign whose schedule was missed: pure rules, no I/O."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import TypedDict

import pytest
from rich.console import Console

from projections.queries import CampaignProgress
from projections.schedules import CampaignSchedule, schedule_state
from schemas.commands import CreateCampaign, ForceScheduledSend, ScheduleCampaign, SendCampaign
from services.api.gateway import CommandStatus, Schedule, is_settled
from services.cli.progress import missed_message, render_campaign
from services.command_handler.campaign import Rejected, ScheduleDue, decide, evolve

AT = datetime(2030, 3, 1, 9, 0, tzinfo=UTC)
LATER = AT + timedelta(hours=2)


class Ids(TypedDict):
    campaign_id: str
    tenant_id: str


IDS: Ids = {"campaign_id": "c1", "tenant_id": "acme"}
CREATE = CreateCampaign(name="Spring", subject="Hi", from_address="news@example.com", body_text="Hi")


@pytest.mark.parametrize(("missed_at", "started_at", "cancelled_at", "state"), [
    (None, None, None, "scheduled"),
    (LATER, None, None, "missed"),
    (None, AT, None, "fired"),
    (LATER, LATER, None, "fired"),        # forced after the miss
    (None, None, LATER, "cancelled"),
    (LATER, None, LATER, "cancelled"),    # missed, then dropped
    (None, AT, LATER, "fired"),           # it did fire; the cancel came later
])
def test_a_schedule_state_follows_from_the_facts(missed_at, started_at, cancelled_at, state):
    assert schedule_state(missed_at=missed_at, started_at=started_at,
                          cancelled_at=cancelled_at) == state


def _scheduled(grace=60):
    state = None
    for command in (CREATE, ScheduleCampaign(send_at=AT, send=SendCampaign(list_ids=["l"]),
                                             grace_seconds=grace)):
        for event in decide(state, command, **IDS):
            state = evolve(state, event, **IDS)
    return state


def test_a_send_of_a_campaign_whose_schedule_was_missed_says_why_and_what_sends_it():
    state = _scheduled()
    [missed] = decide(state, ScheduleDue(LATER), **IDS)
    state = evolve(state, missed, **IDS)
    for command in (SendCampaign(list_ids=["l"]),
                    ScheduleCampaign(send_at=LATER, send=SendCampaign(list_ids=["l"]))):
        with pytest.raises(Rejected) as refused:
            decide(state, command, **IDS)
        reason = str(refused.value)
        assert "is scheduled, not draft" in reason
        assert "was missed (found 7200 s late, grace 60 s)" in reason
        assert "ForceScheduledSend" in reason and AT.isoformat() in reason
    assert decide(state, ForceScheduledSend(), contacts_snapshot={0: 1}, **IDS)


def test_a_send_of_a_pending_schedule_is_refused_without_a_miss_in_the_reason():
    with pytest.raises(Rejected) as refused:
        decide(_scheduled(), SendCampaign(list_ids=["l"]), **IDS)
    assert str(refused.value) == "campaign 'c1' is scheduled, not draft"


def _show(schedule: CampaignSchedule | None) -> str:
    progress = CampaignProgress(tenant_id="acme", campaign_id="c1", name="Spring", status="draft",
                                total=None, queued=0, sent=0, failed=0, pending=None,
                                started_at=None, completed_at=None)
    console = Console(record=True, width=200)
    console.print(render_campaign(progress, schedule))
    return console.export_text()


def test_show_prints_the_schedule_its_state_the_reason_and_how_to_send_it():
    missed = CampaignSchedule("c1", AT, "missed", LATER, "found 7200 s late, grace 60 s")
    text = _show(missed)
    for expected in ("scheduled for", "2030-03-01T09:00:00+00:00", "missed",
                     "found 7200 s late, grace 60 s", "campaignctl campaign force-send c1"):
        assert expected in text
    assert "scheduled for" not in _show(None)
    pending = _show(CampaignSchedule("c1", AT, "scheduled", None, None))
    assert "missed because" not in pending and "force-send" not in pending
    assert missed_message(missed) == (
        "schedule of c1 for 2030-03-01T09:00:00+00:00 missed: found 7200 s late, grace 60 s;"
        " `campaignctl campaign force-send c1` sends it now")


def _status(status: str, schedule_state_: str | None) -> CommandStatus:
    schedule = None if schedule_state_ is None else Schedule(
        send_at=AT, state=schedule_state_, missed_at=None, reason=None)
    return CommandStatus(command_id=uuid.uuid4(), status=status, type="ScheduleCampaign",
                         aggregate_id="c1", accepted_at=None, published_at=None, events=[],
                         reason=None, schedule=schedule)


@pytest.mark.parametrize(("status", "schedule", "settled"), [
    ("published", None, False), ("accepted", None, True), ("rejected", None, True),
    ("accepted", "scheduled", False), ("accepted", "missed", True), ("accepted", "fired", True),
    ("accepted", "cancelled", True),
])
def test_a_command_is_settled_once_its_schedule_is_no_longer_waiting(status, schedule, settled):
    assert is_settled(_status(status, schedule)) is settled
