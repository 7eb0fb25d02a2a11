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
from confluent_kafka import Consumer
from fastapi.testclient import TestClient
from pydantic import SecretStr

from projections.projector import projector_for
from schemas.contacts import contact_key
from schemas.envelope import encode, wrap
from schemas.events import CampaignCreated, CommandRejected, MessageTemplate
from services.api.app import create_app
from services.api.auth import ApiKeyError, ApiKeys, load_api_keys, parse_api_keys
from services.common.settings import ApiSettings
from services.common.topics import COMMANDS, CONTACTS, EVENTS, topic_name
from services.common.unsubscribe_tokens import sign
from tests.integration.test_projector import produce
from tests.kafka_io import read_topic

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

    def throughput(self, tenant: str, campaign_id: str, settled: int, ago: float) -> None:
        """`settled` recipients reached a terminal status `ago` seconds before now."""
        self.sql(
            "INSERT INTO campaign_throughput (tenant_id, campaign_id, second, settled)"
            " VALUES (%s, %s, date_trunc('second', now() - %s * interval '1 second'), %s)"
            " ON CONFLICT (campaign_id, second) DO UPDATE"
            " SET settled = campaign_throughput.settled + EXCLUDED.settled",
            (tenant, campaign_id, ago, settled),
        )

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
    keys = load_api_keys(ApiSettings(api_keys=SecretStr("acme:key1,globex:key2"),
                                     api_keys_file=keys_file))
    assert [keys.tenant_for(k) for k in ("key1", "key2", "key3", "nope")] == ["acme", "globex", "initech", None]
    with pytest.raises(ApiKeyError):
        ApiKeys([("acme", "same"), ("globex", "same")])
    with pytest.raises(ApiKeyError):
        parse_api_keys("no-colon")
    assert len(load_api_keys(ApiSettings(api_keys=SecretStr("")))) == 0
    with pytest.raises(ApiKeyError, match="API_KEYS_FILE .*: No such file"):
        load_api_keys(ApiSettings(api_keys_file=tmp_path / "absent"))


@pytest.mark.parametrize(
    "path", ["/campaigns", "/campaigns/x", "/campaigns/x/recipients", "/campaigns/x/rejections",
             "/campaigns/x/events", "/events", "/campaigns/x/recipients/y", "/daily-sends",
             "/lists", f"/commands/{uuid.uuid4()}", f"/commands/{uuid.uuid4()}/events"]
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
            "/dashboard", "/campaigns/{campaign_id}/recipients/{contact_id}", "/daily-sends",
            "/lists", "/commands", "/commands/{command_id}", "/commands/{command_id}/events",
            } <= set(doc["paths"])
    assert client.post("/commands", json={}).status_code == 401
    request = doc["components"]["schemas"]["CommandRequest"]
    assert "PauseCampaign" in request["properties"]["type"]["enum"]
    assert "AutoPauseCampaign" not in request["properties"]["type"]["enum"]
    campaign = doc["components"]["schemas"]["Campaign"]
    assert {"skipped", "excluded", "retrying", "ambiguous", "paused_at", "cancelled_at"} <= set(
        campaign["properties"])
    assert "paused" in campaign["properties"]["status"]["enum"]
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
    world.throughput(world.a, campaign_id, 100, ago=120)  # settled before the window
    world.throughput(world.a, campaign_id, 70, ago=30)  # 120 in the last minute
    world.throughput(world.a, campaign_id, 50, ago=1)
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
    assert set(first) == {"contact_id", "email", "status", "attempts", "last_error", "updated_at",
                          "ambiguous", "smtp_code", "reason", "last_event_at"}
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


