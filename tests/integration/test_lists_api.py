"""Lists and campaign duplicates over HTTP, end to end: the API's outbox, the real command
handler, the projector and PostgreSQL; tenant isolation and what a deleted list does."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from projections.projector import projector_for
from schemas.contacts import ContactUpserted, contact_key
from schemas.envelope import encode, wrap
from services.api.app import create_app
from services.api.auth import ApiKeys
from services.command_handler.handler import CommandHandler
from services.common.topics import CONTACTS
from tests.integration.test_projector import produce

pytestmark = pytest.mark.integration


def rid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Tenants:
    def __init__(self) -> None:
        self.a, self.b = rid("ta"), rid("tb")
        self.key_a, self.key_b = uuid.uuid4().hex, uuid.uuid4().hex
        self.keys = ApiKeys([(self.a, self.key_a), (self.b, self.key_b)])


def running(target) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=target, args=(stop,), daemon=True)
    thread.start()
    return stop, thread


@pytest.fixture
def tenants() -> Tenants:
    return Tenants()


@pytest.fixture
def api(settings, tenants) -> Iterator[TestClient]:
    """The API with its relay, the command handler and the projector, on this test's topics."""
    handler = CommandHandler(settings)
    projector = projector_for(settings, poll_timeout=0.2)
    workers = [running(handler.run), running(projector.run)]
    try:
        with TestClient(create_app(settings, tenants.keys)) as client:
            yield client
    finally:
        for stop, _ in workers:
            stop.set()
        for _, thread in workers:
            thread.join(30)
            assert not thread.is_alive()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def outcome(client: TestClient, key: str, accepted, timeout: float = 60.0) -> dict:
    """The command's final status (accepted or rejected), once the projector recorded it."""
    assert accepted.status_code == 202, accepted.text
    url = accepted.json()["status_url"]
    deadline = time.monotonic() + timeout
    while True:
        status = client.get(url, headers=bearer(key)).json()
        if status["status"] in ("accepted", "rejected"):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.2)


