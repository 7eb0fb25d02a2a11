"""A send's whole audience path, through the command handler and the hydrator on the real
broker: segments defined by command, a SendCampaign naming lists, segments and contact ids
minus exclusion lists and segments, contacts unsubscribed and suppressed. The recipients on
campaign.recipients and CampaignHydrated's counts are checked against the exact expected set."""

from __future__ import annotations

import uuid
from collections import Counter

import pytest

from schemas.base import normalise_email
from schemas.commands import CreateCampaign, SendCampaign
from schemas.contacts import (
    ContactSuppressed,
    ContactUnsubscribed,
    ContactUpserted,
    contact_id_for,
    contact_key,
)
from schemas.envelope import wrap
from schemas.events import CampaignHydrated, CommandRejected, RecipientExcluded, RecipientQueued
from schemas.segments import ChangeSegment, DefineSegment, parse_criteria
from services.common.topics import COMMANDS, CONTACTS, EVENTS, RECIPIENTS, SEGMENTS
from tests.kafka_io import publish, read_topic
from tests.service_process import ServiceProcess

pytestmark = pytest.mark.integration
TENANT = "acme"


def cid(name):
    return contact_id_for(TENANT, normalise_email(f"{name}@example.com"))


def upsert(name, lists=(), tenant=TENANT, **attributes):
    contact_id = contact_id_for(tenant, normalise_email(f"{name}@example.com"))
    event = ContactUpserted(contact_id=contact_id, email=f"{name}@example.com", lists=list(lists),
                            attributes=attributes)
    return contact_key(tenant, contact_id), wrap(event, tenant_id=tenant, aggregate_id=contact_id)


def fact(name, event):
    return contact_key(TENANT, cid(name)), wrap(event, tenant_id=TENANT, aggregate_id=cid(name))


def command(aggregate, payload):
    return aggregate.encode(), wrap(payload, tenant_id=TENANT, aggregate_id=aggregate)


def test_lists_segments_ids_and_exclusions_resolve_to_the_exact_audience(settings):
    # 40 in list "news" (10 of them also "pro"), 30 outside any list on plan "pro" (the
    # segment), 5 of "news" also in the exclusion list "vip", 5 outside any list who signed
    # up recently (the exclusion segment also matches 3 of the "pro" ones), 2 unsubscribed,
    # 2 suppressed, 1 picked by id, 10 in an untargeted list, 5 of another tenant on "pro".
    contacts = [upsert(f"news{i}", ["news"], plan="pro" if i < 10 else "free") for i in range(40)]
    contacts += [upsert(f"pro{i}", [], plan="pro", signup="2020-01-01" if i >= 3 else "2099-01-01")
                 for i in range(30)]
    contacts += [upsert(f"news{i}", ["news", "vip"], plan="free") for i in range(35, 40)]  # joins vip
    contacts += [upsert(f"other{i}", ["other"]) for i in range(10)]
    contacts += [upsert(f"foreign{i}", ["news"], tenant="globex", plan="pro") for i in range(5)]
    contacts += [fact("news20", ContactUnsubscribed(contact_id=cid("news20"))),
                 fact("pro10", ContactUnsubscribed(contact_id=cid("pro10"))),
                 fact("news21", ContactSuppressed(contact_id=cid("news21"), reason="hard_bounce")),
                 fact("pro11", ContactSuppressed(contact_id=cid("pro11"), reason="complaint"))]
    publish(settings, CONTACTS, contacts)

    campaign, unknown = f"c-{uuid.uuid4().hex[:8]}", f"u-{uuid.uuid4().hex[:8]}"
    create = CreateCampaign(name="n", subject="s", from_address="news@example.com", body_text="b")
    pro = DefineSegment(segment_id="pro", name="Pro plan", criteria=parse_criteria(
        {"op": "eq", "field": "attr.plan", "value": "team"}))
    # Changed before the send: the send must use the new criteria.
    pro_changed = ChangeSegment(segment_id="pro", criteria=parse_criteria(
        {"op": "eq", "field": "attr.plan", "value": "pro"}))
    recent = DefineSegment(segment_id="recent", name="Signed up lately", criteria=parse_criteria(
        {"op": "after", "field": "attr.signup", "value": "30 days ago"}))
    with ServiceProcess("command_handler", settings) as handler, ServiceProcess("hydrator", settings) as hydrator:
        # Each step waits for the handler's answer on segments.events, as a caller would.
        publish(settings, COMMANDS, [command("pro", pro), command("recent", recent)])
        assert len(read_topic(settings, SEGMENTS, until=2, timeout=60)) == 2
        publish(settings, COMMANDS, [command("pro", pro_changed)])
        assert len(read_topic(settings, SEGMENTS, until=3, timeout=60)) == 3
        publish(settings, COMMANDS, [
            command(campaign, create),
            command(campaign, SendCampaign(
                list_ids=["news"], segment_ids=["pro"], contact_ids=[cid("other0")],
                exclude_list_ids=["vip"], exclude_segment_ids=["recent"])),
            command(unknown, create),
            command(unknown, SendCampaign(segment_ids=["missing"])),
        ])
        expected_queued = (
            {cid(f"news{i}") for i in range(35)} - {cid("news20"), cid("news21")}
            | {cid(f"pro{i}") for i in range(3, 30)} - {cid("pro10"), cid("pro11")}
            | {cid("other0")}
        )
        raw_audience = 40 + 30 + 1
        recipients = read_topic(settings, RECIPIENTS, until=raw_audience, timeout=120)
        events = read_topic(settings, EVENTS, until=6, timeout=60)
        for proc in (handler, hydrator):
            assert proc.running(), proc.log_tail()

    queued = Counter(m.payload.contact_id for m in recipients if isinstance(m.payload, RecipientQueued))
    excluded = {m.payload.contact_id: m.payload.reason for m in recipients
                if isinstance(m.payload, RecipientExcluded)}
    assert set(queued) == expected_queued and max(queued.values()) == 1
    assert excluded == {
        **{cid(f"news{i}"): "excluded_list" for i in range(35, 40)},
        **{cid(f"pro{i}"): "excluded_segment" for i in range(3)},
        cid("news20"): "unsubscribed", cid("pro10"): "unsubscribed",
        cid("news21"): "suppressed:hard_bounce", cid("pro11"): "suppressed:complaint",
    }
    hydrated = [m.payload for m in events
                if isinstance(m.payload, CampaignHydrated) and m.envelope.aggregate_id == campaign]
    assert hydrated == [CampaignHydrated(total=len(expected_queued), excluded={
        "excluded_list": 5, "excluded_segment": 3, "suppressed:complaint": 1,
        "suppressed:hard_bounce": 1, "unsubscribed": 2})]
    assert len(expected_queued) + 12 == raw_audience
    rejected = [m.payload for m in events
                if isinstance(m.payload, CommandRejected) and m.envelope.aggregate_id == unknown]
    assert len(rejected) == 1 and "missing" in rejected[0].reason
