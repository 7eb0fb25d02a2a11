"""Several outbox relays (API replicas) against one database and the real test broker.

Rows are accepted into the outbox as the gateway accepts them; relays then race for them. Every
test checks campaign.commands exactly: each command id once, each campaign's commands in
acceptance order. "Kafka down" for a relay is a bootstrap address on a closed loopback port;
nothing shared is ever stopped.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from confluent_kafka import KafkaException

from services.api import outbox
from services.api.commands import CommandRequest, build_envelope
from services.api.outbox import OutboxRelay
from services.common.kafka import make_producer
from services.common.settings import Settings
from services.common.topics import COMMANDS, topic_name
from tests.kafka_io import read_topic

pytestmark = pytest.mark.integration

# A relay that has not published everything within this is stuck, not slow.
PUBLISH_TIMEOUT_S = 60.0


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accept_commands(settings: Settings, tenant: str, campaigns: list[str], count: int) -> list[str]:
    """`count` CreateCampaign commands spread over `campaigns`, stored in acceptance order."""
    ids = []
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        for i in range(count):
            request = CommandRequest.model_validate({
                "type": "CreateCampaign", "aggregate_id": campaigns[i % len(campaigns)],
                "payload": {"name": f"c{i}", "subject": "Hi", "from_address": "n@example.com",
                            "body_text": "Hi"}})
            envelope = build_envelope(request, tenant)
            outbox.accept(conn, envelope, topic_name(COMMANDS, settings))
            ids.append(str(envelope.id))
    return ids


def pending(settings: Settings) -> int:
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute("SELECT count(*) FROM command_outbox WHERE topic = %s"
                           " AND published_at IS NULL", (topic_name(COMMANDS, settings),)).fetchone()
    assert row is not None
    return int(row[0])


def wait_all_published(settings: Settings) -> None:
    deadline = time.monotonic() + PUBLISH_TIMEOUT_S
    while pending(settings):
        assert time.monotonic() < deadline, "outbox rows left unpublished"
        time.sleep(0.2)


def assert_published_once_in_order(settings: Settings, expected: list[str], campaigns: list[str]) -> None:
    records = read_topic(settings, COMMANDS, until=len(expected))  # lingers for an extra copy
    ids = [str(m.envelope.id) for m in records]
    assert sorted(ids) == sorted(expected), "a command was lost or published twice"
    for campaign in campaigns:
        mine = [str(m.envelope.id) for m in records if m.envelope.aggregate_id == campaign]
        assert mine == [c for c in expected if c in mine], f"{campaign} out of order"


@pytest.fixture
def relays(settings: Settings) -> Iterator[list[OutboxRelay]]:
    """Relays a test starts; all stopped, and this test's outbox rows removed, at the end."""
    started: list[OutboxRelay] = []
    yield started
    for relay in started:
        relay.stop()
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM command_outbox WHERE topic = %s", (topic_name(COMMANDS, settings),))


def start(relays: list[OutboxRelay], settings: Settings) -> OutboxRelay:
    relay = OutboxRelay(settings)
    relay.start()
    relays.append(relay)
    return relay