def test_lists_are_created_renamed_counted_and_deleted_per_tenant(api, tenants, settings):
    a, b = bearer(tenants.key_a), bearer(tenants.key_b)
    created = outcome(api, tenants.key_a, api.post(
        "/lists", json={"list_id": "news", "name": "News"}, headers=a))
    assert created["status"] == "accepted"
    assert [e["type"] for e in created["events"]] == ["ListCreated"]
    # The same id in tenant B is another list: B can create its own.
    assert outcome(api, tenants.key_b, api.post(
        "/lists", json={"list_id": "news", "name": "B news"}, headers=b))["status"] == "accepted"
    again = outcome(api, tenants.key_a, api.post(
        "/lists", json={"list_id": "news", "name": "Again"}, headers=a))
    assert (again["status"], again["reason"]) == ("rejected", "list 'news' already exists")
    # Members: one of A's contacts on "news", one on an implicit list "vip".
    contact = "p-" + uuid.uuid4().hex[:6]
    produce(settings, [(CONTACTS, contact_key(tenants.a, contact).decode(), encode(wrap(
        ContactUpserted(contact_id=contact, email=f"{contact}@example.com", lists=["news", "vip"]),
        tenant_id=tenants.a, aggregate_id=contact)))])
    renamed = outcome(api, tenants.key_a, api.patch(
        "/lists/news", json={"name": "Weekly news"}, headers=a))
    assert renamed["status"] == "accepted"
    deadline = time.monotonic() + 60
    while True:
        lists = api.get("/lists", headers=a).json()["lists"]
        if len(lists) == 2 and lists[0]["members"] == 1:
            break
        assert time.monotonic() < deadline, lists
        time.sleep(0.2)
    assert [(x["list_id"], x["name"], x["members"], x["mailable"]) for x in lists] == [
        ("news", "Weekly news", 1, 1), ("vip", None, 1, 1)]
    shown = api.get("/lists/news", headers=a).json()
    assert (shown["name"], shown["members"]) == ("Weekly news", 1)
    assert shown["created_at"] is not None
    # B sees only its own list of the same id, without A's member.
    assert [(x["list_id"], x["name"], x["members"]) for x in
            api.get("/lists", headers=b).json()["lists"]] == [("news", "B news", 0)]
    assert api.get("/lists/vip", headers=b).status_code == 404
    # B cannot rename or delete A's lists: for B they do not exist.
    foreign = outcome(api, tenants.key_b, api.patch("/lists/vip", json={"name": "x"}, headers=b))
    assert (foreign["status"], foreign["reason"]) == ("rejected", "unknown list 'vip'")
    assert outcome(api, tenants.key_b, api.delete("/lists/vip", headers=b))["status"] == "rejected"

    deleted = outcome(api, tenants.key_a, api.delete("/lists/news", headers=a))
    assert [e["type"] for e in deleted["events"]] == ["ListDeleted"]
    deadline = time.monotonic() + 60
    while api.get("/lists/news", headers=a).status_code != 404:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert [x["list_id"] for x in api.get("/lists", headers=a).json()["lists"]] == ["vip"]
    assert api.get("/lists/news", headers=b).status_code == 200  # B's list is untouched
    # A deleted list sends to nobody: a campaign naming it (or excluding it) is rejected...
    campaign = rid("cmp")
    assert outcome(api, tenants.key_a, api.post("/commands", headers=a, json={
        "type": "CreateCampaign", "aggregate_id": campaign,
        "payload": {"name": "Spring", "subject": "Hi", "from_address": "news@example.com",
                    "body_text": "Hi"}}))["status"] == "accepted"
    for audience in ({"list_ids": ["news"]}, {"list_ids": ["vip"], "exclude_list_ids": ["news"]}):
        refused = outcome(api, tenants.key_a, api.post("/commands", headers=a, json={
            "type": "SendCampaign", "aggregate_id": campaign, "payload": audience}))
        assert refused["status"] == "rejected"
        assert "deleted list(s): news" in refused["reason"]
    # ...and its id is not reused, while B's list of that id still sends.
    reused = outcome(api, tenants.key_a, api.post(
        "/lists", json={"list_id": "news", "name": "News"}, headers=a))
    assert reused["status"] == "rejected" and "not reused" in reused["reason"]
    b_campaign = rid("cmp")
    assert outcome(api, tenants.key_b, api.post("/commands", headers=b, json={
        "type": "CreateCampaign", "aggregate_id": b_campaign,
        "payload": {"name": "B", "subject": "Hi", "from_address": "news@example.com",
                    "body_text": "Hi"}}))["status"] == "accepted"
    assert outcome(api, tenants.key_b, api.post("/commands", headers=b, json={
        "type": "SendCampaign", "aggregate_id": b_campaign,
        "payload": {"list_ids": ["news"]}}))["status"] == "accepted"


@pytest.mark.parametrize(("method", "path", "body"), [
    ("post", "/lists", {"list_id": "bad id", "name": "x"}),
    ("post", "/lists", {"list_id": "ok", "name": ""}),
    ("post", "/lists", {"list_id": "ok", "name": "two\nlines"}),
    ("post", "/lists", {"list_id": "ok", "name": "x", "extra": 1}),
    ("post", "/lists", {"list_id": "ok"}),
    ("patch", "/lists/ok", {"name": 5}),
    ("patch", "/lists/bad%20id", {"name": "x"}),
    ("delete", "/lists/ok?command_id=nope", None),
    ("get", "/lists/" + "x" * 200, None),
])
def test_bad_list_input_is_a_4xx_and_stores_nothing(settings, tenants, method, path, body):
    with TestClient(create_app(settings, tenants.keys, relay=False)) as client:
        response = client.request(method.upper(), path, json=body,
                                  headers=bearer(tenants.key_a))
        assert response.status_code == 422, response.text
        assert response.json()["detail"]
        assert client.post("/lists", json={"list_id": "x", "name": "x"}).status_code == 401


