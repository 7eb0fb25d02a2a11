"""POST /segments/preview against the real read models: live counts per tenant, 422 with the
fault paths for invalid criteria, and the time bound (a count stuck on a lock is cut off)."""

from __future__ import annotations

import threading

import psycopg
import pytest

from services.api import segment_preview
from tests.integration.test_api import World, auth, client, world  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration


def contact(w: World, tenant: str, contact_id: str, plan: str, *, lists: tuple[str, ...] = (),
            unsubscribed: bool = False) -> None:
    w.sql("INSERT INTO contacts (tenant_id, contact_id, globally_unsubscribed)"
              " VALUES (%s, %s, %s)", (tenant, contact_id, unsubscribed))
    w.sql("INSERT INTO contact_profiles (tenant_id, contact_id, email, first_name, last_name,"
              " attributes, deleted) VALUES (%s, %s, %s, '', '', jsonb_build_object('plan', %s::text),"
              " false)", (tenant, contact_id, f"{contact_id}@example.com", plan))
    for list_id in lists:
        w.sql("INSERT INTO contact_list_members (tenant_id, list_id, contact_id)"
                  " VALUES (%s, %s, %s)", (tenant, list_id, contact_id))


PRO = {"op": "eq", "field": "attr.plan", "value": "pro"}


def test_the_preview_counts_the_callers_contacts_matching_now(client, world):  # noqa: F811
    contact(world, world.a, "p1", "pro", lists=("news",))
    contact(world, world.a, "p2", "pro", unsubscribed=True)
    contact(world, world.a, "p3", "free", lists=("news",))
    for i in range(5):  # B's pro contacts are not A's
        contact(world, world.b, f"b{i}", "pro")
    got = client.post("/segments/preview", json={"criteria": PRO}, headers=auth(world.key_a))
    assert got.status_code == 200, got.text
    body = got.json()
    assert (body["matching"], body["mailable"], body["unsubscribed"]) == (2, 1, 1)
    both = client.post("/segments/preview", headers=auth(world.key_a), json={"criteria": {
        "op": "all", "conditions": [PRO, {"op": "in_list", "list_id": "news"}]}}).json()
    assert (both["matching"], both["mailable"]) == (1, 1)
    assert client.post("/segments/preview", json={"criteria": PRO},
                       headers=auth(world.key_b)).json()["matching"] == 5
    assert client.post("/segments/preview", json={"criteria": PRO}).status_code == 401


@pytest.mark.parametrize(("criteria", "loc"), [
    ({"op": "eq", "field": "attr.plan"}, ["body", "criteria", "value"]),
    ({"op": "all", "conditions": [PRO, {"op": "gt", "field": "nope", "value": "1"}]},
     ["body", "criteria", "conditions", 1, "field"]),
    ({"op": "launch"}, ["body", "criteria"]),
    ("pro", ["body", "criteria"]),
])
def test_invalid_criteria_are_422_with_the_path_of_each_fault(client, world, criteria, loc):  # noqa: F811
    response = client.post("/segments/preview", json={"criteria": criteria},
                           headers=auth(world.key_a))
    assert response.status_code == 422, response.text
    assert loc in [fault["loc"] for fault in response.json()["detail"]], response.json()


def test_bad_bodies_are_4xx(client, world):  # noqa: F811
    for body in ({}, {"criteria": PRO, "extra": 1}):
        assert client.post("/segments/preview", json=body,
                           headers=auth(world.key_a)).status_code == 422
    malformed = client.post("/segments/preview", content=b"{not json",
                            headers={**auth(world.key_a), "Content-Type": "application/json"})
    assert malformed.status_code == 422


def test_a_count_that_overruns_its_bound_is_cut_off(client, world, monkeypatch):  # noqa: F811
    monkeypatch.setattr(segment_preview, "PREVIEW_TIMEOUT_S", 0.5)
    locked, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        with psycopg.connect(world.url) as conn, conn.transaction():
            conn.execute("LOCK TABLE contacts IN ACCESS EXCLUSIVE MODE")
            locked.set()
            release.wait(30)

    holder = threading.Thread(target=hold_lock, daemon=True)
    holder.start()
    try:
        assert locked.wait(30)
        response = client.post("/segments/preview", json={"criteria": PRO},
                               headers=auth(world.key_a))
    finally:
        release.set()
        holder.join(30)
    assert response.status_code == 503
    assert "longer than 0.5 s" in response.json()["detail"]
    # Once the lock is gone the same preview answers.
    assert client.post("/segments/preview", json={"criteria": PRO},
                       headers=auth(world.key_a)).status_code == 200
