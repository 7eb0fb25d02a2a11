"""The contacts API against the real broker, PostgreSQL and projector: writes become contact
events on contacts.events through the outbox, reads come from the read models, per tenant."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

from schemas.contacts import (
    ContactAttributesChanged,
    ContactDeleted,
    ContactListMembershipAdded,
    ContactListMembershipRemoved,
    ContactResubscribed,
    ContactUnsubscribed,
    ContactUpserted,
    contact_id_for,
)
from services.api.app import create_app
from services.api.auth import ApiKeys
from services.api.contacts import MAX_BATCH
from services.common.topics import CONTACTS
from tests.integration.test_projector import drain
from tests.kafka_io import read_topic

pytestmark = pytest.mark.integration


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def tenants() -> tuple[tuple[str, str], tuple[str, str]]:
    return (f"ta-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex), (f"tb-{uuid.uuid4().hex[:8]}",
                                                              uuid.uuid4().hex)


def test_a_batch_is_published_projected_and_read_back_per_tenant(settings, tenants) -> None:
    (a, key_a), (b, key_b) = tenants
    batch = [{"email": f"Person{i}@Example.org", "first_name": f"P{i}", "attributes": {"n": str(i)},
              "lists": ["news"]} for i in range(300)]
    with TestClient(create_app(settings, ApiKeys([(a, key_a), (b, key_b)]))) as api:
        accepted = api.put("/contacts", json={"contacts": batch}, headers=auth(key_a))
        assert accepted.status_code == 202, accepted.text
        ids = [contact_id_for(a, f"Person{i}@example.org") for i in range(300)]
        assert accepted.json() == {"contact_ids": ids, "events": 300}
        records = read_topic(settings, CONTACTS, until=300)
        assert sorted(r.envelope.aggregate_id for r in records) == sorted(ids)  # once each
        by_contact = {r.envelope.aggregate_id: r.payload for r in records}
        assert by_contact[ids[7]] == ContactUpserted(
            contact_id=ids[7], email="Person7@example.org", first_name="P7",
            attributes={"n": "7"}, lists=["news"])
        assert {r.envelope.tenant_id for r in records} == {a}
        drain(settings)
        got = api.get(f"/contacts/{ids[7]}", headers=auth(key_a))
        assert got.status_code == 200, got.text
        assert (got.json()["email"], got.json()["lists"]) == ("Person7@example.org", ["news"])
        by_email = api.get("/contacts", params={"email": "person7@EXAMPLE.org"}, headers=auth(key_a))
        assert [c["contact_id"] for c in by_email.json()["contacts"]] == [ids[7]]
        # Tenant B sees none of it.
        assert api.get(f"/contacts/{ids[7]}", headers=auth(key_b)).status_code == 404
        assert api.get("/contacts", params={"email": "person7@example.org"},
                       headers=auth(key_b)).json() == {"contacts": []}


def test_every_change_is_one_event_of_its_kind(settings, tenants) -> None:
    (a, key_a), _ = tenants
    cid = contact_id_for(a, "ada@example.org")
    with TestClient(create_app(settings, ApiKeys([(a, key_a)]))) as api:
        h = auth(key_a)
        for method, path, body in [
            ("PATCH", f"/contacts/{cid}/attributes", {"set": {"city": "Oslo"}, "unset": ["plan"]}),
            ("PUT", f"/contacts/{cid}/lists/vip", None),
            ("DELETE", f"/contacts/{cid}/lists/vip", None),
            ("POST", f"/contacts/{cid}/unsubscribe", {"list_id": "news", "reason": "too many"}),
            ("POST", f"/contacts/{cid}/resubscribe", {"list_id": "news"}),
            ("DELETE", f"/contacts/{cid}", None),
        ]:
            answer = api.request(method, path, json=body, headers=h)
            assert answer.status_code == 202, (path, answer.text)
            assert answer.json() == {"contact_ids": [cid], "events": 1}
        payloads = [r.payload for r in read_topic(settings, CONTACTS, until=6)]
    assert payloads == [
        ContactAttributesChanged(contact_id=cid, set={"city": "Oslo"}, unset=["plan"]),
        ContactListMembershipAdded(contact_id=cid, list_id="vip"),
        ContactListMembershipRemoved(contact_id=cid, list_id="vip"),
        ContactUnsubscribed(contact_id=cid, list_id="news", reason="too many"),
        ContactResubscribed(contact_id=cid, list_id="news"),
        ContactDeleted(contact_id=cid),
    ]


def test_bad_input_is_a_4xx_with_the_reason_and_stores_nothing(settings, tenants) -> None:
    (a, key_a), _ = tenants
    h = auth(key_a)
    with TestClient(create_app(settings, ApiKeys([(a, key_a)]), relay=False)) as api:
        one_bad = api.put("/contacts", headers=h, json={"contacts": [
            {"email": "ok@example.org"}, {"email": "no-at-sign"}]})
        assert one_bad.status_code == 422
        [fault] = one_bad.json()["detail"]
        assert fault["loc"] == ["body", "contacts", 1, "email"]
        too_many = api.put("/contacts", headers=h,
                           json={"contacts": [{"email": "a@example.org"}] * (MAX_BATCH + 1)})
        assert too_many.status_code == 422
        bodies: list[dict[str, object]] = [{"contacts": []}, {"contacts": [{"email": "a@example.org", "extra": 1}]},
                     {"contacts": [{"email": 7}]}, {"people": []},
                                         {"contacts": [{"email": "a@example.org",
                                                        "attributes": {"k": "v\x00"}}]}]
        for body in bodies:
            assert api.put("/contacts", headers=h, json=body).status_code == 422, body
        assert api.put("/contacts", headers={**h, "Content-Type": "application/json"},
                       content=b"{not json").status_code == 422
        both = api.patch("/contacts/c1/attributes", headers=h, json={"set": {"x": "1"}, "unset": ["x"]})
        assert both.status_code == 422 and "both set and unset" in both.text
        assert api.get("/contacts/bad%20id", headers=h).status_code == 422
        assert api.get("/contacts/c1").status_code == 401
        assert api.delete("/contacts/c1", headers=auth("wrong")).status_code == 401
    import psycopg

    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute("SELECT count(*) FROM command_outbox WHERE tenant_id = %s",
                           (a,)).fetchone()
    assert row == (0,)
