"""The command gateway across a Kafka outage, on a broker of its own.

A separate single-node Kafka (own state folder under .state/, own free loopback ports; never
the shared test broker) is stopped while the API keeps accepting commands into the PostgreSQL
outbox, then started again: every accepted command reaches campaign.commands exactly once, in
the order it was accepted.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.api.auth import ApiKeys
from services.common.settings import Settings
from services.common.topics import COMMANDS, ensure_topics
from services.platform.kafka import KafkaNode
from tests.kafka_io import read_topic
from tests.ports import free_ports

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
# A relay that has not published within this after the broker is back is stuck.
PUBLISH_TIMEOUT_S = 90.0


@pytest.fixture
def own_broker(platform_settings: Settings) -> Iterator[tuple[KafkaNode, Settings]]:
    state = REPO_ROOT / ".state" / f"gateway-kafka-{uuid.uuid4().hex[:8]}"
    port, controller = free_ports(2)
    node = KafkaNode(state, port, controller, REPO_ROOT / ".state" / "kafka-libs")
    node.start()
    try:
        settings = platform_settings.replace(kafka_bootstrap_servers=node.bootstrap,
                           topic_prefix=f"g{uuid.uuid4().hex[:8]}.")
        ensure_topics(settings, specs=(COMMANDS,))
        yield node, settings
    finally:
        node.stop()
        shutil.rmtree(state, ignore_errors=True)


def command(campaign_id: str, name: str) -> dict:
    return {"type": "CreateCampaign", "aggregate_id": campaign_id,
            "payload": {"name": name, "subject": "Hello", "from_address": "news@example.com",
                        "body_text": "Hi"}}


def test_commands_accepted_during_an_outage_are_published_once_in_order(own_broker) -> None:
    node, settings = own_broker
    key = uuid.uuid4().hex
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {key}"}
    campaigns = [f"camp-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    with TestClient(create_app(settings, ApiKeys([(tenant, key)]))) as api:
        before = api.post("/commands", json=command(campaigns[0], "before"), headers=headers)
        # Published, or about to be: the relay's first Kafka transaction on a fresh broker
        # waits for the transaction log to be created.
        assert (before.status_code, before.json()["status"]) in ((202, "published"), (202, "pending"))
        deadline = time.monotonic() + PUBLISH_TIMEOUT_S
        while api.get(before.json()["status_url"], headers=headers).json()["status"] == "pending":
            assert time.monotonic() < deadline, "the first command was never published"
            time.sleep(0.2)

        assert node.stop()
        during = []
        for i in range(6):  # two campaigns, interleaved: each keeps its own order
            response = api.post("/commands", json=command(campaigns[i % 2], f"during-{i}"),
                                headers=headers)
            assert (response.status_code, response.json()["status"]) == (202, "pending")
            during.append(response.json()["command_id"])
        statuses = {api.get(f"/commands/{c}", headers=headers).json()["status"] for c in during}
        assert statuses == {"pending"}

        node.start()
        deadline = time.monotonic() + PUBLISH_TIMEOUT_S
        while api.get(f"/commands/{during[-1]}", headers=headers).json()["status"] != "published":
            assert time.monotonic() < deadline, "outbox not published after the broker returned"
            time.sleep(0.5)
        after = api.post("/commands", json=command(campaigns[1], "after"), headers=headers)
        assert after.status_code == 202

    records = read_topic(settings, COMMANDS, until=8, idle=3.0)
    ids = [str(m.envelope.id) for m in records]
    expected = [before.json()["command_id"], *during, after.json()["command_id"]]
    assert sorted(ids) == sorted(expected), "a command was lost or published twice"
    for campaign in campaigns:  # per campaign (one partition each), acceptance order
        mine = [str(m.envelope.id) for m in records if m.envelope.aggregate_id == campaign]
        assert mine == [c for c in expected if c in mine]
    assert {m.envelope.tenant_id for m in records} == {tenant}
