"""The bounce receiver against the real broker: DSNs and ARF reports over SMTP on loopback
become EmailBounced / EmailComplained (+ ContactSuppressed) exactly once, for the right
contact; foreign recipients get 550; with the broker away the answer is 451 within the bound."""

from __future__ import annotations

import asyncio
import smtplib
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest

from schemas.bounces import EmailBounced, EmailComplained
from schemas.contacts import ContactSuppressed
from services.bounces.directory import PostgresCampaigns
from services.bounces.events import BOUNCE_TOPIC, records_for
from services.bounces.parse import BounceContext, BounceReport, Parsed, Recipient
from services.bounces.publisher import BouncePublisher, PublishFailed
from services.bounces.receiver import BounceHandler, BounceReceiver
from services.bounces.verp import CampaignRefs, VerpKeys, verp_address
from services.common.settings import Settings
from services.common.topics import CONTACTS
from tests.bounce_messages import arf, dsn, original
from tests.kafka_io import read_topic
from tests.ports import free_ports

pytestmark = pytest.mark.integration

DOMAIN = "bounces.example.com"
KEYS = VerpKeys.parse("k:integration-secret")
CAMPAIGN = "cmp-3f2a9c1b7d4e"


def _receiver(settings: Settings, timeout: float) -> tuple[BounceReceiver, BouncePublisher]:
    publisher = BouncePublisher(settings, timeout)
    context = BounceContext(DOMAIN, KEYS, CampaignRefs([("acme", CAMPAIGN)]), {CAMPAIGN: "acme"}.get)
    receiver = BounceReceiver(BounceHandler(context, publisher.publish), "127.0.0.1", 0)
    return receiver.start(), publisher


@pytest.fixture
def receiver(settings: Settings) -> Iterator[BounceReceiver]:
    running, publisher = _receiver(settings, 10.0)
    try:
        yield running
    finally:
        running.stop()
        publisher.close()


