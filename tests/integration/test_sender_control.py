"""Pause, resume and cancel against running senders (real broker, PostgreSQL, SMTP sink).

Control events are published on campaign.events as the command handler publishes them; the
checks are on what the sink received and on campaign.deliveries: nobody mailed twice, nobody
lost, and while a campaign is paused nobody mailed at all.
"""

from __future__ import annotations

from collections import Counter

import pytest
from prometheus_client import REGISTRY

from schemas.events import CampaignCancelled, CampaignPaused, CampaignResumed, EmailSent, RecipientSkipped
from services.common.topics import HELD
from services.smtp_sink import SinkConfig, SmtpSink
from tests.integration.sender_kit import (
    deliveries_until,
    ledger_rows,
    produce,
    publish_control,
    recipients,
    running_sender,
    steady,
    terminal_for_all,
    wait_until,
)
from tests.kafka_io import read_topic

pytestmark = pytest.mark.integration

# Slow enough that a campaign is still sending when the test pauses or cancels it.
LATENCY_MS = 20
COUNT = 600


def terminal_once(events: list, count: int) -> dict[str, object]:
    """contact -> its terminal payload; fails when a recipient has none or two."""
    terminal = [e.payload for e in events if isinstance(e.payload, EmailSent | RecipientSkipped)]
    per_contact = Counter(t.contact_id for t in terminal)
    assert len(per_contact) == count
    assert set(per_contact.values()) == {1}, per_contact.most_common(3)
    return {t.contact_id: t for t in terminal}


def test_pause_stops_every_instance_holds_across_a_restart_and_resume_mails_the_rest_once(
    settings,
):
    batch = recipients(COUNT)
    campaign = batch[0].campaign_id
    produce(settings, batch)
    with SmtpSink(SinkConfig(port=0, latency_ms=LATENCY_MS)) as sink:
        config = settings.replace(smtp_port=sink.port)
        # Two instances sharing the partitions: the pause must stop both.
        with running_sender(config, concurrency=2), running_sender(config, concurrency=2):
            wait_until(lambda: len(sink.messages) >= 100, 60, "sender mailed nothing")
            publish_control(settings, campaign, CampaignPaused(reason="check the link"))
            mailed_while_sending = steady(lambda: len(sink.messages))
        assert mailed_while_sending < COUNT, "the campaign finished before the pause"
        # Paused, and no sender at all for a moment: the held recipients are on a topic.
        held = read_topic(settings, HELD, until=1)
        assert held
        with running_sender(config, concurrency=4):
            # A new sender learns of the pause from campaign.events and mails nobody.
            assert steady(lambda: len(sink.messages), quiet=3.0) == mailed_while_sending
            publish_control(settings, campaign, CampaignResumed())
            events = deliveries_until(settings, terminal_for_all(COUNT))
        records = sink.messages

    by_contact = terminal_once(events, COUNT)
    assert all(isinstance(t, EmailSent) for t in by_contact.values())
    mailed = Counter(rec["rcpt_tos"][0] for rec in records)
    assert len(mailed) == COUNT and set(mailed.values()) == {1}
    assert {r.email for r in batch} == set(mailed)
    rows = ledger_rows(settings, campaign)
    assert {(r["status"], r["ambiguous"]) for r in rows} == {("sent", 0)}


def test_a_campaign_paused_before_sending_starts_is_held_until_resumed(settings):
    batch = recipients(50)
    campaign = batch[0].campaign_id
    publish_control(settings, campaign, CampaignPaused())
    produce(settings, batch)
    with SmtpSink(SinkConfig(port=0)) as sink, \
            running_sender(settings.replace(smtp_port=sink.port)) as worker:
        wait_until(lambda: worker.stats.held >= 50, 60, "recipients were not held")
        assert steady(lambda: len(sink.messages)) == 0
        # Every parked recipient waits behind the blocked head of a held partition.
        wait_until(lambda: REGISTRY.get_sample_value("campaign_held_recipients") == 50, 30,
                   "the held gauge did not count the 50 held recipients")
        publish_control(settings, campaign, CampaignResumed())
        events = deliveries_until(settings, terminal_for_all(50))
        records = sink.messages
        wait_until(lambda: REGISTRY.get_sample_value("campaign_held_recipients") == 0, 30,
                   "the held gauge did not fall to 0 after the resume")
    terminal_once(events, 50)
    assert sorted(rec["rcpt_tos"][0] for rec in records) == sorted(r.email for r in batch)