def test_paused_campaign_with_every_counter(client, world):
    started = datetime.now(UTC) - timedelta(seconds=100)
    paused_at = started + timedelta(seconds=50)
    campaign_id = world.campaign(
        world.a, status="paused", total=100, queued=100, sent=40, failed=5, skipped=5,
        excluded=7, retrying=3, ambiguous=2, started_at=started, paused_at=paused_at,
        pause_reason="failure rate 25%", paused_automatically=True)
    body = client.get(f"/campaigns/{campaign_id}", headers=auth(world.key_a)).json()
    assert (body["status"], body["pending"], body["percent"], body["skipped"], body["excluded"],
            body["retrying"], body["ambiguous"]) == ("paused", 50, 50.0, 5, 7, 3, 2)
    assert datetime.fromisoformat(body["paused_at"]) == paused_at
    assert (body["pause_reason"], body["paused_automatically"]) == ("failure rate 25%", True)
    assert body["eta_seconds"] is None  # nothing moves while paused


def test_a_recipient_with_its_attempts(client, world):
    campaign_id = world.campaign(world.a, total=1)
    at = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    world.sql(
        "INSERT INTO campaign_recipients (tenant_id, campaign_id, contact_id, email, status,"
        " attempts, ambiguous, last_event_at) VALUES (%s, %s, 'k1', 'k1@example.com', 'sent', 3,"
        " 1, %s)", (world.a, campaign_id, at))
    for attempt in (1, 2):
        world.sql(
            "INSERT INTO recipient_attempts (event_id, tenant_id, campaign_id, contact_id,"
            " attempt, smtp_code, detail, occurred_at) VALUES (%s, %s, %s, 'k1', %s, 451,"
            " '451 later', %s)",
            (uuid.uuid4(), world.a, campaign_id, attempt, at - timedelta(minutes=3 - attempt)))
    body = client.get(f"/campaigns/{campaign_id}/recipients/k1", headers=auth(world.key_a)).json()
    assert (body["recipient"]["status"], body["recipient"]["ambiguous"]) == ("sent", 1)
    assert [(a["attempt"], a["outcome"]) for a in body["attempts"]] == [
        (1, "deferred"), (2, "deferred"), (3, "sent")]
    for key, path in ((world.key_b, f"/campaigns/{campaign_id}/recipients/k1"),
                      (world.key_a, f"/campaigns/{campaign_id}/recipients/nobody")):
        assert client.get(path, headers=auth(key)).status_code == 404


def test_daily_sends_and_list_counts_per_tenant(client, world):
    for tenant, sent in ((world.a, 10), (world.b, 99)):
        world.sql("INSERT INTO tenant_daily_sends (tenant_id, day, sent, failed, skipped)"
                  " VALUES (%s, '2030-01-01', %s, 1, 2), (%s, '2030-01-02', %s, 0, 0)",
                  (tenant, sent, tenant, sent + 1))
        world.sql("INSERT INTO contacts (tenant_id, contact_id, globally_unsubscribed)"
                  " VALUES (%s, 'p1', false), (%s, 'p2', true)", (tenant, tenant))
        world.sql("INSERT INTO contact_list_members (tenant_id, list_id, contact_id)"
                  " VALUES (%s, 'news', 'p1'), (%s, 'news', 'p2')", (tenant, tenant))
    days = client.get("/daily-sends", headers=auth(world.key_a)).json()["days"]
    assert [(d["day"], d["sent"], d["failed"], d["skipped"]) for d in days] == [
        ("2030-01-01", 10, 1, 2), ("2030-01-02", 11, 0, 0)]
    since = client.get("/daily-sends", params={"since": "2030-01-02"},
                       headers=auth(world.key_a)).json()["days"]
    assert [d["day"] for d in since] == ["2030-01-02"]
    lists = client.get("/lists", headers=auth(world.key_a)).json()["lists"]
    assert lists == [{"list_id": "news", "name": None, "created_at": None, "members": 2,
                      "mailable": 1, "unsubscribed": 1, "suppressed": 0}]


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


# --- command gateway ----------------------------------------------------------------------------


def create_campaign_body(campaign_id: str, **payload) -> dict:
    return {"type": "CreateCampaign", "aggregate_id": campaign_id,
            "payload": {"name": "Spring", "subject": "Hello", "from_address": "news@example.com",
                        "body_text": "Hi", **payload}}


@pytest.fixture
def gateway(settings, world) -> Iterator[TestClient]:
    """The API with its outbox relay, publishing to this test's own topics."""
    with TestClient(create_app(settings, world.keys)) as c:
        yield c