def _send(receiver: BounceReceiver, rcpt: str, raw: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", receiver.port, timeout=30) as client:
        client.ehlo("mx.example.net")
        client.mail("")
        code, reply = client.rcpt(rcpt)
        if code != 250:
            return code, reply
        return client.data(raw)


def test_reports_become_events_once_for_the_right_contact(settings: Settings, receiver: BounceReceiver):
    hard, ann_complains = str(uuid.uuid4()), str(uuid.uuid4())
    hard_verp = verp_address(KEYS, DOMAIN, "acme", CAMPAIGN, hard)
    complaint_verp = verp_address(KEYS, DOMAIN, "acme", CAMPAIGN, ann_complains)
    soft_verp = verp_address(KEYS, DOMAIN, "acme", "c2", "p-soft")
    report = dsn(to=hard_verp, returned=original(CAMPAIGN, hard, hard_verp), message_id="<dsn-1@mx.example.net>")
    assert _send(receiver, hard_verp, report)[0] == 250
    assert _send(receiver, soft_verp, dsn(to=soft_verp, action="delayed", status="4.2.2"))[0] == 250
    # A feedback loop mails its fixed address; the report's Original-Mail-From carries the token.
    fbl = f"bounces+fbl@{DOMAIN}"
    assert _send(receiver, fbl, arf(to=fbl, original_mail_from=complaint_verp))[0] == 250
    # Unattributable reports are taken (250) and counted, not turned into events.
    assert _send(receiver, fbl, dsn(to=fbl))[0] == 250

    bounces = read_topic(settings, BOUNCE_TOPIC, until=3)
    by_type = sorted((m.envelope.type, m.payload.contact_id) for m in bounces)
    assert by_type == sorted([("EmailBounced", hard), ("EmailBounced", "p-soft"), ("EmailComplained", ann_complains)])
    kinds = {m.payload.contact_id: m.payload for m in bounces if isinstance(m.payload, EmailBounced)}
    assert kinds[hard].kind == "hard" and kinds[hard].status == "5.1.1" and kinds[hard].attribution == "verp"
    assert kinds["p-soft"].kind == "soft"
    assert all(m.envelope.tenant_id == "acme" for m in bounces)
    assert any(isinstance(m.payload, EmailComplained) and m.payload.source == "arf" for m in bounces)

    suppressed = read_topic(settings, CONTACTS, until=2)
    assert sorted((m.payload.contact_id, m.payload.reason) for m in suppressed
                  if isinstance(m.payload, ContactSuppressed)) == sorted([(hard, "hard_bounce"), (ann_complains, "complaint")])
    assert len(suppressed) == 2
    assert receiver.handler.stats["accepted"] == 3 and receiver.handler.stats["unparseable"] == 1

    # The MTA sends the same report again (our 250 was lost): same ids, readers count it once.
    assert _send(receiver, hard_verp, report)[0] == 250
    again = read_topic(settings, BOUNCE_TOPIC, until=4)
    ids = [m.envelope.id for m in again if m.envelope.type == "EmailBounced" and m.payload.contact_id == hard]
    assert len(ids) == 2 and len(set(ids)) == 1


def test_foreign_recipients_get_550(receiver: BounceReceiver):
    code, reply = _send(receiver, "ann@example.net", b"Subject: hi\r\n\r\nhello\r\n")
    assert code == 550 and b"Not a bounce address" in reply
    code, _ = _send(receiver, "bounces+x@elsewhere.example", b"Subject: hi\r\n\r\nhello\r\n")
    assert code == 550
    assert receiver.handler.stats["refused_recipient"] == 2


def test_with_the_broker_away_the_answer_is_451_within_the_bound():
    (closed_port,) = free_ports(1)
    away = Settings(kafka_bootstrap_servers=f"127.0.0.1:{closed_port}", topic_prefix="away.")
    bound = 2.0
    receiver, publisher = _receiver(away, bound)
    try:
        verp = verp_address(KEYS, DOMAIN, "acme", "c1", "p1")
        started = time.monotonic()
        code, reply = _send(receiver, verp, dsn(to=verp))
        elapsed = time.monotonic() - started
        assert code == 451, reply
        assert elapsed < bound + 2.0
        assert receiver.handler.stats["kafka_unavailable"] == 1
    finally:
        receiver.stop()
        publisher.close()


def test_the_publisher_raises_when_the_broker_is_away():
    (closed_port,) = free_ports(1)
    publisher = BouncePublisher(Settings(kafka_bootstrap_servers=f"127.0.0.1:{closed_port}"), 1.0)
    parsed = Parsed(BounceReport("soft", "4.0.0"), Recipient("acme", "c1", "p1", "verp"), "dsn:x")
    records = records_for(parsed, source="dsn", provider="", now=datetime.now(UTC))
    try:
        started = time.monotonic()
        with pytest.raises(PublishFailed):
            asyncio.run(publisher.publish(records))
        assert time.monotonic() - started < 3.0
    finally:
        publisher.close()


def test_long_ids_resolve_through_the_campaigns_read_model(settings: Settings):
    tenant, campaign, contact = f"t{uuid.uuid4().hex[:8]}", f"cmp-{uuid.uuid4().hex[:12]}", str(uuid.uuid4())
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO campaigns (tenant_id, campaign_id) VALUES (%s, %s)", (tenant, campaign))
    directory = PostgresCampaigns(settings.database_url)
    context = BounceContext(DOMAIN, KEYS, directory, directory.tenant_of)
    publisher = BouncePublisher(settings, 10.0)
    receiver = BounceReceiver(BounceHandler(context, publisher.publish)).start()
    try:
        verp = verp_address(KEYS, DOMAIN, tenant, campaign, contact)
        assert verp.startswith("bounces+r")  # by reference: the ids do not fit inline
        assert _send(receiver, verp, dsn(to=verp))[0] == 250
        # The same reference for a campaign the read model does not know: nobody to record.
        stranger = verp_address(KEYS, DOMAIN, tenant, "cmp-000000000000", contact)
        assert _send(receiver, stranger, dsn(to=stranger))[0] == 250
        # Header attribution finds the tenant there too.
        fbl = f"bounces+fbl@{DOMAIN}"
        assert _send(receiver, fbl, dsn(to=fbl, returned=original(campaign, "p-headers")))[0] == 250
        events = read_topic(settings, BOUNCE_TOPIC, until=2)
        assert sorted((m.envelope.tenant_id, m.payload.campaign_id, m.payload.contact_id, m.payload.attribution)
                      for m in events) == sorted([(tenant, campaign, contact, "verp"),
                                                  (tenant, campaign, "p-headers", "headers")])
        assert receiver.handler.stats["unparseable"] == 1
        # Unsigned headers do not suppress: only the VERP-attributed hard bounce does.
        suppressed = read_topic(settings, CONTACTS, until=1)
        assert [m.payload.contact_id for m in suppressed] == [contact]
    finally:
        receiver.stop()
        publisher.close()


def test_with_the_database_away_a_reference_token_gets_451(settings: Settings):
    (closed_port,) = free_ports(1)
    directory = PostgresCampaigns(f"postgresql://campaigns@127.0.0.1:{closed_port}/campaigns")
    context = BounceContext(DOMAIN, KEYS, directory, directory.tenant_of)
    publisher = BouncePublisher(settings, 10.0)
    receiver = BounceReceiver(BounceHandler(context, publisher.publish)).start()
    try:
        verp = verp_address(KEYS, DOMAIN, "acme", CAMPAIGN, str(uuid.uuid4()))
        code, _ = _send(receiver, verp, dsn(to=verp))
        assert code == 451
        assert receiver.handler.stats["directory_unavailable"] == 1
    finally:
        receiver.stop()
        publisher.close()


def test_a_signed_webhook_reaches_kafka_once_acknowledged(settings: Settings):
    import hashlib
    import hmac

    from fastapi.testclient import TestClient

    from services.bounces.webhooks import WebhookConfig, create_app

    publisher = BouncePublisher(settings, 10.0)
    context = BounceContext(DOMAIN, KEYS, None, None)
    key = b"mailgun-key"
    client = TestClient(create_app(WebhookConfig(context, publisher.publish, mailgun_signing_key=key)))
    try:
        verp = verp_address(KEYS, DOMAIN, "acme", "c1", "p-webhook")
        stamp, token = str(int(time.time())), uuid.uuid4().hex
        signature = hmac.new(key, f"{stamp}{token}".encode(), hashlib.sha256).hexdigest()
        body = {"signature": {"timestamp": stamp, "token": token, "signature": signature},
                "event-data": {"event": "complained", "id": "mg-42", "envelope": {"sender": verp}}}
        assert client.post("/webhooks/mailgun", json=body).json() == {"recorded": 1, "ignored": 0}
        assert client.post("/webhooks/mailgun", json=body).status_code == 200  # redelivered
        events = read_topic(settings, BOUNCE_TOPIC, until=2)
        assert {(m.envelope.type, m.payload.contact_id, m.payload.source) for m in events} == {
            ("EmailComplained", "p-webhook", "webhook")}
        assert len({m.envelope.id for m in events}) == 1
        assert [m.payload.reason for m in read_topic(settings, CONTACTS, until=2)] == ["complaint", "complaint"]
    finally:
        publisher.close()


def test_the_service_process_records_reports_and_stops_cleanly(settings: Settings):
    import socket

    import httpx

    from tests.service_process import ServiceProcess

    tenant, campaign, contact = f"t{uuid.uuid4().hex[:8]}", f"cmp-{uuid.uuid4().hex[:12]}", str(uuid.uuid4())
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO campaigns (tenant_id, campaign_id) VALUES (%s, %s)", (tenant, campaign))
    smtp_port, web_port = free_ports(2)
    service = ServiceProcess("bounces", settings, BOUNCE_VERP_KEYS="k:integration-secret", BOUNCE_DOMAIN=DOMAIN,
                             BOUNCE_SMTP_PORT=str(smtp_port), BOUNCE_WEBHOOK_PORT=str(web_port),
                             BOUNCE_POSTMARK_CREDENTIALS="pm:pw")
    with service:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", web_port), timeout=1).close()
                socket.create_connection(("127.0.0.1", smtp_port), timeout=1).close()
                break
            except OSError:
                assert service.running() and time.monotonic() < deadline, service.log_tail()
                time.sleep(0.2)
        verp = verp_address(KEYS, DOMAIN, tenant, campaign, contact)
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as client:
            client.ehlo("mx.example.net")
            assert client.sendmail("", [verp], dsn(to=verp)) == {}
        bounce = {"RecordType": "Bounce", "Type": "SoftBounce", "ID": 7, "Details": "4.2.2 mailbox full",
                  "Metadata": {"verp": verp_address(KEYS, DOMAIN, tenant, campaign, "p-pm")}}
        response = httpx.post(f"http://127.0.0.1:{web_port}/webhooks/postmark", json=bounce, auth=("pm", "pw"),
                              timeout=30)
        assert response.status_code == 200 and response.json()["recorded"] == 1, response.text
        events = read_topic(settings, BOUNCE_TOPIC, until=2)
        assert sorted((m.payload.contact_id, m.payload.kind, m.payload.source) for m in events) == sorted(
            [(contact, "hard", "dsn"), ("p-pm", "soft", "webhook")])
        assert service.stop() == 0
    records, _ = service.log_records()
    assert any(r.get("event") == "stopped" for r in records)
