"""A campaign asking for open and click tracking, through the real pipeline (command handler,
hydrator, sender as processes, real Kafka, PostgreSQL and SMTP sink): its mail's links point at
the tracker with tokens the tracker's keys verify, its envelope sender is a VERP address that
names the right campaign and contact; an untracked campaign's mail is as it always was."""

from __future__ import annotations

import time
import uuid

import pytest

from schemas.base import normalise_email
from schemas.commands import CreateCampaign, SendCampaign
from schemas.contacts import ContactUpserted, contact_id_for, contact_key
from schemas.envelope import wrap
from services.bounces.verp import CampaignRefs, VerpClaim, VerpKeys, read_address
from services.common.topics import COMMANDS, CONTACTS
from services.engagement.tokens import Kind, TrackingKeys
from services.smtp_sink import SinkConfig, SmtpSink, header
from tests.kafka_io import publish
from tests.service_process import ServiceProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
SERVICES = ("command_handler", "hydrator", "sender")
TRACKER_KEYS = "e2e:tracker-secret-0123456789"
TRACKER_URL = "https://t.example.net"
VERP_KEYS = "q:verp-secret-e2e"
BOUNCE_DOMAIN = "bounces.example.net"
LINK = "https://shop.example.com/spring?ref=mail"
HTML = f'<p>Hi {{{{ first_name }}}}</p><p><a href="{LINK}">Shop</a></p></body>'
TEXT = f"Hi {{{{ first_name }}}}, shop at {LINK}"


def test_tracked_campaign_mail_carries_signed_links_and_a_verp_return_path(settings) -> None:
    tenant = "acme"
    people = [normalise_email(f"track{i}-{uuid.uuid4().hex[:6]}@example.org") for i in range(3)]
    contacts = {contact_id_for(tenant, email): email for email in people}
    publish(settings, CONTACTS, [
        (contact_key(tenant, cid), wrap(ContactUpserted(contact_id=cid, email=email, first_name="Kay",
                                                        lists=["t"]),
                                        tenant_id=tenant, aggregate_id=cid))
        for cid, email in contacts.items()])
    tracked, untracked = (f"cmp-{uuid.uuid4().hex[:12]}" for _ in range(2))
    commands = []
    for campaign, flag in ((tracked, True), (untracked, False)):
        create = CreateCampaign(name="n", subject="Spring", from_address="news@example.com",
                                body_text=TEXT, body_html=HTML, track_opens=flag, track_clicks=flag)
        commands += [(campaign.encode(), wrap(create, tenant_id=tenant, aggregate_id=campaign)),
                     (campaign.encode(), wrap(SendCampaign(list_ids=["t"]), tenant_id=tenant,
                                              aggregate_id=campaign))]

    with SmtpSink(SinkConfig(port=0)) as sink:
        run = settings.replace(smtp_port=sink.port)
        marks = {"TRACKER_KEYS": TRACKER_KEYS, "TRACKER_PUBLIC_URL": TRACKER_URL,
                 "BOUNCE_VERP_KEYS": VERP_KEYS, "BOUNCE_DOMAIN": BOUNCE_DOMAIN}
        procs = [ServiceProcess(name, run, None, **(marks if name == "sender" else {})).start()
                 for name in SERVICES]
        try:
            publish(settings, COMMANDS, commands)
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                mails = [m for m in sink.messages if header(m, "X-Campaign-ID") in (tracked, untracked)]
                if len(mails) >= 2 * len(contacts):
                    break
                for p in procs:
                    assert p.running(), f"{p.service} died:\n{p.log_tail()}"
                time.sleep(0.5)
        finally:
            codes = {p.service: p.stop() for p in procs}

    assert codes == dict.fromkeys(SERVICES, 0)
    by_campaign: dict[str, list[dict]] = {tracked: [], untracked: []}
    for m in mails:
        by_campaign[str(header(m, "X-Campaign-ID"))].append(m)
    assert {c: len(ms) for c, ms in by_campaign.items()} == {tracked: 3, untracked: 3}

    tracker_keys, verp_keys = TrackingKeys.parse(TRACKER_KEYS), VerpKeys.parse(VERP_KEYS)
    directory = CampaignRefs([(tenant, tracked), (tenant, untracked)])
    contact_of = {email: cid for cid, email in contacts.items()}
    for m in by_campaign[tracked]:
        contact = contact_of[m["rcpt_tos"][0]]
        assert LINK not in m["html"] and LINK not in m["body"]
        click = m["html"].split(f'href="{TRACKER_URL}/c/')[1].split('"')[0]
        claim = tracker_keys.verify(click)
        assert (claim.kind, claim.tenant_id, claim.campaign_id, claim.contact_id, claim.url) == (
            Kind.CLICK, tenant, tracked, contact, LINK)
        text_click = m["body"].split(f"{TRACKER_URL}/c/")[1].split()[0]
        assert tracker_keys.verify(text_click).url == LINK
        pixel = m["html"].split(f"{TRACKER_URL}/o/")[1].split(".gif")[0]
        assert tracker_keys.verify(pixel).contact_id == contact
        assert m["mail_from"].startswith("bounces+") and m["mail_from"].endswith("@" + BOUNCE_DOMAIN)
        assert read_address(m["mail_from"], BOUNCE_DOMAIN, verp_keys, directory) == VerpClaim(
            tenant, tracked, contact)
        assert header(m, "From") == "news@example.com"
        assert header(m, "Message-ID") == f"<{tracked}.{contact}@example.com>"
    for m in by_campaign[untracked]:
        assert m["html"].strip() == HTML.replace("{{ first_name }}", "Kay")
        assert m["body"].strip() == TEXT.replace("{{ first_name }}", "Kay")
        assert TRACKER_URL not in m["html"]
        # VERP is the sender's, not the campaign's: every campaign's mail gets a return path.
        return_path = read_address(m["mail_from"], BOUNCE_DOMAIN, verp_keys, directory)
        assert return_path == VerpClaim(tenant, untracked, contact_of[m["rcpt_tos"][0]])
