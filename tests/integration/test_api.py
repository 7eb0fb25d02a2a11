"""The read API against the real PostgreSQL read models: keys, tenant isolation, progress
figures, keyset paging, rejections and the server-sent event stream."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest
import uvicorn
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.api.auth import ApiKeyError, ApiKeys, load_api_keys, parse_api_keys

pytestmark = pytest.mark.integration


def rid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class World:
    """Two tenants with random names and keys, and helpers writing read-model rows directly."""

    def __init__(self, database_url: str) -> None:
        self.url = database_url
        self.a, self.b = rid("ta"), rid("tb")
        self.key_a, self.key_b = uuid.uuid4().hex, uuid.uuid4().hex
        self.keys = ApiKeys([(self.a, self.key_a), (self.b, self.key_b)])

    def sql(self, query: str, params: tuple = ()) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(query, params)

    def campaign(self, tenant: str, **cols) -> str:
        campaign_id = cols.pop("campaign_id", rid("cmp"))
        cols = {"name": f"name of {campaign_id}", "status": "sending", **cols}
        names = ", ".join(["tenant_id", "campaign_id", *cols])
        marks = ", ".join(["%s"] * (len(cols) + 2))
        self.sql(f"INSERT INTO campaigns ({names}) VALUES ({marks})", (tenant, campaign_id, *cols.values()))
        return campaign_id

    def recipients(self, tenant: str, campaign_id: str, statuses: list[str], updated_ago: float = 0) -> list[str]:
        ids = [f"c{i:05d}-{uuid.uuid4().hex[:6]}" for i in range(len(statuses))]
        with psycopg.connect(self.url, autocommit=True) as conn:
            for contact_id, status in zip(ids, statuses, strict=True):
                conn.execute(
                    "INSERT INTO campaign_recipients (tenant_id, campaign_id, contact_id, email, status, updated_at)"
                    " VALUES (%s, %s, %s, %s, %s, now() - %s * interval '1 second')",
                    (tenant, campaign_id, contact_id, f"{contact_id}@example.com", status, updated_ago),
                )
        return sorted(ids)

    def rejection(self, tenant: str, campaign_id: str, reason: str) -> None:
        self.sql(
            "INSERT INTO command_rejections (event_id, tenant_id, campaign_id, command_id, command_type,"
            " reason, occurred_at, correlation_id) VALUES (%s, %s, %s, %s, 'SendCampaign', %s, now(), %s)",
            (uuid.uuid4(), tenant, campaign_id, uuid.uuid4(), reason, uuid.uuid4()),
        )


@pytest.fixture
def world(platform_settings) -> World:
    return World(platform_settings.database_url)


@pytest.fixture
def client(platform_settings, world) -> Iterator[TestClient]:
    with TestClient(create_app(platform_settings, world.keys)) as c:
        yield c


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@contextmanager
def serving(app) -> Iterator[str]:
    """The app on a real uvicorn in a thread, on a free loopback port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def read_events(response: httpx.Response) -> Iterator[tuple[str, dict]]:
    event, data = "message", ""
    for line in response.iter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()
        elif line == "":
            if data:
                yield event, json.loads(data)
            event, data = "message", ""


# --- keys -------------------------------------------------------------------------------------


def test_api_key_configuration(tmp_path):
    assert parse_api_keys("acme:key1, globex:key2") == [("acme", "key1"), ("globex", "key2")]
    keys_file = tmp_path / "keys"
    keys_file.write_text("# tenant:key\ninitech:key3\n\n")
    keys = load_api_keys({"API_KEYS": "acme:key1,globex:key2", "API_KEYS_FILE": str(keys_file)})
    assert [keys.tenant_for(k) for k in ("key1", "key2", "key3", "nope")] == ["acme", "globex", "initech", None]
    with pytest.raises(ApiKeyError):
        ApiKeys([("acme", "same"), ("globex", "same")])
    with pytest.raises(ApiKeyError):
        parse_api_keys("no-colon")
    assert len(load_api_keys({})) == 0


@pytest.mark.parametrize(
    "path", ["/campaigns", "/campaigns/x", "/campaigns/x/recipients", "/campaigns/x/rejections",
             "/campaigns/x/events", "/events"]
)
def test_missing_or_unknown_key_is_401(client, world, path):
    assert client.get(path).status_code == 401
    response = client.get(path, headers=auth("not-a-key"))
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert client.get(path, headers={"Authorization": f"Basic {world.key_a}"}).status_code == 401


