"""The SMTP sink's configuration as its process reads it: from environment variables."""

from __future__ import annotations

import pytest

from services.common.settings import SinkSettings, load, variable
from services.smtp_sink.config import SinkConfig


def sink_config_from(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> SinkConfig:
    """The SinkConfig `python -m services.smtp_sink` builds when exactly `env` is set."""
    for name in SinkSettings.model_fields:
        monkeypatch.delenv(variable(SinkSettings, name), raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return SinkConfig.from_settings(load(SinkSettings))
