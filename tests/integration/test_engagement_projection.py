"""The engagement projector against the real broker and database: exact counts with replays
and redeliveries, a restart mid-stream, a re-run over the same offsets, the API's reads and
their tenant scope.

Every test has its own topics and consumer groups (the `settings` fixture) and random tenant
and campaign ids, so tests share the database without seeing each other's rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg.conninfo import make_conninfo

from projections.engagement_projector import (
    ENGAGEMENT_POSITIONS_NAME,
    engagement_projector_for,
)
from projections.engagement_queries import campaign_engagement, soft_bounce_streak
from projections.erase import ERASED
from projections.tenancy import create_analyst_login, drop_analyst_login, tenant_transaction
from schemas.base import Record
from schemas.bounces import EmailBounced, EmailComplained, bounce_event_id
from schemas.contacts import ContactDeleted, ContactUnsubscribed, ContactUpserted, contact_key
from schemas.engagement import AgentClass, EmailOpened, LinkClicked
from schemas.envelope import encode, wrap
from services.api.app import create_app
from services.api.auth import ApiKeys
from services.common.settings import Settings
from services.common.topics import CONTACTS, DELIVERIES, ENGAGEMENT, TopicSpec
from tests.integration.test_projector import T0, Campaign, drain, produce

pytestmark = pytest.mark.integration

DRAIN_TIMEOUT_SECONDS = 60.0
Record3 = tuple[TopicSpec, str, bytes]


@pytest.fixture
def db(platform_settings: Settings) -> Iterator[psycopg.Connection]:
    with psycopg.connect(platform_settings.database_url, autocommit=True) as conn:
        yield conn


def hit(c: Campaign, contact: str, request: uuid.UUID, minute: int, *, machine: bool = False,
        link: int | None = None) -> Record3:
    common = dict(campaign_id=c.id, contact_id=contact, request_id=request,
                  agent=AgentClass.IMAGE_PROXY if machine else AgentClass.BROWSER,
                  machine=machine, machine_reason="apple_mpp" if machine else None)
    payload = (EmailOpened(**common) if link is None else
               LinkClicked(**common, link_index=link, links_in_mail=2,
                           url=f"https://example.com/{link}"))
    # A fresh envelope id each time: a replay is told by its request id alone.
    value = encode(wrap(payload, tenant_id=c.tenant, aggregate_id=c.id,
                        occurred_at=T0 + timedelta(minutes=minute)))
    return ENGAGEMENT, f"{c.tenant}:{contact}", value


def bounce(c: Campaign, contact: str, kind: str, dedup: str, minute: int) -> Record3:
    payload = EmailBounced(campaign_id=c.id, contact_id=contact, kind=kind,
                           status="5.1.1" if kind == "hard" else "4.2.2", source="dsn",
                           attribution="verp", dedup_key=dedup)
    value = encode(wrap(payload, tenant_id=c.tenant, aggregate_id=c.id,
                        occurred_at=T0 + timedelta(minutes=minute),
                        message_id=bounce_event_id(dedup, "EmailBounced")))
    return DELIVERIES, c.id, value


def complaint(c: Campaign, contact: str, dedup: str, minute: int) -> Record3:
    payload = EmailComplained(campaign_id=c.id, contact_id=contact, source="arf",
                              attribution="verp", dedup_key=dedup)
    value = encode(wrap(payload, tenant_id=c.tenant, aggregate_id=c.id,
                        occurred_at=T0 + timedelta(minutes=minute),
                        message_id=bounce_event_id(dedup, "EmailComplained")))
    return DELIVERIES, c.id, value


def unsubscribe(c: Campaign, contact: str, minute: int, *, from_mail: bool = True,
                event_id: uuid.UUID | None = None) -> Record3:
    """A one-click unsubscribe from the campaign's mail, or (from_mail False) one by hand."""
    payload = ContactUnsubscribed(contact_id=contact, campaign_id=c.id if from_mail else None,
                                  reason="one-click" if from_mail else "asked by phone")
    value = encode(wrap(payload, tenant_id=c.tenant, aggregate_id=contact,
                        occurred_at=T0 + timedelta(minutes=minute), message_id=event_id))
    return CONTACTS, f"{c.tenant}:{contact}", value