def test_a_valid_command_is_published_once_with_the_callers_tenant(gateway, world, settings):
    campaign_id = rid("cmp")
    body = {**create_campaign_body(campaign_id), "command_id": str(uuid.uuid4())}
    first = gateway.post("/commands", json=body, headers=auth(world.key_a))
    assert first.status_code == 202, first.text
    # "published" when the relay got it onto the topic within the gateway's wait, else
    # "pending" (a loaded machine); either way it reaches the topic exactly once (below).
    assert first.json()["status"] in ("published", "pending")
    assert first.json()["command_id"] == body["command_id"]
    again = gateway.post("/commands", json=body, headers=auth(world.key_a))  # a retried request
    assert (again.status_code, again.json()["command_id"]) == (202, body["command_id"])
    other = {**create_campaign_body(campaign_id, name="Autumn"), "command_id": body["command_id"]}
    assert gateway.post("/commands", json=other, headers=auth(world.key_a)).status_code == 409
    records = read_topic(settings, COMMANDS, until=1, idle=2.0)
    assert [(str(m.envelope.id), m.envelope.tenant_id, m.envelope.aggregate_id, m.envelope.type)
            for m in records] == [(body["command_id"], world.a, campaign_id, "CreateCampaign")]
    assert records[0].payload.name == "Spring"
    deadline = time.monotonic() + 10  # the relay marks it published after the broker's ack
    while True:
        status = gateway.get(f"/commands/{body['command_id']}", headers=auth(world.key_a)).json()
        if status["status"] != "pending" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert (status["status"], status["type"], status["aggregate_id"]) == (
        "published", "CreateCampaign", campaign_id)
    # Another tenant's key does not see it.
    assert gateway.get(f"/commands/{body['command_id']}",
                       headers=auth(world.key_b)).status_code == 404


@pytest.mark.parametrize(("body", "loc"), [
    ({"type": "Launch", "aggregate_id": "c1", "payload": {}}, ["body", "type"]),
    ({"type": "AutoPauseCampaign", "aggregate_id": "c1", "payload": {}}, ["body", "type"]),
    ({"type": "SendCampaign", "aggregate_id": "bad id!", "payload": {}}, ["body", "aggregate_id"]),
    ({"type": "SendCampaign", "aggregate_id": "c1", "payload": {}, "tenant_id": "x"},
     ["body", "tenant_id"]),
    (create_campaign_body("c1", subject="Hi\r\nBcc: x@example.com"), ["body", "payload", "subject"]),
    (create_campaign_body("c1", from_address="nobody"), ["body", "payload", "from_address"]),
    ({"type": "SendCampaign", "aggregate_id": "c1", "payload": {"list_ids": ["ok", "no way"]}},
     ["body", "payload", "list_ids", 1]),
    ({"type": "PauseCampaign", "aggregate_id": "c1", "payload": {"why": "x"}},
     ["body", "payload", "why"]),
])
def test_an_invalid_command_is_refused_with_the_path_of_the_fault(gateway, world, body, loc):
    response = gateway.post("/commands", json=body, headers=auth(world.key_a))
    assert response.status_code == 422
    assert loc in [error["loc"] for error in response.json()["detail"]], response.json()


