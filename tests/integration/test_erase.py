"""The GDPR erase against the real broker, PostgreSQL, sender and SMTP sink: a contact is
mailed, then deleted over the API; afterwards no table of the database holds its address (or
its names), the other contact's data is intact and the campaign's counts are unchanged."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import psycopg
import pytest
from fastapi.testclient import TestClient

from schemas.contacts import ContactDeleted, contact_id_for
from schemas.envelope import encode, wrap
from schemas.events import CampaignHydrated, EmailDeferred, RecipientQueued
from services.api.app import create_app
from services.api.auth import ApiKeys
from services.common.topics import CONTACTS, DELIVERIES, RECIPIENTS
from services.smtp_sink import SinkConfig, SmtpSink
from tests.integration.sender_kit import TEMPLATE, running_sender
from tests.integration.test_projector import Campaign, drain, produce
from tests.kafka_io import read_topic

pytestmark = pytest.mark.integration


def holders(db: psycopg.Connection, needle: str) -> dict[str, int]:
    """Every table.column of the database whose text (or bytes) contains `needle`, with the
    number of rows: a scan of the whole schema, so a table added later is covered too."""
    columns = db.execute(
        "SELECT table_name, column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = 'public' AND data_type IN"
        " ('text', 'character varying', 'jsonb', 'json', 'bytea', 'ARRAY')"
        " AND table_name IN (SELECT table_name FROM information_schema.tables"
        "                    WHERE table_schema = 'public' AND table_type = 'BASE TABLE')"
    ).fetchall()
    found = {}
    for table, column, kind in columns:
        probe = (f'position(convert_to(%s, \'UTF8\') in "{column}") > 0' if kind == "bytea"
                 else f'"{column}"::text ILIKE \'%%\' || %s || \'%%\'')
        (count,) = db.execute(f'SELECT count(*) FROM "{table}" WHERE {probe}',  # noqa: S608 - names from the catalogue
                              (needle,)).fetchone() or (0,)
        if count:
            found[f"{table}.{column}"] = count
    return found


def test_a_mailed_contact_deleted_leaves_no_address_in_any_table(settings) -> None:
    tenant, key = f"gdpr-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    gone_address = f"ada.{uuid.uuid4().hex[:10]}@example.org"
    kept_address = f"bob.{uuid.uuid4().hex[:10]}@example.org"
    surname, city = f"Lovelace{uuid.uuid4().hex[:6]}", f"London{uuid.uuid4().hex[:6]}"
    gone, kept = contact_id_for(tenant, gone_address), contact_id_for(tenant, kept_address)
    campaign = Campaign(tenant=tenant)
    with TestClient(create_app(settings, ApiKeys([(tenant, key)]))) as api:
        headers = {"Authorization": f"Bearer {key}"}
        upserted = api.put("/contacts", headers=headers, json={"contacts": [
            {"email": gone_address, "first_name": "Ada", "last_name": surname,
             "attributes": {"city": city}, "lists": ["news"]},
            {"email": kept_address, "first_name": "Bob", "attributes": {"city": "Oslo"},
             "lists": ["news"]}]})
        assert upserted.status_code == 202, upserted.text
        read_topic(settings, CONTACTS, until=2)
        # Both are mailed by the real sender; Ada's first attempt is deferred with a reply
        # that quotes her address, as real MTAs do.
        at = datetime.now(UTC)
        produce(settings, [campaign.created(), campaign.event(CampaignHydrated(total=2), at)] + [
            (RECIPIENTS, f"{tenant}:{cid}", campaign_record(campaign, cid, address, name, town))
            for cid, address, name, town in ((gone, gone_address, surname, city),
                                             (kept, kept_address, "B", "Oslo"))
        ] + [campaign.delivery(EmailDeferred(
            campaign_id=campaign.id, contact_id=gone, email=gone_address, attempt=1,
            reason=f"451 4.2.0 <{gone_address}>: greylisted", smtp_code=451,
            retry_at=at), at)])
        with SmtpSink(SinkConfig(port=0)) as sink:
            mailing = settings.replace(smtp_port=sink.port)
            with running_sender(mailing):
                deadline = time.monotonic() + 60
                while len(sink.messages) < 2:
                    assert time.monotonic() < deadline, "not mailed"
                    time.sleep(0.1)
                read_topic(settings, DELIVERIES, until=3)
        drain(settings)
        with psycopg.connect(settings.database_url, autocommit=True) as db:
            before = holders(db, gone_address)
            assert {"campaign_recipients.email", "contact_profiles.email",
                    "recipient_attempts.detail"} <= set(before), before
            counts = db.execute("SELECT total, sent, failed, queued FROM campaigns"
                                " WHERE campaign_id = %s", (campaign.id,)).fetchone()
            assert counts == (2, 2, 0, 2)
            deadline = time.monotonic() + 30  # the relay marks the upsert published
            while db.execute("SELECT count(*) FROM command_outbox WHERE aggregate_id = %s"
                             " AND published_at IS NULL", (gone,)).fetchone() != (0,):
                assert time.monotonic() < deadline
                time.sleep(0.2)

            deleted = api.delete(f"/contacts/{gone}", headers=headers)
            assert deleted.status_code == 202, deleted.text
            records = read_topic(settings, CONTACTS, until=3)
            assert any(isinstance(r.payload, ContactDeleted) for r in records)
            drain(settings)
            assert holders(db, gone_address) == {}
            assert holders(db, surname) == {}
            assert holders(db, city) == {}
            # The other contact keeps everything; the campaign's counts are as they were.
            assert {"campaign_recipients.email", "contact_profiles.email"} <= set(
                holders(db, kept_address))
            assert db.execute("SELECT total, sent, failed, queued FROM campaigns"
                              " WHERE campaign_id = %s", (campaign.id,)).fetchone() == counts
            assert db.execute("SELECT status FROM campaign_recipients WHERE campaign_id = %s"
                              " AND contact_id = %s", (campaign.id, gone)).fetchone() == ("sent",)
            assert api.get(f"/contacts/{gone}", headers=headers).json()["email"] == ""

            # A recipient record of the deleted contact projected after the erase (another
            # topic, or a rebuild's interleaving) does not bring the address back.
            late = Campaign(tenant=tenant)
            produce(settings, [late.created(), (RECIPIENTS, f"{tenant}:{gone}",
                                                campaign_record(late, gone, gone_address, surname, city))])
            drain(settings)
            assert db.execute("SELECT email FROM campaign_recipients WHERE campaign_id = %s",
                              (late.id,)).fetchone() == ("",)
            assert holders(db, gone_address) == {}


def campaign_record(campaign: Campaign, contact: str, address: str, last_name: str,
                    city: str) -> bytes:
    payload = RecipientQueued(campaign_id=campaign.id, contact_id=contact, email=address,
                              first_name="X", last_name=last_name, template=TEMPLATE,
                              attributes={"city": city})
    return encode(wrap(payload, tenant_id=campaign.tenant, aggregate_id=contact))