def test_a_campaign_is_duplicated_into_a_new_draft(api, tenants):
    a, b = bearer(tenants.key_a), bearer(tenants.key_b)
    source = rid("cmp")
    assert outcome(api, tenants.key_a, api.post("/commands", headers=a, json={
        "type": "CreateCampaign", "aggregate_id": source,
        "payload": {"name": "Spring", "subject": "Hello", "from_address": "news@example.com",
                    "body_html": "<p>Hi</p>", "track_clicks": True}}))["status"] == "accepted"
    copy = api.post(f"/campaigns/{source}/duplicate", json={}, headers=a)
    assert copy.status_code == 202, copy.text
    copy_id = copy.json()["campaign_id"]
    done = outcome(api, tenants.key_a, copy)
    assert (done["status"], done["aggregate_id"]) == ("accepted", copy_id)
    assert [e["type"] for e in done["events"]] == ["CampaignCreated"]
    deadline = time.monotonic() + 60
    while api.get(f"/campaigns/{copy_id}", headers=a).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    view = api.get(f"/campaigns/{copy_id}", headers=a).json()
    assert (view["name"], view["status"]) == ("Spring (copy)", "draft")
    # Through POST /commands, with a name of its own.
    named = rid("cmp")
    status = outcome(api, tenants.key_a, api.post("/commands", headers=a, json={
        "type": "DuplicateCampaign", "aggregate_id": named,
        "payload": {"source_campaign_id": source, "name": "Autumn"}}))
    assert status["status"] == "accepted"
    # Onto an id that exists, or from another tenant's campaign: rejected, nothing copied.
    taken = outcome(api, tenants.key_a, api.post(
        f"/campaigns/{source}/duplicate", json={"new_campaign_id": named}, headers=a))
    assert (taken["status"], taken["reason"]) == ("rejected", f"campaign {named!r} already exists")
    foreign = outcome(api, tenants.key_b, api.post(f"/campaigns/{source}/duplicate", json={},
                                                   headers=b))
    assert foreign["status"] == "rejected" and "unknown campaign" in foreign["reason"]
    assert api.post(f"/campaigns/{source}/duplicate", json={"name": ""},
                    headers=a).status_code == 422
    assert api.post(f"/campaigns/{source}/duplicate", json={"new_campaign_id": "a b"},
                    headers=a).status_code == 422


NEW_OPERATIONS = [("post", "/lists"), ("get", "/lists"), ("get", "/lists/{list_id}"),
                  ("patch", "/lists/{list_id}"), ("delete", "/lists/{list_id}"),
                  ("post", "/campaigns/{campaign_id}/duplicate"), ("get", "/campaigns"),
                  ("post", "/segments/preview")]


@pytest.mark.parametrize(("method", "path"), NEW_OPERATIONS)
def test_every_new_operation_carries_examples(settings, method, path):
    document = create_app(settings, ApiKeys([])).openapi()

    def resolved(node, depth=0):
        """The node with its $refs replaced by what they name (a few levels deep)."""
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref and depth < 4:
                return resolved(document["components"]["schemas"][ref.rsplit("/", 1)[1]],
                                depth + 1)
            return {k: resolved(v, depth) for k, v in node.items()}
        if isinstance(node, list):
            return [resolved(v, depth) for v in node]
        return node

    operation = document["paths"][path][method]
    success = next(v for k, v in operation["responses"].items() if k.startswith("2"))
    assert "example" in str(resolved(success)), f"{method} {path}: no response example"
    inputs = [operation.get("requestBody"), *operation.get("parameters", [])]
    if any(inputs):
        assert "example" in str(resolved(inputs)), f"{method} {path}: no input example"