def delivered_campaign(settings: Settings, contacts: int) -> Campaign:
    """A campaign whose `contacts` deliveries the main projector has projected."""
    c = Campaign()
    produce(settings, [c.created(), c.send_requested(), c.hydrated(contacts),
                       *(c.sent(f"c{i}", 1, T0 + timedelta(seconds=10)) for i in range(contacts))])
    drain(settings)
    return c


def engagement_stream(c: Campaign) -> list[Record3]:
    r = [uuid.uuid4() for _ in range(8)]
    return [
        hit(c, "c0", r[0], 1), hit(c, "c0", r[0], 1), hit(c, "c0", r[0], 2),  # one open, replayed
        hit(c, "c0", r[1], 1, machine=True),
        hit(c, "c1", r[2], 2),
        hit(c, "c0", r[3], 3, link=0), hit(c, "c0", r[4], 3, link=0),  # two clicks, one link
        hit(c, "c0", r[5], 4, link=1), hit(c, "c0", r[5], 4, link=1),  # replayed click
        hit(c, "c1", r[6], 4, machine=True, link=0),
        bounce(c, "c2", "hard", "dsn-1", 5), bounce(c, "c2", "hard", "dsn-1", 5),  # report twice
        bounce(c, "c3", "soft", "dsn-2", 5), bounce(c, "c3", "soft", "dsn-3", 6),
        bounce(c, "c3", "soft", "dsn-4", 7),
        complaint(c, "c4", "arf-1", 8), complaint(c, "c4", "arf-1", 8),
        unsubscribe(c, "c1", 9, event_id=r[7]), unsubscribe(c, "c1", 9, event_id=r[7]),  # twice
        unsubscribe(c, "c4", 9), unsubscribe(c, "c3", 9, from_mail=False),  # c3: no campaign's
    ]


EXPECTED = {
    "opens_unique_human": 2, "opens_unique_machine": 1, "opens_total_human": 2,
    "opens_total_machine": 1, "clicks_unique_human": 1, "clicks_unique_machine": 1,
    "clicks_total_human": 3, "clicks_total_machine": 1, "bounces_hard": 1, "bounces_soft": 1,
    "complaints": 1, "unsubscribes": 2,
}


def counts(db: psycopg.Connection, c: Campaign) -> dict[str, int]:
    found = campaign_engagement(db, c.tenant, c.id)
    assert found is not None
    assert found.sent == 5
    return found.counts


def rows(db: psycopg.Connection, c: Campaign) -> list[tuple[object, ...]]:
    return db.execute("SELECT * FROM engagement_events WHERE tenant_id = %s ORDER BY event_id",
                      (c.tenant,)).fetchall()


def test_counts_are_exact_across_a_restart_and_a_rerun(settings: Settings, db) -> None:
    c = delivered_campaign(settings, 5)
    produce(settings, engagement_stream(c))
    # First instance: a few small batches, then it stops mid-stream (uncommitted work lost).
    first = engagement_projector_for(settings, batch_size=3)
    first.start()
    moved = 0
    for _ in range(200):
        moved += first.step(timeout=0.5)
        if moved >= 3:
            break
    first.close()
    assert 0 < moved < 21 + 5  # mid-stream: some, not all, of the stream + deliveries
    second = engagement_projector_for(settings)
    second.drain(DRAIN_TIMEOUT_SECONDS)
    second.close()
    assert counts(db, c) == EXPECTED
    assert soft_bounce_streak(db, c.tenant, "c3") == 3
    live = rows(db, c)
    assert len(live) == 2 + 1 + 3 + 1 + 1 + 3 + 1 + 2  # opens, clicks, bounces, complaint, unsub

    # Re-run over the same offsets (positions forgotten): nothing is counted twice.
    db.execute("DELETE FROM projector_positions WHERE consumer_group = %s",
               (settings.group(ENGAGEMENT_POSITIONS_NAME),))
    again = engagement_projector_for(settings)
    again.drain(DRAIN_TIMEOUT_SECONDS)
    again.close()
    assert counts(db, c) == EXPECTED

    # Rebuild: an empty model replayed from offset zero equals the live one.
    db.execute("DELETE FROM engagement_events WHERE tenant_id = %s", (c.tenant,))
    db.execute("DELETE FROM projector_positions WHERE consumer_group = %s",
               (settings.group(ENGAGEMENT_POSITIONS_NAME),))
    rebuilt = engagement_projector_for(settings)
    rebuilt.drain(DRAIN_TIMEOUT_SECONDS)
    rebuilt.close()
    assert rows(db, c) == live