def test_resuming_one_campaign_releases_it_while_another_stays_paused(settings):
    first, second = recipients(40), recipients(40)
    for batch in (first, second):
        publish_control(settings, batch[0].campaign_id, CampaignPaused())
    produce(settings, first + second)
    with SmtpSink(SinkConfig(port=0)) as sink, \
            running_sender(settings.replace(smtp_port=sink.port)) as worker:
        wait_until(lambda: worker.stats.held >= 80, 60, "recipients were not held")
        publish_control(settings, second[0].campaign_id, CampaignResumed())
        wait_until(lambda: len(sink.messages) >= 40, 60, "the resumed campaign was not mailed")
        assert steady(lambda: len(sink.messages)) == 40
        assert {rec["rcpt_tos"][0] for rec in sink.messages} == {r.email for r in second}
        publish_control(settings, first[0].campaign_id, CampaignResumed())
        wait_until(lambda: len(sink.messages) >= 80, 60, "the first campaign was not mailed")
        assert steady(lambda: len(sink.messages)) == 80


def test_cancel_skips_everyone_not_yet_mailed(settings):
    batch = recipients(COUNT)
    campaign = batch[0].campaign_id
    produce(settings, batch)
    with SmtpSink(SinkConfig(port=0, latency_ms=LATENCY_MS)) as sink, \
            running_sender(settings.replace(smtp_port=sink.port), concurrency=4):
        wait_until(lambda: len(sink.messages) >= 100, 60, "sender mailed nothing")
        publish_control(settings, campaign, CampaignCancelled(reason="wrong list"))
        events = deliveries_until(settings, terminal_for_all(COUNT))
        records = sink.messages

    by_contact = terminal_once(events, COUNT)
    sent = {c for c, t in by_contact.items() if isinstance(t, EmailSent)}
    skipped = [t for t in by_contact.values() if isinstance(t, RecipientSkipped)]
    assert skipped, "the campaign finished before the cancel"
    assert {s.reason for s in skipped} == {"cancelled"}
    # What was mailed is exactly what was reported sent; everyone else was skipped.
    mailed = Counter(rec["rcpt_tos"][0] for rec in records)
    assert set(mailed.values()) == {1}
    emails = {r.contact_id: r.email for r in batch}
    assert set(mailed) == {emails[c] for c in sent}
    assert len(sent) + len(skipped) == COUNT


def test_contacts_suppressed_unsubscribed_or_deleted_after_hydration_are_skipped(settings):
    from schemas.contacts import (
        ContactDeleted,
        ContactSuppressed,
        ContactUnsubscribed,
        ContactUpserted,
        contact_key,
    )
    from schemas.envelope import wrap
    from services.common.topics import CONTACTS
    from tests.integration.sender_kit import TENANT
    from tests.kafka_io import publish

    batch = recipients(30)
    ids = [r.contact_id for r in batch]

    def fact(payload):
        return contact_key(TENANT, payload.contact_id), wrap(payload, tenant_id=TENANT,
                                                             aggregate_id=payload.contact_id)

    publish(settings, CONTACTS, [
        fact(ContactSuppressed(contact_id=ids[0], reason="complaint")),
        fact(ContactUnsubscribed(contact_id=ids[1])),
        fact(ContactUnsubscribed(contact_id=ids[2], list_id="news")),  # one list: still mailed
        fact(ContactDeleted(contact_id=ids[3])),
        fact(ContactDeleted(contact_id=ids[4])),
        fact(ContactUpserted(contact_id=ids[4], email=batch[4].email)),  # back again
    ])
    produce(settings, batch)
    with SmtpSink(SinkConfig(port=0)) as sink, \
            running_sender(settings.replace(smtp_port=sink.port)):
        events = deliveries_until(settings, terminal_for_all(30))
        records = sink.messages
    by_contact = terminal_once(events, 30)
    skipped = {c: t.reason for c, t in by_contact.items() if isinstance(t, RecipientSkipped)}
    assert skipped == {ids[0]: "suppressed:complaint", ids[1]: "unsubscribed", ids[3]: "deleted"}
    assert sorted(rec["rcpt_tos"][0] for rec in records) == sorted(
        r.email for r in batch if r.contact_id not in skipped)
