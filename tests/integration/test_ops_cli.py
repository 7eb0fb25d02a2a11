"""`campaignctl ops`: `lag` against a real backlog on the test broker (its committed offsets,
log ends and lags equal those read independently with a consumer), and `status` against live
service endpoints."""

from __future__ import annotations

import json

from confluent_kafka import Consumer, TopicPartition
from typer.testing import CliRunner

from services.cli.main import app
from services.common.settings import Settings
from services.common.topics import RECIPIENTS, topic_name
from tests.kafka_io import publish
from tests.service_process import service_env


def test_ops_lag_matches_offsets_read_independently(settings: Settings) -> None:
    topic = topic_name(RECIPIENTS, settings)
    published = publish(settings, RECIPIENTS, ((f"k{i}".encode(), b"x") for i in range(600)))
    group = settings.group("sender")
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers,
                         "group.id": group, "enable.auto.commit": False})
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        partitions = sorted(metadata.partitions)
        # The group has read half of partition 0 and all of partition 1; nothing elsewhere.
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in partitions}
        assert sum(ends.values()) == published
        commits = {partitions[0]: ends[partitions[0]] // 2, partitions[1]: ends[partitions[1]]}
        consumer.commit(offsets=[TopicPartition(topic, p, o) for p, o in commits.items()],
                        asynchronous=False)
        independent = {tp.partition: tp.offset for tp in consumer.committed(
            [TopicPartition(topic, p) for p in partitions], timeout=10)}
    finally:
        consumer.close()

    result = CliRunner().invoke(app, ["ops", "lag", "--json", "--interval", "0.2"],
                                env=service_env(settings))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["groups"] == [group]
    rows = {row["partition"]: row for row in report["partitions"] if row["topic"] == topic}
    assert set(rows) == set(commits)
    for partition, row in rows.items():
        assert row["committed"] == independent[partition]
        assert row["log_end"] == ends[partition]
        assert row["lag"] == ends[partition] - independent[partition]
    assert rows[partitions[0]]["lag"] > 0 and rows[partitions[0]]["seconds_to_drain"] is None
    assert rows[partitions[1]]["lag"] == 0 and rows[partitions[1]]["seconds_to_drain"] == 0.0


def test_ops_lag_fails_clearly_when_the_cluster_is_away(settings: Settings) -> None:
    from tests.ports import free_ports

    env = service_env(settings, KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_ports(1)[0]}")
    result = CliRunner().invoke(app, ["ops", "lag", "--timeout", "1"], env=env)
    assert result.exit_code == 1
    assert "the cluster did not answer" in result.output


def test_ops_status_shows_readiness_version_and_assignment(settings: Settings) -> None:
    from prometheus_client import CollectorRegistry

    from services.common.heartbeat import Heartbeat
    from services.common.observability import ObservabilityServer, broker_check

    ready = ObservabilityServer(
        0, Heartbeat(None), {"broker": broker_check(settings.kafka_bootstrap_servers)},
        registry=CollectorRegistry(), about={"service": "sender", "version": "9.9.9"},
        assignment=lambda: ["campaign.recipients[0]", "campaign.recipients[3]"]).start()
    failing = ObservabilityServer(
        0, Heartbeat(None), {"database": lambda: "connection refused"},
        registry=CollectorRegistry(), about={"service": "projector", "version": "9.9.9"}).start()
    try:
        both = ["ops", "status", "--json",
                "--endpoint", f"sender=http://127.0.0.1:{ready.port}",
                "--endpoint", f"projector=http://127.0.0.1:{failing.port}"]
        result = CliRunner().invoke(app, both, env=service_env(settings))
        assert result.exit_code == 1, result.output
        rows = {row["service"]: row for row in json.loads(result.stdout)["services"]}
        assert rows["sender"]["ready"] is True and rows["sender"]["version"] == "9.9.9"
        assert rows["sender"]["assignment"] == ["campaign.recipients[0]", "campaign.recipients[3]"]
        assert rows["projector"]["ready"] is False
        assert rows["projector"]["problem"] == "database: connection refused"
        only_ready = CliRunner().invoke(
            app, ["ops", "status", "--endpoint", f"sender=http://127.0.0.1:{ready.port}"],
            env=service_env(settings))
        assert only_ready.exit_code == 0, only_ready.output
    finally:
        ready.close()
        failing.close()


def test_ops_status_refuses_a_malformed_endpoint(settings: Settings) -> None:
    result = CliRunner().invoke(app, ["ops", "status", "--endpoint", "sender"],
                                env=service_env(settings))
    assert result.exit_code == 2
    assert "expected NAME=http://HOST:PORT" in result.output
