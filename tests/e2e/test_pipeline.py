"""The whole pipeline as real processes: command topic -> events -> hydration -> SMTP ->
deliveries -> read model. Every distinct recipient is mailed exactly once and counted exactly."""

from __future__ import annotations

import time
import uuid
from collections import Counter

import psycopg
import pytest

from projections.queries import campaign_progress
from schemas.base import normalise_email
from schemas.commands import CreateCampaign, SendCampaign
from schemas.contacts import ContactUpserted, contact_id_for, contact_key
from schemas.envelope import wrap
from schemas.events import CampaignCompleted
from services.common.topics import COMMANDS, CONTACTS, EVENTS
from services.smtp_sink import SinkConfig, SmtpSink, header
from tests.kafka_io import publish, read_topic
from tests.service_process import ServiceProcess

pytestmark = pytest.mark.e2e
SERVICES = ("command_handler", "hydrator", "sender", "projector", "completion")


def wait_for(predicate, timeout, what, procs):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for p in procs:
            assert p.running(), f"{p.service} died:\n{p.log_tail()}"
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_campaign_reaches_every_distinct_recipient_exactly_once(settings):
    tenant = "acme"
    # 1,000 contacts: list "a" holds 0..699, list "b" holds 400..999 (300 in both).
    contacts = []
    for i in range(1000):
        email = normalise_email(f"Person{i}@Example.org")
        lists = [name for name, members in (("a", range(0, 700)), ("b", range(400, 1000))) if i in members]
        cid = contact_id_for(tenant, email)
        contacts.append((contact_key(tenant, cid), wrap(
            ContactUpserted(contact_id=cid, email=email, first_name=f"P{i}", lists=lists),
            tenant_id=tenant, aggregate_id=cid)))
    # 20 more contacts in no targeted list, 5 of them hand-picked; one hand-picked also in "a".
    extra = []
    for i in range(20):
        email = normalise_email(f"extra{i}@example.org")
        cid = contact_id_for(tenant, email)
        extra.append((cid, (contact_key(tenant, cid), wrap(
            ContactUpserted(contact_id=cid, email=email, lists=["z"]), tenant_id=tenant, aggregate_id=cid))))
    picked = [cid for cid, _ in extra[:5]] + [contact_id_for(tenant, normalise_email("person3@example.org"))]
    publish(settings, CONTACTS, contacts + [record for _, record in extra])

    campaign = f"cmp-{uuid.uuid4().hex[:12]}"
    create = CreateCampaign(name="E2E", subject="Hello {{ first_name | \"friend\" }}",
                            from_address="news@example.com", body_text="Hi {{ first_name }}")

    with SmtpSink(SinkConfig(port=0)) as sink:
        run = settings.replace(smtp_port=sink.port)
        procs = [ServiceProcess(name, run).start() for name in SERVICES]
        try:
            publish(settings, COMMANDS, [
                (campaign.encode(), wrap(create, tenant_id=tenant, aggregate_id=campaign)),
                (b"junk", b"{this is not json"),
                (campaign.encode(), wrap(SendCampaign(), tenant_id=tenant, aggregate_id=campaign)),
                (campaign.encode(), wrap(SendCampaign(list_ids=["a", "b"], contact_ids=picked),
                                         tenant_id=tenant, aggregate_id=campaign)),
            ])
            with psycopg.connect(settings.database_url, autocommit=True) as conn:
                done = wait_for(
                    lambda: (p := campaign_progress(conn, campaign)) and p.status == "completed" and p,
                    240, "campaign completed", procs)
                rejections = conn.execute(
                    "SELECT reason FROM command_rejections WHERE campaign_id IN (%s, 'junk')", (campaign,)
                ).fetchall()
                statuses: dict[str, int] = dict(conn.execute(
                    "SELECT status, count(*) FROM campaign_recipients WHERE campaign_id = %s GROUP BY status",
                    (campaign,)).fetchall())
            events = read_topic(settings, EVENTS, until=5, timeout=60)
            # The pipeline is still up after the bad commands.
            for p in procs:
                assert p.running(), f"{p.service} died:\n{p.log_tail()}"
        finally:
            codes = {p.service: p.stop() for p in procs}
        mails = [m for m in sink.messages if header(m, "X-Campaign-ID") == campaign]

    expected = 1000 + 5  # lists a ∪ b, plus five hand-picked extras (person3 is already in a)
    assert done.total == expected
    assert done.sent == expected and done.failed == 0 and done.pending == 0
    assert statuses == {"sent": expected}
    recipients = Counter(m["rcpt_tos"][0] for m in mails)
    assert len(mails) == expected and len(recipients) == expected, "someone mailed twice or not at all"
    assert max(recipients.values()) == 1
    subjects = {m["subject"] for m in mails}
    assert "Hello P7" in subjects and "Hello friend" in subjects
    reasons = " | ".join(r for (r,) in rejections)
    assert "empty audience" in reasons and "malformed JSON" in reasons
    assert codes == dict.fromkeys(SERVICES, 0), "a service did not exit cleanly on SIGTERM"
    completed = [m.payload for m in events
                 if isinstance(m.payload, CampaignCompleted) and m.envelope.aggregate_id == campaign]
    assert completed == [CampaignCompleted(total=expected, sent=expected, failed=0)]
