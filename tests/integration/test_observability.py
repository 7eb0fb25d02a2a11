"""The operator endpoint of every service (services/common/observability.py) over real HTTP,
with readiness checks against the real test broker and PostgreSQL and a private broker that is
stopped and started again."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter

from services.common.heartbeat import Heartbeat
from services.common.observability import (
    CHECK_CACHE_SECONDS,
    ObservabilityServer,
    broker_check,
    database_check,
)
from services.common.settings import Settings
from services.platform.kafka import KafkaNode
from services.platform.stack import REPO_ROOT
from tests.ports import free_ports


@pytest.fixture
def served() -> Iterator[tuple[ObservabilityServer, Heartbeat]]:
    heartbeat = Heartbeat(None, interval=0.0)
    server = ObservabilityServer(0, heartbeat, registry=CollectorRegistry(), stale_after=1.0)
    server.start()
    try:
        yield server, heartbeat
    finally:
        server.close()


def url(server: ObservabilityServer, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


def test_healthz_follows_the_heartbeat(served: tuple[ObservabilityServer, Heartbeat]) -> None:
    server, heartbeat = served
    assert httpx.get(url(server, "/healthz")).json() == {"alive": True, "detail": "no beat yet"}
    heartbeat.beat()
    assert httpx.get(url(server, "/healthz")).status_code == 200
    time.sleep(1.3)
    stale = httpx.get(url(server, "/healthz"))
    assert stale.status_code == 503
    assert stale.json()["alive"] is False
    heartbeat.beat()
    assert httpx.get(url(server, "/healthz")).status_code == 200


def test_metrics_serves_the_registry() -> None:
    registry = CollectorRegistry()
    sent = Counter("campaign_test_sent", "sent in this test", ["outcome"], registry=registry)
    sent.labels(outcome="delivered").inc(3)
    server = ObservabilityServer(0, Heartbeat(None), registry=registry).start()
    try:
        body = httpx.get(url(server, "/metrics")).text
        assert 'campaign_test_sent_total{outcome="delivered"} 3.0' in body
        missing = httpx.get(url(server, "/nowhere"))
        assert missing.status_code == 404
        assert "try /metrics, /healthz or /readyz" in missing.json()["error"]
    finally:
        server.close()


def test_readyz_checks_the_real_broker_and_database(settings: Settings) -> None:
    closed = free_ports(1)[0]
    server = ObservabilityServer(0, Heartbeat(None), {
        "broker": broker_check(settings.kafka_bootstrap_servers),
        "database": database_check(settings.database_url),
    }, registry=CollectorRegistry()).start()
    try:
        ready = httpx.get(url(server, "/readyz"), timeout=10)
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"ready": True, "checks": {"broker": "ok", "database": "ok"}}
        server.add_check("database", database_check(
            f"postgresql://campaigns@127.0.0.1:{closed}/campaigns", timeout=1.0))
        down = httpx.get(url(server, "/readyz"), timeout=10)
        assert down.status_code == 503
        assert down.json()["checks"]["broker"] == "ok"
        assert "Connection refused" in down.json()["checks"]["database"]
    finally:
        server.close()


@pytest.fixture
def private_broker() -> Iterator[KafkaNode]:
    state = Path(tempfile.mkdtemp(prefix="probe-broker-"))
    port, controller = free_ports(2)
    node = KafkaNode(state, port, controller, REPO_ROOT / ".state" / "kafka-libs")
    node.start()
    try:
        yield node
    finally:
        node.stop()
        shutil.rmtree(state, ignore_errors=True)


def wait_status(server: ObservabilityServer, status: int, timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        answer = httpx.get(url(server, "/readyz"), timeout=10)
        if answer.status_code == status:
            return dict(answer.json())
        assert time.monotonic() < deadline, f"/readyz stayed {answer.status_code}: {answer.text}"
        time.sleep(CHECK_CACHE_SECONDS / 2)


@pytest.mark.timeout(180)
def test_readyz_goes_false_while_the_broker_is_stopped(private_broker: KafkaNode) -> None:
    server = ObservabilityServer(0, Heartbeat(None), {
        "broker": broker_check(private_broker.bootstrap, timeout=1.0),
    }, registry=CollectorRegistry()).start()
    try:
        assert wait_status(server, 200, 30) == {"ready": True, "checks": {"broker": "ok"}}
        private_broker.stop()
        down = wait_status(server, 503, 30)
        assert down["ready"] is False
        assert "KafkaException" in str(down["checks"])
        private_broker.start()
        assert wait_status(server, 200, 60)["ready"] is True
    finally:
        server.close()