def test_api_reads_are_exact_and_tenant_scoped(settings: Settings, db) -> None:
    c = delivered_campaign(settings, 5)
    other = delivered_campaign(settings, 5)
    produce(settings, [*engagement_stream(c), hit(other, "c0", uuid.uuid4(), 1)])
    projector = engagement_projector_for(settings)
    projector.drain(DRAIN_TIMEOUT_SECONDS)
    projector.close()
    key_a, key_b = f"key-{uuid.uuid4().hex}", f"key-{uuid.uuid4().hex}"
    keys = ApiKeys([(c.tenant, key_a), (other.tenant, key_b)])
    with TestClient(create_app(settings, keys)) as api:
        auth = {"Authorization": f"Bearer {key_a}"}
        body = api.get(f"/campaigns/{c.id}/engagement", headers=auth).json()
        assert body["counts"] == EXPECTED
        assert body["sent"] == 5
        assert body["rates"]["opens_unique_human"] == 0.4
        assert body["rates"]["bounces_hard"] == 0.2

        links = api.get(f"/campaigns/{c.id}/engagement/links", headers=auth).json()["links"]
        assert [(lk["link_index"], lk["unique_human"], lk["total_human"], lk["unique_machine"],
                 lk["total_machine"]) for lk in links] == [(0, 1, 2, 1, 1), (1, 1, 1, 0, 0)]

        minutes = api.get(f"/campaigns/{c.id}/engagement/timeline", headers=auth).json()
        by_minute = {m["minute"][11:16]: m for m in minutes["minutes"]}
        assert by_minute["09:01"]["opens_human"] == 1 and by_minute["09:01"]["opens_machine"] == 1
        assert by_minute["09:02"]["opens_human"] == 1  # c1; c0's replay at 09:02 is not counted
        assert by_minute["09:04"]["clicks_human"] == 1
        assert by_minute["09:05"]["bounces_hard"] == 1 and by_minute["09:05"]["bounces_soft"] == 1
        assert by_minute["09:08"]["complaints"] == 1
        assert by_minute["09:09"]["unsubscribes"] == 2

        history = api.get(f"/campaigns/{c.id}/recipients/c3/engagement", headers=auth).json()
        assert [e["kind"] for e in history["events"]] == ["soft_bounce"] * 3
        assert history["soft_bounces_in_a_row"] == 3
        c0 = api.get(f"/campaigns/{c.id}/recipients/c0/engagement", headers=auth).json()
        # Oldest first; the two opens of 09:01 share their moment, so in any order.
        assert [e["kind"] for e in c0["events"]] == ["open"] * 2 + ["click"] * 3
        assert sorted((e["kind"], e["machine"], e["link_index"] or 0) for e in c0["events"]) == [
            ("click", False, 0), ("click", False, 0), ("click", False, 1),
            ("open", False, 0), ("open", True, 0)]

        # Another tenant's campaign is not found, on every engagement read.
        for path in (f"/campaigns/{other.id}/engagement",
                     f"/campaigns/{other.id}/engagement/links",
                     f"/campaigns/{other.id}/engagement/timeline",
                     f"/campaigns/{other.id}/recipients/c0/engagement"):
            assert api.get(path, headers=auth).status_code == 404
        mine = api.get(f"/campaigns/{other.id}/engagement",
                       headers={"Authorization": f"Bearer {key_b}"}).json()
        assert mine["counts"]["opens_total_human"] == 1


