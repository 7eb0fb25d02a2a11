"""Chaos: the supervisor restarts a SIGKILLed service, its watchdog a SIGSTOPped one.

Real services (the command handler and the completion tracker) run under supervisord as
`make up` runs them (services/platform/supervision.py), against the test platform. Each test
hurts one process, then checks, without any manual step: a new process runs, the restart is
counted (and by whom), and the command handler serves commands again.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas.commands import CreateCampaign
from schemas.envelope import wrap
from schemas.events import CampaignCreated
from services.common.topics import COMMANDS, EVENTS
from services.platform.stack import REPO_ROOT
from services.platform.supervision import Program, Supervision
from tests.kafka_io import publish, read_topic
from tests.service_process import service_env

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

STALE_SECONDS = 6
# A killed member's partitions move once the group notices it left (session timeout).
SERVING_TIMEOUT = 90.0


@pytest.fixture
def supervised(settings) -> Iterator[Supervision]:
    # A short path: the supervisor's unix socket path must fit in 108 bytes.
    state = Path(tempfile.mkdtemp(prefix="sv-"))
    programs = [Program(name, [sys.executable, "-m", f"services.{name}"])
                for name in ("command_handler", "completion")]
    env = service_env(settings, CAMPAIGN_STATE_DIR=str(state))
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


def serves_a_command(settings) -> None:
    campaign = f"c-{uuid.uuid4().hex[:8]}"
    create = CreateCampaign(name="n", subject="s", from_address="a@example.com", body_text="b")
    publish(settings, COMMANDS, [(campaign.encode(), wrap(create, tenant_id="acme", aggregate_id=campaign))])
    events = read_topic(settings, EVENTS, timeout=SERVING_TIMEOUT, idle=SERVING_TIMEOUT,
                        until=1, counting=lambda m: m.envelope.aggregate_id == campaign)
    assert [type(e.payload) for e in events if e.envelope.aggregate_id == campaign] == [CampaignCreated]


def test_a_killed_service_is_restarted_by_the_supervisor(settings, supervised) -> None:
    first = {name: running_pid(supervised, name, not_pid=None, timeout=30) for name in
             ("command_handler", "completion")}
    serves_a_command(settings)
    for name, pid in first.items():
        os.kill(pid, signal.SIGKILL)
        # The process ran past startsecs, so supervisord restarts it at once.
        running_pid(supervised, name, not_pid=pid, timeout=15)
        assert supervised.restarts(name) == 1
    serves_a_command(settings)
    status = "\n".join(supervised.status_lines())
    assert "command_handler  RUNNING" in status and "restarts 1 (watchdog 0)" in status


def test_a_stopped_service_is_restarted_by_the_watchdog(settings, supervised) -> None:
    pid = running_pid(supervised, "command_handler", not_pid=None, timeout=30)
    serves_a_command(settings)
    stopped_at = time.monotonic()
    os.kill(pid, signal.SIGSTOP)  # alive, but its loop no longer beats
    new = running_pid(supervised, "command_handler", not_pid=pid, timeout=STALE_SECONDS + 25)
    took = time.monotonic() - stopped_at
    assert new != pid and took >= STALE_SECONDS
    assert supervised.restarts("command_handler") == 1
    status = {line.split()[0]: line for line in supervised.status_lines()}
    assert status["command_handler"].endswith("restarts 1 (watchdog 1)")
    assert status["completion"].endswith("restarts 0 (watchdog 0)")  # beating: left alone
    serves_a_command(settings)
