"""Chaos: the supervisor restarts a SIGKILLed service, its watchdog a SIGSTOPped one.

Every service (command handler, hydrator, sender, projector, completion tracker, read API)
runs under supervisord as `make up` runs it (services/platform/supervision.py), against the
test platform, each with its observability port. Each test hurts every service process at
once, then checks, without any manual step: a new process of each runs, each restart is
counted (and by whom), every service answers /readyz 200 again, and commands are served.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas.commands import CreateCampaign
from schemas.envelope import wrap
from schemas.events import CampaignCreated
from services.common.observability import ask_readiness
from services.common.topics import COMMANDS, EVENTS
from services.platform.stack import REPO_ROOT, SERVICES
from services.platform.supervision import Program, Supervision
from tests.kafka_io import publish, read_topic
from tests.ports import free_ports
from tests.service_process import service_env

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

STALE_SECONDS = 6
# A killed member's partitions move once the group notices it left (session timeout).
SERVING_TIMEOUT = 90.0


PROBE_PORTS: dict[str, int] = {}


@pytest.fixture
def supervised(settings) -> Iterator[Supervision]:
    # A short path: the supervisor's unix socket path must fit in 108 bytes.
    state = Path(tempfile.mkdtemp(prefix="sv-"))
    ports = free_ports(len(SERVICES) + 2)
    PROBE_PORTS.clear()
    PROBE_PORTS.update(zip(SERVICES, ports, strict=False))
    programs = [Program(name, [sys.executable, "-m", f"services.{name}"],
                        env={"METRICS_PORT": str(PROBE_PORTS[name])}) for name in SERVICES]
    env = service_env(settings, CAMPAIGN_STATE_DIR=str(state), API_PORT=str(ports[-1]),
                      API_KEYS="acme:supervision-test-key", TRACKER_PORT=str(ports[-2]),
                      TRACKER_KEYS="k1:supervision-test-tracker-key")
    supervision = Supervision(state, programs, env=env, cwd=REPO_ROOT, watchdog_env={
        "WATCHDOG_STALE_SECONDS": str(STALE_SECONDS), "WATCHDOG_START_GRACE_SECONDS": "60"})
    supervision.start()
    try:
        yield supervision
    finally:
        assert supervision.stop()
        assert supervision.processes() == []


def running_pid(supervision: Supervision, name: str, *, not_pid: int | None, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = {i["name"]: i for i in supervision.processes()}
        info = states.get(name)
        if info and info["statename"] == "RUNNING" and info["pid"] and info["pid"] != not_pid:
            return int(info["pid"])
        time.sleep(0.2)
    raise AssertionError(f"{name} not running again after {timeout} s: {supervision.status_lines()}")


def all_ready(timeout: float) -> None:
    """Every service answers /readyz 200 within `timeout` (its new process, after a fault)."""
    deadline = time.monotonic() + timeout
    answers: dict[str, dict[str, object]] = {}
    while time.monotonic() < deadline:
        answers = {name: ask_readiness(f"http://127.0.0.1:{port}") for name, port in PROBE_PORTS.items()}
        if all(a.get("ready") for a in answers.values()):
            return
        time.sleep(0.5)
    raise AssertionError(f"not every service ready after {timeout} s: {answers}")


def restarts_gauge(name: str) -> float:
    """campaign_service_restarts as the service's /metrics shows it."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{PROBE_PORTS[name]}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "campaign_service_restarts":
                return float(sample.value)
    raise AssertionError(f"{name}: no campaign_service_restarts sample")


def serves_a_command(settings) -> None:
    campaign = f"c-{uuid.uuid4().hex[:8]}"
    create = CreateCampaign(name="n", subject="s", from_address="a@example.com", body_text="b")
    publish(settings, COMMANDS, [(campaign.encode(), wrap(create, tenant_id="acme", aggregate_id=campaign))])
    events = read_topic(settings, EVENTS, timeout=SERVING_TIMEOUT, idle=SERVING_TIMEOUT,
                        until=1, counting=lambda m: m.envelope.aggregate_id == campaign)
    assert [type(e.payload) for e in events if e.envelope.aggregate_id == campaign] == [CampaignCreated]


def test_every_killed_service_is_restarted_by_the_supervisor(settings, supervised) -> None:
    first = {name: running_pid(supervised, name, not_pid=None, timeout=30) for name in SERVICES}
    all_ready(60)
    serves_a_command(settings)
    killed_at = time.monotonic()
    for pid in first.values():
        os.kill(pid, signal.SIGKILL)
    for name, pid in first.items():
        # Each ran past startsecs, so supervisord restarts it at once.
        running_pid(supervised, name, not_pid=pid, timeout=15)
        assert supervised.restarts(name) == 1, name
    all_ready(60)
    print(f"\nall {len(SERVICES)} SIGKILLed: every one ready again {time.monotonic() - killed_at:.1f} s later")
    serves_a_command(settings)
    status = {line.split()[0]: line for line in supervised.status_lines()}
    for name in SERVICES:
        assert "RUNNING" in status[name] and status[name].endswith("restarts 1 (watchdog 0)"), status
        assert restarts_gauge(name) == 1, name  # each new process reports its own restart


def test_every_stopped_service_is_restarted_by_the_watchdog(settings, supervised) -> None:
    first = {name: running_pid(supervised, name, not_pid=None, timeout=30) for name in SERVICES}
    all_ready(60)
    serves_a_command(settings)
    assert {name: restarts_gauge(name) for name in SERVICES} == dict.fromkeys(SERVICES, 0)
    stopped = [n for n in SERVICES if n != "projector"]
    stopped_at = time.monotonic()
    for name in stopped:
        os.kill(first[name], signal.SIGSTOP)  # alive, but its loop no longer beats
    for name in stopped:
        new = running_pid(supervised, name, not_pid=first[name], timeout=STALE_SECONDS + 40)
        assert new != first[name] and time.monotonic() - stopped_at >= STALE_SECONDS
        assert supervised.restarts(name) == 1, name
    all_ready(60)
    print(f"\n{len(stopped)} SIGSTOPped: every one ready again {time.monotonic() - stopped_at:.1f} s later")
    status = {line.split()[0]: line for line in supervised.status_lines()}
    for name in stopped:
        assert status[name].endswith("restarts 1 (watchdog 1)"), status
    assert status["projector"].endswith("restarts 0 (watchdog 0)")  # beating: left alone
    serves_a_command(settings)
