"""CAMPAIGN_METRICS: on by default, off makes every metric a no-op, anything else refused."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.common.settings import Settings, SettingsError, load


def test_metrics_are_on_unless_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAMPAIGN_METRICS", raising=False)
    assert load(Settings).campaign_metrics == "on"
    monkeypatch.setenv("CAMPAIGN_METRICS", " OFF ")
    assert load(Settings).campaign_metrics == "off"


def test_a_misspelt_switch_is_refused_with_the_values_it_takes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAMPAIGN_METRICS", "of")
    with pytest.raises(SettingsError, match="CAMPAIGN_METRICS: Input should be 'on' or 'off'"):
        load(Settings)


def test_switched_off_every_metric_takes_its_calls_and_exports_nothing() -> None:
    # A fresh interpreter: the switch is read when the metrics module is first imported.
    script = """
from prometheus_client import REGISTRY, generate_latest
from services.common import metrics
metrics.DELIVERIES.labels(outcome="sent", reply_class="2xx").inc()
metrics.SMTP_TRANSACTION_SECONDS.labels(relay="r").observe(0.1)
metrics.HELD_RECIPIENTS.set(3)
metrics.SERVICE_RESTARTS.set_function(lambda: 1)
metrics.count_produced("campaign.deliveries")
with metrics.BATCH_SECONDS.time():
    pass
print(b"campaign_" in generate_latest(REGISTRY))
"""
    def run(value: str) -> str:
        return subprocess.run([sys.executable, "-c", script], env={"CAMPAIGN_METRICS": value},
                              capture_output=True, text=True, check=True).stdout.strip()

    assert run("off") == "False"
    assert run("on") == "True"
