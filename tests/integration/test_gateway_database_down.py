"""The API while PostgreSQL is unreachable, on a PostgreSQL server of its own.

A separate server (own state folder under the test's tmp path, own free loopback port; never
the shared test platform's) is stopped while the API runs against it and the shared Kafka
stays up: every route answers 503 with a JSON error and Retry-After, no command is published
while it cannot be stored, and once the server is back a retried command is published once.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from projections.migrate import apply_migrations
from services.api.app import create_app
from services.api.auth import ApiKeys
from services.common.settings import Settings
from services.common.topics import COMMANDS
from services.platform.postgres import PostgresServer
from tests.kafka_io import read_topic

pytestmark = pytest.mark.integration

# The pool reconnects with a backoff: a server back for this long and still refused is a bug.
RECOVERY_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def own_postgres(server_folder: Path) -> Iterator[PostgresServer]:
    server = PostgresServer(server_folder, free_port(), durable=False)
    server.start()
    try:
        apply_migrations(server.url())
        yield server
    finally:
        server.stop()


def command(campaign_id: str, command_id: str | None = None) -> dict:
    body = {"type": "CreateCampaign", "aggregate_id": campaign_id,
            "payload": {"name": "n", "subject": "Hello", "from_address": "news@example.com",
                        "body_text": "Hi"}}
    if command_id is not None:
        body["command_id"] = command_id
    return body


def assert_unavailable(response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["retry-after"]) > 0
    assert "unavailable" in response.json()["detail"]


def test_routes_answer_503_while_the_database_is_down_and_nothing_is_published(
    settings: Settings, own_postgres: PostgresServer
) -> None:
    settings = settings.replace(database_url=own_postgres.url())
    tenant, key = f"tenant-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    headers = {"Authorization": f"Bearer {key}"}
    campaign = f"camp-{uuid.uuid4().hex[:8]}"
    app = create_app(settings, ApiKeys([(tenant, key)]), pool_timeout=2.0)
    with TestClient(app, raise_server_exceptions=False) as api:
        before = api.post("/commands", json=command(campaign), headers=headers)
        assert (before.status_code, before.json()["status"]) == (202, "published")
        assert api.get("/campaigns", headers=headers).status_code == 200

        assert own_postgres.stop()
        retried = str(uuid.uuid4())
        refused = api.post("/commands", json=command(campaign, retried), headers=headers)
        assert_unavailable(refused)
        assert refused.json()["command_id"] == retried
        # Without a command id, the 503 names the one drawn, for an idempotent retry.
        anonymous = api.post("/commands", json=command(campaign), headers=headers)
        assert_unavailable(anonymous)
        uuid.UUID(anonymous.json()["command_id"])
        for path in ("/campaigns", f"/campaigns/{campaign}", "/segments", "/lists",
                     f"/commands/{before.json()['command_id']}", "/daily-sends"):
            assert_unavailable(api.get(path, headers=headers))
        # Bad input is still refused as such: validation needs no database.
        assert api.post("/commands", json={"type": "Nope"}, headers=headers).status_code == 422

        own_postgres.start()
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while api.get("/campaigns", headers=headers).status_code != 200:
            assert time.monotonic() < deadline, "the API did not recover with its database"
            time.sleep(0.5)
        again = api.post("/commands", json=command(campaign, retried), headers=headers)
        assert (again.status_code, again.json()["command_id"]) == (202, retried)
        while api.get(f"/commands/{retried}", headers=headers).json()["status"] == "pending":
            assert time.monotonic() < deadline, "the retried command was never published"
            time.sleep(0.2)

    records = read_topic(settings, COMMANDS, until=2)
    # The command refused while the database was down reached the topic only after its retry
    # was stored, once; the anonymous one never (it was not retried).
    assert [str(m.envelope.id) for m in records] == [before.json()["command_id"], retried]
