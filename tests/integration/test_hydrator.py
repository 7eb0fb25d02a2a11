"""Hydrator (faust worker process) against the real broker: exact, deduplicated fan-out."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from schemas.base import normalise_email
from schemas.contacts import ContactUpserted, contact_id_for, contact_key
from schemas.envelope import wrap
from schemas.events import (
    Audience,
    CampaignHydrated,
    CampaignSendRequested,
    MessageTemplate,
    RecipientQueued,
)
from services.common.topics import CONTACTS, EVENTS, RECIPIENTS, topic_name
from tests.kafka_io import publish, read_topic
from tests.service_process import ServiceProcess

pytestmark = pytest.mark.integration
TEMPLATE = MessageTemplate(subject="Hi {{ first_name }}", from_address="news@example.com", body_text="b")


def contact(tenant, email, lists):
    email = normalise_email(email)
    cid = contact_id_for(tenant, email)
    payload = ContactUpserted(contact_id=cid, email=email, first_name="F", lists=lists)
    return contact_key(tenant, cid), wrap(payload, tenant_id=tenant, aggregate_id=cid)


def snapshot(settings):
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    topic = topic_name(CONTACTS, settings)
    req = {TopicPartition(topic, p): OffsetSpec.latest() for p in range(CONTACTS.partitions)}
    return {tp.partition: f.result().offset for tp, f in admin.list_offsets(req).items()}


def send_requested(settings, tenant, campaign, audience):
    event = CampaignSendRequested(template=TEMPLATE, audience=audience, contacts_snapshot=snapshot(settings))
    publish(settings, EVENTS, [(campaign.encode(), wrap(event, tenant_id=tenant, aggregate_id=campaign))])


def test_fan_out_is_exact_across_overlapping_lists_ids_and_tenants(settings):
    tenant, other = "acme", "globex"
    records = [contact(tenant, f"user{i}@Example.COM", ["a"] if i < 60 else ["b"]) for i in range(100)]
    records += [contact(tenant, f"user{i}@example.com", ["b"]) for i in range(40, 60)]   # same people, in b too
    records += [contact(tenant, f"  User{i}@EXAMPLE.com ", ["c"]) for i in range(100, 110)]  # list c: not targeted
    records += [contact(other, f"user{i}@example.com", ["a", "b"]) for i in range(50)]      # other tenant
    publish(settings, CONTACTS, records)
    picked = contact_id_for(tenant, normalise_email("User105@example.com"))
    campaign = f"c-{uuid.uuid4().hex[:8]}"
    with ServiceProcess("hydrator", settings) as hydrator:
        send_requested(settings, tenant, campaign, Audience(list_ids=["a", "b"], contact_ids=[picked, "ghost"]))
        # 100 contacts in a or b, plus one hand-picked contact from list c.
        recipients = read_topic(settings, RECIPIENTS, until=101, timeout=90)
        events = read_topic(settings, EVENTS, until=2, timeout=60)
        assert hydrator.running(), hydrator.log_tail()
    queued = [m.payload for m in recipients]
    assert all(isinstance(q, RecipientQueued) for q in queued)
    emails = [q.email for q in queued]
    assert len(emails) == 101 and len(set(emails)) == 101
    assert {m.envelope.tenant_id for m in recipients} == {tenant}
    assert "User105@example.com" in emails
    hydrated = [m.payload for m in events if isinstance(m.payload, CampaignHydrated)]
    # "ghost" names no contact of the tenant: reported by id.
    assert hydrated == [CampaignHydrated(total=101, unknown_contact_ids=["ghost"], unknown_contact_count=1)]


def test_contacts_added_after_the_send_are_not_mailed(settings):
    tenant = "acme"
    publish(settings, CONTACTS, [contact(tenant, f"early{i}@example.com", ["a"]) for i in range(10)])
    campaign = f"c-{uuid.uuid4().hex[:8]}"
    send_requested(settings, tenant, campaign, Audience(list_ids=["a"]))
    publish(settings, CONTACTS, [contact(tenant, f"late{i}@example.com", ["a"]) for i in range(10)])
    with ServiceProcess("hydrator", settings) as hydrator:
        events = read_topic(settings, EVENTS, until=2, timeout=90)
        recipients = read_topic(settings, RECIPIENTS, until=10, timeout=30)
        assert hydrator.running(), hydrator.log_tail()
    assert sorted(m.payload.email for m in recipients) == sorted(f"early{i}@example.com" for i in range(10))
    assert [m.payload for m in events if isinstance(m.payload, CampaignHydrated)] == [CampaignHydrated(total=10)]


def test_unsubscribed_suppressed_and_deleted_contacts_are_excluded_with_reasons(settings):
    from schemas.contacts import ContactDeleted, ContactSuppressed, ContactUnsubscribed
    from schemas.events import RecipientExcluded

    tenant = "acme"
    records = [contact(tenant, f"member{i}@example.com", ["news"]) for i in range(30)]
    ids = [contact_id_for(tenant, f"member{i}@example.com") for i in range(30)]

    def fact(payload, cid):
        return contact_key(tenant, cid), wrap(payload, tenant_id=tenant, aggregate_id=cid)

    records += [fact(ContactUnsubscribed(contact_id=ids[0]), ids[0]),
                fact(ContactUnsubscribed(contact_id=ids[1], list_id="news"), ids[1]),
                fact(ContactSuppressed(contact_id=ids[2], reason="hard_bounce"), ids[2]),
                fact(ContactSuppressed(contact_id=ids[3], reason="manual_blocklist"), ids[3]),
                fact(ContactDeleted(contact_id=ids[4]), ids[4])]
    publish(settings, CONTACTS, records)
    campaign = f"c-{uuid.uuid4().hex[:8]}"
    with ServiceProcess("hydrator", settings) as hydrator:
        send_requested(settings, tenant, campaign, Audience(list_ids=["news"], contact_ids=[ids[4]]))
        events = read_topic(settings, EVENTS, until=2, timeout=90)
        facts = read_topic(settings, RECIPIENTS, until=30, timeout=30)
        assert hydrator.running(), hydrator.log_tail()
    hydrated = [m.payload for m in events if isinstance(m.payload, CampaignHydrated)]
    assert hydrated == [CampaignHydrated(total=25, excluded={
        "deleted": 1, "suppressed:hard_bounce": 1, "suppressed:manual_blocklist": 1, "unsubscribed": 2})]
    excluded = {m.payload.contact_id: m.payload.reason for m in facts if isinstance(m.payload, RecipientExcluded)}
    assert excluded == {ids[0]: "unsubscribed", ids[1]: "unsubscribed", ids[2]: "suppressed:hard_bounce",
                        ids[3]: "suppressed:manual_blocklist", ids[4]: "deleted"}
    queued = {m.payload.contact_id for m in facts if isinstance(m.payload, RecipientQueued)}
    assert queued == set(ids[5:])