def test_analyst_views_show_only_the_granted_tenant(settings: Settings, db) -> None:
    c = delivered_campaign(settings, 5)
    other = delivered_campaign(settings, 5)
    produce(settings, [hit(c, "c0", uuid.uuid4(), 1), hit(other, "c0", uuid.uuid4(), 1)])
    projector = engagement_projector_for(settings)
    projector.drain(DRAIN_TIMEOUT_SECONDS)
    projector.close()
    name, password = f"eng_{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
    create_analyst_login(db, name, password, tenants=[c.tenant])
    try:
        with psycopg.connect(make_conninfo(settings.database_url, user=name, password=password),
                             autocommit=True) as analyst:
            views = ("analyst_recipient_engagement", "analyst_campaign_engagement",
                     "analyst_campaign_engagement_minutes", "engagement_events")
            for view in views:
                with tenant_transaction(analyst, c.tenant):
                    seen = analyst.execute(f"SELECT DISTINCT tenant_id FROM {view}").fetchall()
                assert seen == [(c.tenant,)], view
                with tenant_transaction(analyst, other.tenant):  # not granted: nothing
                    assert analyst.execute(f"SELECT count(*) FROM {view}").fetchone() == (0,)
    finally:
        drop_analyst_login(db, name)


def contact_event(c: Campaign, payload: Record) -> Record3:
    cid = payload.contact_id  # type: ignore[attr-defined]
    value = encode(wrap(payload, tenant_id=c.tenant, aggregate_id=cid, occurred_at=T0))
    return CONTACTS, contact_key(c.tenant, cid).decode(), value


def addressed_click(c: Campaign, contact: str) -> Record3:
    """A click on a link that carries the contact's address (a personalised link)."""
    payload = LinkClicked(campaign_id=c.id, contact_id=contact, request_id=uuid.uuid4(),
                          agent=AgentClass.BROWSER, machine=False, link_index=0,
                          links_in_mail=1, url=f"https://shop.example/?who={contact}@example.com")
    value = encode(wrap(payload, tenant_id=c.tenant, aggregate_id=c.id,
                        occurred_at=T0 + timedelta(minutes=1)))
    return ENGAGEMENT, f"{c.tenant}:{contact}", value


def test_engagement_rows_of_a_deleted_contact_keep_no_address_in_any_order(
        settings: Settings, db) -> None:
    c = delivered_campaign(settings, 4)
    upserts = [contact_event(c, ContactUpserted(contact_id=f"c{i}", email=f"c{i}@example.com"))
               for i in range(4)]
    # c0: deleted and projected by the main projector before its click reaches this lane.
    produce(settings, [*upserts, contact_event(c, ContactDeleted(contact_id="c0"))])
    drain(settings)
    # c1: clicks, then is deleted, the main projector never reading it (this lane sees both).
    # c2: deleted, then upserted again: a live contact, its click keeps its address. c3: kept.
    produce(settings, [
        addressed_click(c, "c0"), addressed_click(c, "c1"),
        contact_event(c, ContactDeleted(contact_id="c1")),
        contact_event(c, ContactDeleted(contact_id="c2")),
        contact_event(c, ContactUpserted(contact_id="c2", email="c2@example.com")),
        addressed_click(c, "c2"), addressed_click(c, "c3"),
    ])
    lane = engagement_projector_for(settings)
    lane.drain(DRAIN_TIMEOUT_SECONDS)
    lane.close()
    urls = dict(db.execute("SELECT contact_id, url FROM engagement_events"
                           " WHERE tenant_id = %s AND kind = 'click'", (c.tenant,)).fetchall())
    assert urls == {
        "c0": f"https://shop.example/?who={ERASED}",
        "c1": f"https://shop.example/?who={ERASED}",
        "c2": "https://shop.example/?who=c2@example.com",
        "c3": "https://shop.example/?who=c3@example.com",
    }
    # The clicks still count: an erase changes personal fields, never a count.
    found = campaign_engagement(db, c.tenant, c.id)
    assert found is not None and found.counts["clicks_total_human"] == 4