def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + PUBLISH_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_two_relays_on_a_backlog_publish_each_command_once_in_order(
    settings: Settings, relays: list[OutboxRelay]
) -> None:
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    campaigns = [f"camp-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    # More than one round's batch, already waiting when both relays start at once.
    expected = accept_commands(settings, tenant, campaigns, outbox.RELAY_BATCH + 50)
    first, second = start(relays, settings), start(relays, settings)
    wait_all_published(settings)
    assert sorted((first.published, second.published)) == [0, len(expected)]
    assert_published_once_in_order(settings, expected, campaigns)


def test_the_follower_takes_over_when_the_leader_loses_its_session(
    settings: Settings, relays: list[OutboxRelay]
) -> None:
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    campaigns = [f"camp-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    # The leader cannot reach Kafka (nothing listens on its bootstrap port).
    cut_off = settings.replace(kafka_bootstrap_servers=f"127.0.0.1:{closed_port()}")
    leader = start(relays, cut_off)
    wait_for(lambda: leader.leading, "the first relay never took the leadership")
    follower = start(relays, settings)
    expected = accept_commands(settings, tenant, campaigns, 12)
    follower.wake()
    time.sleep(3 * outbox.RELAY_IDLE_POLL_S)
    assert not follower.leading and pending(settings) == len(expected)

    # The leader's session dies (crash, network): the lock goes with it.
    assert leader._conn is not None
    backend = leader._conn.info.backend_pid
    with psycopg.connect(settings.database_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (backend,))
    wait_all_published(settings)
    assert follower.leading and follower.published == len(expected) and leader.published == 0
    assert_published_once_in_order(settings, expected, campaigns)


def test_rows_on_the_topic_but_not_marked_are_not_published_again(
    settings: Settings, relays: list[OutboxRelay]
) -> None:
    """A leader that committed a round and died before marking it left this state."""
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    campaigns = [f"camp-{uuid.uuid4().hex[:8]}"]
    expected = accept_commands(settings, tenant, campaigns, 5)
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute("SELECT aggregate_id, envelope FROM command_outbox WHERE topic = %s"
                            " ORDER BY seq LIMIT 3", (topic_name(COMMANDS, settings),)).fetchall()
    producer = make_producer(settings)
    for aggregate_id, raw in rows:
        producer.produce(topic_name(COMMANDS, settings), key=aggregate_id.encode(), value=bytes(raw))
    assert producer.flush(30) == 0
    relay = start(relays, settings)
    wait_all_published(settings)
    assert (relay.reconciled, relay.published) == (3, 2)
    assert_published_once_in_order(settings, expected, campaigns)


def test_a_new_relay_fences_a_stale_leaders_open_transaction(
    settings: Settings, relays: list[OutboxRelay]
) -> None:
    """A leader that lost its session mid-round and does not know it yet cannot commit."""
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    campaigns = [f"camp-{uuid.uuid4().hex[:8]}"]
    expected = accept_commands(settings, tenant, campaigns, 4)
    stale = OutboxRelay(settings)
    zombie = make_producer(settings, **{"transactional.id": stale.transactional_id})
    zombie.init_transactions(30)
    zombie.begin_transaction()
    with psycopg.connect(settings.database_url) as conn:
        for aggregate_id, raw in conn.execute(
                "SELECT aggregate_id, envelope FROM command_outbox WHERE topic = %s ORDER BY seq",
                (topic_name(COMMANDS, settings),)).fetchall():
            zombie.produce(topic_name(COMMANDS, settings), key=aggregate_id.encode(), value=bytes(raw))
    assert zombie.flush(30) == 0  # on the broker, inside the open transaction
    relay = start(relays, settings)
    wait_all_published(settings)
    with pytest.raises(KafkaException):
        zombie.commit_transaction(30)
    assert relay.published == len(expected)
    assert_published_once_in_order(settings, expected, campaigns)


def test_the_outbox_depth_gauge_counts_what_waits_for_kafka(settings: Settings, relays: list[OutboxRelay]) -> None:
    from services.common.metrics import OUTBOX_DEPTH

    def depth() -> float:
        return float(OUTBOX_DEPTH._value.get())  # the gauge's current value

    away = settings.replace(kafka_bootstrap_servers=f"127.0.0.1:{closed_port()}")
    accept_commands(settings, "acme", ["cmp-depth"], 7)
    stranded = start(relays, away)
    wait_for(lambda: stranded.leading and depth() == 7, "the gauge to show 7 pending rows")
    stranded.stop()
    relays.remove(stranded)
    start(relays, settings)
    wait_all_published(settings)
    wait_for(lambda: depth() == 0, "the gauge to drop to 0 once published")