def test_openapi_document_lists_the_endpoints(client):
    doc = client.get("/openapi.json").json()
    assert {"/campaigns", "/campaigns/{campaign_id}", "/campaigns/{campaign_id}/recipients",
            "/campaigns/{campaign_id}/rejections", "/campaigns/{campaign_id}/events", "/events",
            "/dashboard"} <= set(doc["paths"])
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


# --- tenant isolation -------------------------------------------------------------------------


def test_a_key_lists_only_its_tenants_campaigns(client, world):
    now = datetime.now(UTC)
    a_old = world.campaign(world.a, created_at=now - timedelta(hours=1))
    a_new = world.campaign(world.a, created_at=now)
    world.campaign(world.b, created_at=now)
    listed = client.get("/campaigns", headers=auth(world.key_a)).json()["campaigns"]
    assert [c["campaign_id"] for c in listed] == [a_new, a_old]
    assert len(client.get("/campaigns", headers=auth(world.key_b)).json()["campaigns"]) == 1


@pytest.mark.parametrize(
    "suffix", ["", "/recipients", "/recipients?status=sent", "/rejections", "/events"]
)
def test_another_tenants_campaign_is_not_found_like_an_unknown_one(client, world, suffix):
    b_campaign = world.campaign(world.b, total=3, sent=3, status="completed")
    world.recipients(world.b, b_campaign, ["sent"] * 3)
    world.rejection(world.b, b_campaign, "already sent")
    assert client.get(f"/campaigns/{b_campaign}{suffix}", headers=auth(world.key_b)).status_code == 200
    theirs = client.get(f"/campaigns/{b_campaign}{suffix}", headers=auth(world.key_a))
    unknown = client.get(f"/campaigns/{rid('cmp')}{suffix}", headers=auth(world.key_a))
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json() == unknown.json()


# --- progress figures -------------------------------------------------------------------------


def test_progress_with_rates_and_eta(client, world):
    started = datetime.now(UTC) - timedelta(seconds=200)
    campaign_id = world.campaign(world.a, total=1000, queued=1000, sent=380, failed=20, started_at=started)
    world.recipients(world.a, campaign_id, ["sent"] * 100, updated_ago=120)  # settled before the window
    world.recipients(world.a, campaign_id, ["sent"] * 110 + ["failed"] * 10)  # 120 in the last minute
    world.recipients(world.a, campaign_id, ["queued"] * 5)
    body = client.get(f"/campaigns/{campaign_id}", headers=auth(world.key_a)).json()
    assert (body["status"], body["total"], body["sent"], body["failed"], body["pending"]) == (
        "sending", 1000, 380, 20, 600)
    assert body["percent"] == 40.0
    assert body["rate_last_minute"] == 2.0  # 120 recipients / 60 s
    assert body["average_rate"] == pytest.approx(2.0, rel=0.05)  # 400 / 200 s
    assert body["eta_seconds"] == 300.0  # 600 pending at 2/s
    eta_at = datetime.fromisoformat(body["eta_at"]) - datetime.fromisoformat(body["as_of"])
    assert eta_at == timedelta(seconds=300)
    listed = client.get("/campaigns", headers=auth(world.key_a)).json()["campaigns"]
    assert listed[0]["rate_last_minute"] == 2.0


def test_unhydrated_and_completed_campaigns(client, world):
    draft = world.campaign(world.a, status="draft")
    body = client.get(f"/campaigns/{draft}", headers=auth(world.key_a)).json()
    assert (body["total"], body["pending"], body["percent"], body["eta_seconds"]) == (None, None, None, None)
    started = datetime.now(UTC) - timedelta(minutes=10)
    done = world.campaign(world.a, status="completed", total=50, sent=48, failed=2,
                          started_at=started, completed_at=started + timedelta(seconds=100))
    body = client.get(f"/campaigns/{done}", headers=auth(world.key_a)).json()
    assert (body["percent"], body["pending"], body["eta_seconds"], body["rate_last_minute"]) == (100.0, 0, 0.0, 0.0)
    assert body["average_rate"] == 0.5


# --- recipients and rejections ----------------------------------------------------------------