def test_the_outcome_comes_from_the_events_the_command_caused(gateway, world, settings):
    accepted = gateway.post("/commands", json=create_campaign_body(rid("cmp")),
                            headers=auth(world.key_a)).json()["command_id"]
    rejected_campaign = rid("cmp")
    rejected_body = {"type": "SendCampaign", "aggregate_id": rejected_campaign,
                     "payload": {"list_ids": ["all"]}}
    rejected = gateway.post("/commands", json=rejected_body,
                            headers=auth(world.key_a)).json()["command_id"]
    # What the command handler would answer: an event caused by each command.
    accepted_campaign = gateway.get(f"/commands/{accepted}",
                                    headers=auth(world.key_a)).json()["aggregate_id"]
    produce(settings, [
        (EVENTS, accepted_campaign, encode(wrap(
            CampaignCreated(name="Spring", template=MessageTemplate(
                subject="Hello", from_address="news@example.com", body_text="Hi")),
            tenant_id=world.a, aggregate_id=accepted_campaign,
            causation_id=uuid.UUID(accepted)))),
        (EVENTS, rejected_campaign, encode(wrap(
            CommandRejected(command_id=uuid.UUID(rejected), command_type="SendCampaign",
                            reason="campaign does not exist"),
            tenant_id=world.a, aggregate_id=rejected_campaign,
            causation_id=uuid.UUID(rejected)))),
    ])
    streaming = create_app(settings, world.keys, relay=False)
    with serving(streaming) as base, httpx.Client(base_url=base, timeout=30) as http:
        with http.stream("GET", f"/commands/{rejected}/events",
                         headers=auth(world.key_a)) as response:
            assert response.status_code == 200
            with projector_for(settings) as projector:
                projector.drain(timeout=60)
            events = list(read_events(response))  # ends at the final status
    assert [kind for kind, _ in events] == ["status"] * len(events)
    assert events[0][1]["status"] == "published"
    assert (events[-1][1]["status"], events[-1][1]["reason"]) == (
        "rejected", "campaign does not exist")
    done = gateway.get(f"/commands/{accepted}", headers=auth(world.key_a)).json()
    assert done["status"] == "accepted"
    assert [e["type"] for e in done["events"]] == ["CampaignCreated"]
    assert gateway.get(f"/commands/{uuid.uuid4()}", headers=auth(world.key_a)).status_code == 404


# --- one-click unsubscribe --------------------------------------------------------------------

UNSUBSCRIBE_SECRET = b"test-unsubscribe-secret"


def test_one_click_unsubscribe_publishes_one_contact_event(settings, world):
    token = sign(UNSUBSCRIBE_SECRET, world.a, "contact-77", "camp-spring")
    app = create_app(settings, world.keys, unsubscribe_secret=UNSUBSCRIBE_SECRET)
    with TestClient(app) as api:
        page = api.get("/unsubscribe", params={"token": token})
        assert page.status_code == 200 and 'method="post"' in page.text
        for _ in range(2):  # a repeated click stores nothing new
            done = api.post("/unsubscribe", params={"token": token},
                            data={"List-Unsubscribe": "One-Click"})
            assert done.status_code == 200, done.text
        for bad in (token[:-2], sign(b"another secret", world.a, "contact-77", "camp-spring"),
                    "nonsense"):
            assert api.post("/unsubscribe", params={"token": bad}).status_code == 400
            assert api.get("/unsubscribe", params={"token": bad}).status_code == 400
        deadline = time.monotonic() + 30
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            while True:  # stored once, then published by the relay
                counts = conn.execute(
                    "SELECT count(*), count(*) FILTER (WHERE published_at IS NULL)"
                    " FROM command_outbox WHERE topic = %s",
                    (topic_name(CONTACTS, settings),)).fetchone()
                assert counts is not None
                stored, pending = counts
                if (stored, pending) == (1, 0):
                    break
                assert stored == 1 and time.monotonic() < deadline, (stored, pending)
                time.sleep(0.1)
    records = read_topic(settings, CONTACTS, until=1, idle=3.0)
    assert len(records) == 1
    event = records[0]
    assert (event.envelope.tenant_id, event.envelope.type, event.payload.contact_id,
            event.payload.list_id) == (world.a, "ContactUnsubscribed", "contact-77", None)
    assert "camp-spring" in event.payload.reason
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers,
                         "group.id": f"probe-{uuid.uuid4().hex}", "auto.offset.reset": "earliest"})
    try:
        consumer.subscribe([topic_name(CONTACTS, settings)])
        keys: list[bytes | None] = []
        deadline = time.monotonic() + 20
        while not keys and time.monotonic() < deadline:
            keys = [m.key() for m in consumer.consume(10, 1.0) if m.error() is None]
    finally:
        consumer.close()
    assert keys == [contact_key(world.a, "contact-77")]


def test_unsubscribe_without_a_secret_is_unavailable(client):
    assert client.post("/unsubscribe", params={"token": "x.y"}).status_code == 503
