"""Unit tests of the projector's pure mapping: decoded events -> deduplicated row changes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from projections.read_models import DeliveryRow, RecipientRow, plan
from schemas.base import Record
from schemas.envelope import Message, decode, encode, wrap
from schemas.events import (
    Audience,
    CampaignCancelled,
    CampaignCreated,
    CampaignHydrated,
    CampaignSendRequested,
    CommandRejected,
    EmailFailed,
    EmailSent,
    HydrationPartitionReported,
    MessageTemplate,
    RecipientQueued,
)

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
         at: datetime = T0) -> Message[Record]:
    payload = EmailSent(
        campaign_id=campaign, contact_id=contact, email=f"{contact}@example.com",
        message_id=f"<{contact}@mx>", attempt=attempt,
    )
    return msg(payload, aggregate=campaign, at=at)


def failed(contact: str, campaign: str = CAMPAIGN, reason: str = "550 no such user",
           at: datetime = T0) -> Message[Record]:
    payload = EmailFailed(
        campaign_id=campaign, contact_id=contact, email=f"{contact}@example.com",
        attempt=3, reason=reason, permanent=True, smtp_code=550,
    )
    return msg(payload, aggregate=campaign, at=at)


def test_campaign_lifecycle_events_become_campaign_rows() -> None:
    changes = plan([
        msg(CampaignCreated(name="Spring sale", template=TEMPLATE), at=T0),
        msg(CampaignSendRequested(template=TEMPLATE, audience=Audience(), contacts_snapshot={}),
            at=T0 + timedelta(seconds=1)),
        msg(CampaignHydrated(total=3), at=T0 + timedelta(seconds=2)),
        msg(CampaignCancelled(reason="oops"), at=T0 + timedelta(seconds=3)),
    ])
    created = changes.created[CAMPAIGN]
    assert (created.tenant_id, created.name, created.subject, created.created_at) == (
        "acme", "Spring sale", "Hello", T0
    )
    assert changes.started[CAMPAIGN].started_at == T0 + timedelta(seconds=1)
    assert changes.hydrated[CAMPAIGN].total == 3
    assert changes.hydrated[CAMPAIGN].hydrated_at == T0 + timedelta(seconds=2)
    assert changes.cancelled[CAMPAIGN].cancelled_at == T0 + timedelta(seconds=3)
    assert changes.campaign_ids() == [CAMPAIGN]
    assert not changes.recipients and not changes.deliveries


def test_duplicate_recipient_and_delivery_collapse_to_one_row_each_first_wins() -> None:
    later = T0 + timedelta(minutes=5)
    changes = plan([
        queued("k1"), queued("k1"),
        sent("k1", attempt=1), sent("k1", attempt=2, at=later), failed("k1", at=later),
    ])
    assert list(changes.recipients) == [(CAMPAIGN, "k1")]
    assert changes.deliveries == {
        (CAMPAIGN, "k1"): DeliveryRow("acme", CAMPAIGN, "k1", "sent", 1, None, T0),
    }


def test_delivery_before_its_recipient_queued_implies_the_recipient() -> None:
    changes = plan([failed("k2", reason="mailbox full"), queued("k2")])
    assert changes.recipients == {
        (CAMPAIGN, "k2"): RecipientRow("acme", CAMPAIGN, "k2", "k2@example.com"),
    }
    delivery = changes.deliveries[(CAMPAIGN, "k2")]
    assert (delivery.status, delivery.attempts, delivery.last_error) == (
        "failed", 3, "mailbox full"
    )


def test_recipients_of_several_campaigns_are_kept_apart() -> None:
    changes = plan([queued("k1", "c-a"), queued("k1", "c-b"), sent("k1", "c-b")])
    assert sorted(changes.recipients) == [("c-a", "k1"), ("c-b", "k1")]
    assert list(changes.deliveries) == [("c-b", "k1")]
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
    assert changes.cancelled == {}
    assert [d.type for d in changes.dropped] == ["CampaignCancelled"]
    assert list(changes.deliveries) == [(CAMPAIGN, "k1")]
    # The rejection of the intruder's command is still recorded, under the intruder.
    assert [r.tenant_id for r in changes.rejections.values()] == ["mallory"]


def test_valid_events_of_other_types_are_ignored() -> None:
    changes = plan([msg(HydrationPartitionReported(campaign_id=CAMPAIGN, partition=0,
                                                   partitions=1, queued=0))])
    assert changes.ignored == 1
    assert changes.is_empty()


@pytest.mark.parametrize("field", ["name", "reason"])
def test_nul_characters_are_replaced_because_postgresql_text_rejects_them(field: str) -> None:
    if field == "name":
        changes = plan([msg(CampaignCreated(name="a\x00b", template=TEMPLATE))])
        assert changes.created[CAMPAIGN].name == "a\ufffdb"
    else:
        changes = plan([failed("k1", reason="bad\x00reply")])
        assert changes.deliveries[(CAMPAIGN, "k1")].last_error == "bad\ufffdreply"


def test_absurd_numbers_are_clamped_so_they_cannot_block_a_partition() -> None:
    changes = plan([msg(CampaignHydrated(total=10**30)), sent("k1", attempt=10**12)])
    assert changes.hydrated[CAMPAIGN].total == 2**63 - 1
    assert changes.deliveries[(CAMPAIGN, "k1")].attempts == 2**31 - 1


def test_empty_batch_plans_nothing() -> None:
    changes = plan([])
    assert changes.is_empty()
    assert changes.campaign_ids() == []