def test_recipients_keyset_paging_and_status_filter(client, world):
    campaign_id = world.campaign(world.a, total=25)
    sent = world.recipients(world.a, campaign_id, ["sent"] * 15)
    queued = world.recipients(world.a, campaign_id, ["queued"] * 10)
    other = world.campaign(world.a)
    world.recipients(world.a, other, ["sent"] * 3)

    def pages(**params):
        after, seen = None, []
        while True:
            query = {**params, **({"after": after} if after else {})}
            body = client.get(f"/campaigns/{campaign_id}/recipients", params=query, headers=auth(world.key_a)).json()
            seen.append([r["contact_id"] for r in body["recipients"]])
            after = body["next_after"]
            if after is None:
                return seen

    assert pages(status="sent", limit=10) == [sent[:10], sent[10:]]
    assert pages(status="queued", limit=5) == [queued[:5], queued[5:]]
    everyone = sorted(sent + queued)
    assert sum(pages(limit=7), []) == everyone
    assert pages(status="failed") == [[]]
    first = client.get(f"/campaigns/{campaign_id}/recipients", headers=auth(world.key_a)).json()["recipients"][0]
    assert set(first) == {"contact_id", "email", "status", "attempts", "last_error", "updated_at"}
    for bad in ({"status": "bounced"}, {"limit": 0}, {"limit": 100_000}):
        assert client.get(f"/campaigns/{campaign_id}/recipients", params=bad,
                          headers=auth(world.key_a)).status_code == 422


def test_rejections_of_a_campaign(client, world):
    campaign_id = world.campaign(world.a)
    assert client.get(f"/campaigns/{campaign_id}/rejections", headers=auth(world.key_a)).json() == {
        "rejections": []}
    world.rejection(world.a, campaign_id, "campaign is already sending")
    world.rejection(world.a, campaign_id, "no recipients")
    body = client.get(f"/campaigns/{campaign_id}/rejections", headers=auth(world.key_a)).json()
    assert [r["reason"] for r in body["rejections"]] == ["campaign is already sending", "no recipients"]
    # A command refused for a campaign that was never created has no campaigns row, yet is found.
    never_created = rid("cmp")
    world.rejection(world.a, never_created, "unknown campaign")
    body = client.get(f"/campaigns/{never_created}/rejections", headers=auth(world.key_a)).json()
    assert [r["reason"] for r in body["rejections"]] == ["unknown campaign"]
    assert client.get(f"/campaigns/{never_created}/rejections", headers=auth(world.key_b)).status_code == 404


# --- server-sent events -----------------------------------------------------------------------


def advance(world: World, campaign_id: str, total: int, step: int, pause: float) -> None:
    for sent in range(step, total + 1, step):
        time.sleep(pause)
        world.sql("UPDATE campaigns SET sent = %s, queued = %s, updated_at = now() WHERE campaign_id = %s",
                  (sent, total, campaign_id))
    world.sql("UPDATE campaigns SET status = 'completed', completed_at = now() WHERE campaign_id = %s",
              (campaign_id,))


def test_campaign_stream_yields_progress_then_completed(platform_settings, world):
    total = 100
    campaign_id = world.campaign(world.a, total=total, started_at=datetime.now(UTC))
    writer = threading.Thread(target=advance, args=(world, campaign_id, total, 25, 0.8))
    with serving(create_app(platform_settings, world.keys)) as base, httpx.Client(base_url=base, timeout=30) as http:
        with http.stream("GET", f"/campaigns/{campaign_id}/events", headers=auth(world.key_a)) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            writer.start()
            events = list(read_events(response))  # the server ends the stream after `completed`
        writer.join()
        # The stream of another tenant's campaign is refused before it starts.
        assert http.get(f"/campaigns/{campaign_id}/events", headers=auth(world.key_b)).status_code == 404
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "completed" and set(kinds[:-1]) == {"progress"}
    sent = [data["sent"] for kind, data in events if kind == "progress"]
    assert sent[0] == 0 and sent == sorted(sent)
    assert {25, 50, 75, 100} <= set(sent)  # every change seen: polling (0.5 s) is faster than the writer
    assert events[-1][1]["status"] == "completed" and events[-1][1]["percent"] == 100.0


def test_tenant_stream_only_carries_own_campaigns(platform_settings, world):
    mine = world.campaign(world.a, total=10)
    world.campaign(world.b, total=10)
    seen: set[str] = set()
    with serving(create_app(platform_settings, world.keys)) as base, httpx.Client(base_url=base, timeout=30) as http:
        with http.stream("GET", "/events", headers=auth(world.key_a)) as response:
            deadline = time.monotonic() + 3
            for kind, data in read_events(response):
                assert kind == "progress"
                seen.add(data["campaign_id"])
                if time.monotonic() > deadline:
                    break
                if data["campaign_id"] == mine and data["sent"] == 0:
                    world.sql("UPDATE campaigns SET sent = 10, status = 'completed' WHERE campaign_id = %s", (mine,))
                if data["campaign_id"] == mine and data["sent"] == 10:
                    break
    assert seen == {mine}
