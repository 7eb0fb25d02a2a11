"""The settings: one typed class per service, read from the environment and documented."""

from __future__ import annotations

import pytest

from services.common.settings import (
    DOCUMENTED,
    CompletionSettings,
    SenderSettings,
    Settings,
    SettingsError,
    load,
    variable,
)
from services.common.settings_table import README, tables, updated


def test_the_readme_table_is_generated_from_the_settings_classes() -> None:
    readme = README.read_text(encoding="utf-8")
    assert updated(readme) == readme, "run `python -m services.common.settings_table`"


def test_every_setting_of_every_class_is_in_the_table() -> None:
    table = tables()
    for cls, _ in DOCUMENTED:
        for name in cls.model_fields:
            assert f"`{variable(cls, name)}`" in table


def test_a_variable_another_name_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_TOPIC_REPLICATION_FACTOR", "3")
    monkeypatch.setenv("CAMPAIGN_STATE_DIR", "/srv/state")
    settings = load(Settings)
    assert (settings.topic_replication_factor, str(settings.state_dir)) == (3, "/srv/state")
    assert settings.replace(topic_replication_factor=1).topic_replication_factor == 1


def test_a_bad_value_is_one_line_naming_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENDER_CONCURRENCY", "many")
    monkeypatch.setenv("SMTP_PORT", "70000")
    with pytest.raises(SettingsError) as caught:
        load(SenderSettings)
    assert str(caught.value).startswith("SMTP_PORT: Input should be less than or equal to 65535")
    assert "SENDER_CONCURRENCY: Input should be a valid integer" in str(caught.value)


def test_an_empty_variable_keeps_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENDER_CONCURRENCY", "")
    assert load(SenderSettings).sender_concurrency == 8


def test_the_autopause_rate_is_a_share_or_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOPAUSE_FAILURE_RATE", "off")
    assert load(CompletionSettings).autopause_failure_rate == "off"
    monkeypatch.setenv("AUTOPAUSE_FAILURE_RATE", "1.5")
    with pytest.raises(SettingsError, match=r"AUTOPAUSE_FAILURE_RATE: .*\(0, 1\] or 'off'"):
        load(CompletionSettings)


def test_secrets_never_print(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNSUBSCRIBE_SECRET", "hunter2")
    settings = load(SenderSettings)
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.model_dump())
    assert settings.unsubscribe_secret.get_secret_value() == "hunter2"


def test_an_unknown_keyword_is_refused() -> None:
    with pytest.raises(ValueError, match="kafka_bootstrap"):
        Settings(kafka_bootstrap="x")  # type: ignore[call-arg]
