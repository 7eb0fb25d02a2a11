"""Fixtures for tests that touch the real platform.

Addresses come from KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL / SMTP_HOST+SMTP_PORT when set;
otherwise, when a Docker engine answers, testcontainers could provide them; on these machines
(no Docker engine) the fixtures start the local platform themselves on free ports picked at
random (kept in `.state/test-platform/ports.json`, so later pytest runs of this checkout reuse
a platform left running), and stop it at the end under CI, only if they started it.
TEST_KAFKA_BROKERS=3 makes that platform a 3-node KRaft cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient

from projections.migrate import apply_migrations
from services.common.settings import Settings
from services.common.topics import ensure_topics
from tests.ports import free_ports

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_STATE = REPO_ROOT / ".state" / "test-platform"
PORTS_FILE = TEST_STATE / "ports.json"


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


def _containers() -> Iterator[Settings]:  # pragma: no cover - needs a Docker engine
    from testcontainers.kafka import KafkaContainer
    from testcontainers.postgres import PostgresContainer

    with KafkaContainer() as kafka, PostgresContainer("postgres:15") as pg:
        url = pg.get_connection_url().replace("postgresql+psycopg2", "postgresql")
        apply_migrations(url)
        yield Settings(kafka_bootstrap_servers=kafka.get_bootstrap_server(), database_url=url)


def _platform_ports(brokers: int) -> dict[str, Any]:
    """The ports of the platform this checkout left running, or new free ones."""
    from services.platform.kafka import KafkaCluster
    from services.platform.postgres import PostgresServer

    try:
        known = json.loads(PORTS_FILE.read_text())
        pairs = [tuple(pair) for pair in known["kafka"]]
        running = KafkaCluster(TEST_STATE, pairs, REPO_ROOT / ".state" / "kafka-libs").pids()
        if len(pairs) == brokers and (running or PostgresServer(TEST_STATE, known["postgres"]).running()):
            return {"kafka": pairs, "postgres": known["postgres"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    free = free_ports(2 * brokers + 1)
    ports = {"kafka": [(free[2 * i], free[2 * i + 1]) for i in range(brokers)], "postgres": free[-1]}
    PORTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    PORTS_FILE.write_text(json.dumps(ports))
    return ports


@pytest.fixture(scope="session")
def platform_settings() -> Iterator[Settings]:
    """Kafka + PostgreSQL for the whole session, with migrations applied."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") and os.environ.get("DATABASE_URL"):
        settings = Settings()
        apply_migrations(settings.database_url)
        yield settings
        return
    if _docker_answers():  # pragma: no cover - no Docker engine on the project's machines
        yield from _containers()
        return

    from services.platform.kafka import KafkaCluster
    from services.platform.postgres import PostgresServer

    brokers = int(os.environ.get("TEST_KAFKA_BROKERS", "1"))
    ports = _platform_ports(brokers)
    kafka = KafkaCluster(TEST_STATE, ports["kafka"], REPO_ROOT / ".state" / "kafka-libs")
    postgres = PostgresServer(TEST_STATE, ports["postgres"], durable=False)
    started_kafka = not kafka.pids()
    started_pg = not postgres.running()
    if started_kafka:
        for node in kafka.nodes:  # test data is disposable; a stale quorum is not
            shutil.rmtree(node.home, ignore_errors=True)
    kafka.start()
    postgres.start()
    url = postgres.create_database("campaigns_test")
    apply_migrations(url)
    yield Settings(
        kafka_bootstrap_servers=kafka.bootstrap,
        database_url=url,
        state_dir=TEST_STATE,
    )
    # Stopped only under CI: on a developer's machine several pytest runs may share it.
    if os.environ.get("CI"):
        if started_kafka:
            kafka.stop()
        if started_pg:
            postgres.stop()


@pytest.fixture
def settings(platform_settings: Settings) -> Iterator[Settings]:
    """Settings with a fresh topic prefix: every test gets its own topics and groups, deleted
    afterwards (a broker holding every test's partitions runs out of file descriptors)."""
    isolated = platform_settings.replace(topic_prefix=f"t{uuid.uuid4().hex[:10]}.")
    ensure_topics(isolated)
    yield isolated
    admin = AdminClient({"bootstrap.servers": isolated.kafka_bootstrap_servers})
    mine = [t for t in admin.list_topics(timeout=10).topics if t.startswith(isolated.topic_prefix)]
    if mine:
        for future in admin.delete_topics(mine, operation_timeout=30).values():
            future.result()


@pytest.fixture
def server_folder() -> Iterator[Path]:
    """A folder for a test's own server that the `postgres` user can reach: outside pytest's
    basetemp, whose root another pytest session on this machine may reset to mode 0700 (it
    did, under a concurrent run, and the server's pg_ctl lost its data folder)."""
    folder = Path(tempfile.mkdtemp(prefix="campaign-test-server-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
