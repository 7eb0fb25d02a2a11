"""The local stack gives each service its own observability port and reports readiness."""

from __future__ import annotations

import re
from pathlib import Path

from services.platform.stack import SERVICES, Stack, StackPorts, _readiness_text


def test_each_service_gets_its_own_metrics_port(tmp_path: Path) -> None:
    stack = Stack(tmp_path, StackPorts(metrics=41000))
    config = stack.supervision().config()
    ports = re.findall(r'METRICS_PORT="(\d+)"', config)
    assert sorted(map(int, ports)) == list(range(41000, 41000 + len(SERVICES)))
    assert stack.metrics_port("api") == 41000 + SERVICES.index("api")


def test_readiness_is_summarised_with_the_failed_checks_only() -> None:
    assert _readiness_text({"ready": True, "checks": {"broker": "ok"}}) == "ready"
    answer = {"ready": False, "checks": {"broker": "ok", "database": "connection refused"}}
    assert _readiness_text(answer) == "not ready: database: connection refused"
    assert _readiness_text({"ready": False, "error": "timed out"}) == "not answering (timed out)"


def test_tracker_and_verp_keys_are_made_once_and_sign(tmp_path: Path) -> None:
    from services.bounces.verp import VerpKeys
    from services.engagement.tokens import TrackingKeys
    from services.platform.stack import RECEIVERS

    env = Stack(tmp_path, StackPorts(tracker=41100, bounce_smtp=41101)).env()
    assert env == Stack(tmp_path, StackPorts(tracker=41100, bounce_smtp=41101)).env()
    assert TrackingKeys.parse(env["TRACKER_KEYS"]).signing_key_id == "k1"
    assert VerpKeys.parse(env["BOUNCE_VERP_KEYS"]).signing == "a"
    assert (env["TRACKER_PUBLIC_URL"], env["BOUNCE_SMTP_PORT"]) == ("http://127.0.0.1:41100", "41101")
    names = [p.name for p in Stack(tmp_path, StackPorts()).supervision().programs]
    assert {"tracker", *RECEIVERS} <= set(names)
