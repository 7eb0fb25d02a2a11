"""Tracking on the wire: the opt-in flags from CreateCampaign to the campaign's state (old
versions upcast), and the tracker's events as it builds them from a hit."""

from __future__ import annotations

import uuid

import pytest
from pydantic import ValidationError

from schemas import registry
from schemas.commands import CreateCampaign
from schemas.contacts import ContactUnsubscribed, contact_key
from schemas.engagement import AgentClass, EmailOpened, LinkClicked
from schemas.envelope import decode, encode, wrap
from schemas.events import CampaignCreated
from services.command_handler.campaign import decide, evolve
from services.engagement.machine import Hit
from services.engagement.tokens import Kind, TrackingClaim
from services.tracker.app import hit_event

V1 = {"name": "Spring", "subject": "Hi", "from_address": "news@example.com", "body_html": "<p>x</p>"}


def test_create_campaign_v1_is_upcast_to_no_tracking() -> None:
    command = registry.load("CreateCampaign", 1, dict(V1))
    assert isinstance(command, CreateCampaign)
    assert (command.track_opens, command.track_clicks) == (False, False)
    created = registry.load("CampaignCreated", 1, {"name": "n", "template": {
        "subject": "s", "from_address": "a@example.com", "body_text": "b"}})
    assert isinstance(created, CampaignCreated) and not created.track_opens


def test_the_flags_travel_from_the_command_to_the_campaign_state() -> None:
    command = CreateCampaign(**V1, track_opens=True, track_clicks=False)
    [event] = decide(None, command, campaign_id="c1", tenant_id="acme")
    assert isinstance(event, CampaignCreated)
    assert (event.track_opens, event.track_clicks) == (True, False)
    state = evolve(None, event, campaign_id="c1", tenant_id="acme")
    assert state is not None and (state.track_opens, state.track_clicks) == (True, False)
    envelope = wrap(command, tenant_id="acme", aggregate_id="c1")
    assert envelope.version == 2 and decode(encode(envelope)).payload == command


def test_a_machine_hit_names_its_reason_and_a_human_one_none() -> None:
    common = {"campaign_id": "c1", "contact_id": "p1", "request_id": uuid.uuid4(), "agent": AgentClass.BROWSER}
    with pytest.raises(ValidationError):
        EmailOpened(**common, machine=True)
    with pytest.raises(ValidationError):
        EmailOpened(**common, machine=False, machine_reason="head_request")
    with pytest.raises(ValidationError):
        LinkClicked(**common, machine=False, link_index=2, links_in_mail=2, url="https://x.example/")


def test_hit_event_builds_the_record_the_tracker_produces() -> None:
    request_id = uuid.uuid4()
    claim = TrackingClaim(Kind.CLICK, "acme", "camp-1", "p-9", 1_800_000_000, 1, 2, "https://x.example/a")
    hit = Hit(Kind.CLICK, "HEAD", "Mozilla/5.0 Chrome/1", "127.0.0.1", 1_800_000_100.5, 1_800_000_000)
    key, value, machine = hit_event(claim, request_id, hit, 10.0)
    message = decode(value)
    assert key == contact_key("acme", "p-9") and machine
    assert message.envelope.id == request_id and message.envelope.tenant_id == "acme"
    assert message.envelope.aggregate_id == "camp-1"
    assert message.envelope.occurred_at.timestamp() == 1_800_000_100.5
    assert message.payload == LinkClicked(
        campaign_id="camp-1", contact_id="p-9", request_id=request_id, agent=AgentClass.BROWSER,
        machine=True, machine_reason="head_request", link_index=1, links_in_mail=2,
        url="https://x.example/a")


def test_contact_unsubscribed_v1_gets_its_campaign_from_a_one_click_reason() -> None:
    one_click = registry.load("ContactUnsubscribed", 1, {
        "contact_id": "c1", "reason": "one-click unsubscribe from campaign cmp-42"})
    assert isinstance(one_click, ContactUnsubscribed) and one_click.campaign_id == "cmp-42"
    for reason in ("", "too many", "one-click unsubscribe from campaign", "asked by phone: "
                   "one-click unsubscribe from campaign cmp-42"):
        other = registry.load("ContactUnsubscribed", 1, {"contact_id": "c1", "reason": reason})
        assert isinstance(other, ContactUnsubscribed) and other.campaign_id is None, reason
    current = ContactUnsubscribed(contact_id="c1", campaign_id="cmp-7")
    assert decode(encode(wrap(current, tenant_id="acme", aggregate_id="c1"))).payload == current
