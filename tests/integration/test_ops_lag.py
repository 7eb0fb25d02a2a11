"""`campaignctl ops lag` against a real backlog on the test broker: its committed offsets, log
ends and lags equal those read independently with a consumer."""

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
