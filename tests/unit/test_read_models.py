"""Unit tests of the projector's pure mapping: decoded events -> deduplicated row changes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from projections.lanes import DELIVERY_LANE, LANES, PROJECTED_TOPICS
from projections.read_models import RecipientRow, plan
from schemas.base import Record
from schemas.commands import SendCampaign
from schemas.contacts import ContactListMembershipAdded, ContactUpserted
from schemas.envelope import Message, decode, encode, wrap
from schemas.events import (
    Audience,
    CampaignCancelled,
    CampaignCreated,
    CampaignHydrated,
    CampaignPaused,
    CampaignResumed,
    CampaignScheduled,
    CampaignScheduleMissed,
    CampaignSendRequested,
    CommandRejected,
    EmailDeferred,
    EmailFailed,
    EmailSent,
    HydrationPartitionReported,
    MessageTemplate,
    RecipientExcluded,
    RecipientQueued,
    RecipientSkipped,
)
from services.common.topics import DELIVERIES

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
TEMPLATE = MessageTemplate(subject="Hello", from_address="news@example.com", body_text="Hi")
CAMPAIGN = "c-1"


def msg(payload: Record, *, tenant: str = "acme", aggregate: str = CAMPAIGN,
        at: datetime = T0) -> Message[Record]:
    # Through the real codec, so the test sees exactly what the projector decodes.
    return decode(encode(wrap(payload, tenant_id=tenant, aggregate_id=aggregate, occurred_at=at)))


def queued(contact: str, campaign: str = CAMPAIGN) -> Message[Record]:
    payload = RecipientQueued(
        campaign_id=campaign, contact_id=contact, email=f"{contact}@example.com",
        template=TEMPLATE,
    )
    return msg(payload, aggregate=contact)


def sent(contact: str, campaign: str = CAMPAIGN, attempt: int = 1,
         at: datetime = T0, ambiguous: int = 0) -> Message[Record]:
    payload = EmailSent(
        campaign_id=campaign, contact_id=contact, email=f"{contact}@example.com",
        message_id=f"<{contact}@mx>", attempt=attempt, ambiguous=ambiguous,
    )
    return msg(payload, aggregate=campaign, at=at)


def failed(contact: str, campaign: str = CAMPAIGN, reason: str = "550 no such user",
           at: datetime = T0) -> Message[Record]:
    payload = EmailFailed(
        campaign_id=campaign, contact_id=contact, email=f"{contact}@example.com",
        attempt=3, reason=reason, permanent=True, smtp_code=550,
    )
    return msg(payload, aggregate=campaign, at=at)


def deferred(contact: str, attempt: int, at: datetime = T0) -> Message[Record]:
    payload = EmailDeferred(
        campaign_id=CAMPAIGN, contact_id=contact, email=f"{contact}@example.com",
        attempt=attempt, reason="451 try later", smtp_code=451,
        retry_at=at + timedelta(minutes=1),
    )
    return msg(payload, at=at)


def test_campaign_lifecycle_events_become_one_campaign_change() -> None:
    changes = plan([
        msg(CampaignCreated(name="Spring sale", template=TEMPLATE), at=T0),
        msg(CampaignSendRequested(template=TEMPLATE, audience=Audience(), contacts_snapshot={}),
            at=T0 + timedelta(seconds=1)),
        msg(CampaignHydrated(total=3), at=T0 + timedelta(seconds=2)),
        msg(CampaignCancelled(reason="oops"), at=T0 + timedelta(seconds=3)),
    ])
    change = changes.campaigns[CAMPAIGN]
    assert (change.tenant_id, change.name, change.subject, change.created_at) == (
        "acme", "Spring sale", "Hello", T0
    )
    assert change.started_at == T0 + timedelta(seconds=1)
    assert (change.total, change.hydrated_at) == (3, T0 + timedelta(seconds=2))
    assert change.cancelled_at == T0 + timedelta(seconds=3)
    assert change.paused is None
    assert changes.campaign_ids() == [CAMPAIGN]
    assert not changes.recipients


def test_the_last_pause_or_resume_of_a_batch_wins() -> None:
    changes = plan([
        msg(CampaignPaused(reason="too many bounces", automatic=True), at=T0),
        msg(CampaignResumed(), at=T0 + timedelta(seconds=5)),
    ])
    change = changes.campaigns[CAMPAIGN]
    assert (change.paused, change.paused_at, change.resumed_at) == (
        False, T0, T0 + timedelta(seconds=5))
    assert (change.pause_reason, change.paused_automatically) == ("too many bounces", True)
    again = plan([msg(CampaignResumed(), at=T0), msg(CampaignPaused(), at=T0)])
    assert again.campaigns[CAMPAIGN].paused is True


def scheduled(send_at: datetime, *, at: datetime = T0) -> Message[Record]:
    return msg(CampaignScheduled(send_at=send_at, grace_seconds=60,
                                 send=SendCampaign(list_ids=["all"])), at=at)


def test_a_schedule_is_kept_with_its_send_time_and_a_later_one_does_not_replace_it() -> None:
    send_at = T0 + timedelta(hours=2)
    changes = plan([scheduled(send_at), scheduled(send_at + timedelta(hours=1))])
    change = changes.campaigns[CAMPAIGN]
    assert (change.scheduled_for, change.schedule_missed_at, change.schedule_missed_reason) == (
        send_at, None, None)
    assert changes.ignored == 0


def test_a_missed_schedule_records_when_and_why_first_report_wins() -> None:
    send_at = T0 + timedelta(hours=2)
    noticed = send_at + timedelta(minutes=5)
    changes = plan([
        scheduled(send_at),
        msg(CampaignScheduleMissed(send_at=send_at, noticed_at=noticed,
                                   reason="found 300 s late, grace 60 s"), at=noticed),
        msg(CampaignScheduleMissed(send_at=send_at, noticed_at=noticed,
                                   reason="a second report"), at=noticed + timedelta(minutes=1)),
    ])
    change = changes.campaigns[CAMPAIGN]
    assert (change.scheduled_for, change.schedule_missed_at, change.schedule_missed_reason) == (
        send_at, noticed, "found 300 s late, grace 60 s")


def test_schedule_facts_of_a_campaign_owned_by_another_tenant_are_dropped() -> None:
    changes = plan([msg(CampaignCreated(name="x", template=TEMPLATE), tenant="acme"),
                    msg(CampaignScheduled(send_at=T0, grace_seconds=0,
                                          send=SendCampaign(list_ids=["all"])),
                        tenant="evil")])
    assert changes.campaigns[CAMPAIGN].scheduled_for is None
    assert [d.type for d in changes.dropped] == ["CampaignScheduled"]


def test_duplicate_recipient_and_delivery_collapse_to_one_row_first_terminal_wins() -> None:
    later = T0 + timedelta(minutes=5)
    changes = plan([
        queued("k1"), queued("k1"),
        sent("k1", attempt=1, ambiguous=1), sent("k1", attempt=2, at=later), failed("k1", at=later),
    ])
    assert changes.recipients == {
        (CAMPAIGN, "k1"): RecipientRow("acme", CAMPAIGN, "k1", "k1@example.com", "sent", 1,
                                       None, None, None, 1, T0),
    }


def test_a_status_only_climbs_whatever_the_order_of_the_topics() -> None:
    # The delivery overtook its RecipientQueued (another topic): still failed.
    changes = plan([failed("k2", reason="mailbox full"), queued("k2")])
    row = changes.recipients[(CAMPAIGN, "k2")]
    assert (row.status, row.attempts, row.last_error, row.smtp_code) == (
        "failed", 3, "mailbox full", 550)


def test_deferrals_are_history_and_leave_the_recipient_retrying() -> None:
    first = deferred("k3", 1)
    changes = plan([queued("k3"), first, deferred("k3", 2),
                    first])  # a redelivered event changes nothing
    row = changes.recipients[(CAMPAIGN, "k3")]
    assert (row.status, row.attempts, row.last_error) == ("retrying", 2, "451 try later")
    assert sorted(a.attempt for a in changes.attempts.values()) == [1, 2]
    done = plan([deferred("k3", 1), sent("k3", attempt=2)])
    assert done.recipients[(CAMPAIGN, "k3")].status == "sent"
    assert len(done.attempts) == 1


def test_skipped_and_excluded_keep_their_reason() -> None:
    changes = plan([
        msg(RecipientSkipped(campaign_id=CAMPAIGN, contact_id="k4", email="k4@example.com",
                             reason="cancelled")),
        msg(RecipientExcluded(campaign_id=CAMPAIGN, contact_id="k5", email="k5@example.com",
                              reason="unsubscribed"), aggregate="k5"),
    ])
    skipped, excluded = changes.recipients[(CAMPAIGN, "k4")], changes.recipients[(CAMPAIGN, "k5")]
    assert (skipped.status, skipped.reason, skipped.last_error) == ("skipped", "cancelled", None)
    assert (excluded.status, excluded.reason) == ("excluded", "unsubscribed")
    # A recipient queued after all climbs from 'excluded' to 'queued'.
    assert plan([msg(RecipientExcluded(campaign_id=CAMPAIGN, contact_id="k5", email="",
                                       reason="deleted"), aggregate="k5"),
                 queued("k5")]).recipients[(CAMPAIGN, "k5")].status == "queued"


def test_recipients_of_several_campaigns_are_kept_apart() -> None:
    changes = plan([queued("k1", "c-a"), queued("k1", "c-b"), sent("k1", "c-b")])
    assert {k: r.status for k, r in changes.recipients.items()} == {
        ("c-a", "k1"): "queued", ("c-b", "k1"): "sent"}
    assert changes.campaign_ids() == ["c-a", "c-b"]


def test_command_rejected_is_a_rejection_row_deduplicated_by_event_id() -> None:
    command_id = uuid.uuid4()
    rejection = msg(CommandRejected(command_id=command_id, command_type="SendCampaign",
                                    reason="campaign is cancelled"))
    changes = plan([rejection, rejection])
    assert len(changes.rejections) == 1
    row = changes.rejections[rejection.envelope.id]
    assert (row.tenant_id, row.campaign_id, row.command_id, row.command_type, row.reason) == (
        "acme", CAMPAIGN, command_id, "SendCampaign", "campaign is cancelled"
    )
    # A rejection changes no campaign, so it does not count as touching one.
    assert changes.campaign_ids() == []


def test_a_campaign_id_belongs_to_the_first_tenant_that_names_it() -> None:
    changes = plan([
        msg(CampaignCreated(name="mine", template=TEMPLATE), tenant="acme"),
        msg(CampaignCancelled(), tenant="mallory"),
        sent("k1"),  # acme's delivery is fine
        msg(CommandRejected(command_id=None, command_type=None, reason="not yours"),
            tenant="mallory"),
    ])
    assert changes.campaigns[CAMPAIGN].cancelled_at is None
    assert [d.type for d in changes.dropped] == ["CampaignCancelled"]
    assert list(changes.recipients) == [(CAMPAIGN, "k1")]
    # The rejection of the intruder's command is still recorded, under the intruder.
    assert [r.tenant_id for r in changes.rejections.values()] == ["mallory"]


def test_campaigns_owned_before_the_batch_are_dropped_whole() -> None:
    changes = plan([sent("k1"), deferred("k2", 1), queued("k3", "c-other")])
    changes.drop_campaigns([CAMPAIGN])
    assert list(changes.recipients) == [("c-other", "k3")]
    assert changes.attempts == {}
    assert changes.campaign_ids() == ["c-other"]


def test_contact_events_are_kept_in_order_per_contact() -> None:
    upsert = ContactUpserted(contact_id="p1", email="p1@example.com", lists=["l1"])
    added = ContactListMembershipAdded(contact_id="p1", list_id="l2")
    changes = plan([msg(upsert, aggregate="p1"), msg(added, aggregate="p1")])
    assert changes.contacts == {("acme", "p1"): [upsert, added]}
    assert changes.campaign_ids() == []


def test_valid_events_of_other_types_are_ignored() -> None:
    changes = plan([msg(HydrationPartitionReported(campaign_id=CAMPAIGN, partition=0,
                                                   partitions=1, queued=0))])
    assert changes.ignored == 1
    assert changes.is_empty()


@pytest.mark.parametrize("field", ["name", "reason"])
def test_nul_characters_are_replaced_because_postgresql_text_rejects_them(field: str) -> None:
    if field == "name":
        changes = plan([msg(CampaignCreated(name="a\x00b", template=TEMPLATE))])
        assert changes.campaigns[CAMPAIGN].name == "a\ufffdb"
    else:
        changes = plan([failed("k1", reason="bad\x00reply")])
        assert changes.recipients[(CAMPAIGN, "k1")].last_error == "bad\ufffdreply"


def test_absurd_numbers_are_clamped_so_they_cannot_block_a_partition() -> None:
    changes = plan([msg(CampaignHydrated(total=10**30)), sent("k1", attempt=10**12)])
    assert changes.campaigns[CAMPAIGN].total == 2**63 - 1
    assert changes.recipients[(CAMPAIGN, "k1")].attempts == 2**31 - 1


def test_empty_batch_plans_nothing() -> None:
    changes = plan([])
    assert changes.is_empty()
    assert changes.campaign_ids() == []


def test_what_a_command_caused_is_recorded_by_causation_id() -> None:
    command_id = uuid.uuid4()
    created = decode(encode(wrap(CampaignCreated(name="x", template=TEMPLATE), tenant_id="acme",
                                 aggregate_id=CAMPAIGN, causation_id=command_id)))
    rejected = decode(encode(wrap(
        CommandRejected(command_id=command_id, command_type="SendCampaign", reason="no"),
        tenant_id="acme", aggregate_id=CAMPAIGN, causation_id=command_id)))
    changes = plan([created, rejected, sent("k1")])  # a delivery is no command outcome
    assert {(o.causation_id, o.event_type) for o in changes.outcomes.values()} == {
        (command_id, "CampaignCreated"), (command_id, "CommandRejected")}


def test_the_projector_lanes_split_the_projected_topics_without_overlap() -> None:
    """Every projected topic is in exactly one lane (positions are per topic-partition, so two
    lanes never move the same position), and deliveries have a lane of their own."""
    laned = [topic for lane in LANES for topic in lane.topics]
    assert sorted(t.name for t in laned) == sorted(t.name for t in PROJECTED_TOPICS)
    assert DELIVERY_LANE.topics == (DELIVERIES,)
    assert len({lane.group for lane in LANES}) == len(LANES)


def test_the_first_hydration_names_the_unknown_picks_as_a_json_array() -> None:
    changes = plan([
        msg(CampaignHydrated(total=1, unknown_contact_ids=["x-1", "x-2"], unknown_contact_count=7)),
        msg(CampaignHydrated(total=9, unknown_contact_ids=["other"], unknown_contact_count=1)),
    ])
    change = changes.campaigns[CAMPAIGN]
    assert (change.total, change.unknown_contact_ids, change.unknown_contact_count) == (
        1, '["x-1", "x-2"]', 7)
