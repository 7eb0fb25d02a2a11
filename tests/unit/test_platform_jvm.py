"""The broker's JVM options: the defaults, or KAFKA_JVM_OPTS instead of them."""

from __future__ import annotations

import pytest

from services.platform.kafka import DEFAULT_JVM_OPTIONS, jvm_options


def test_defaults_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAFKA_JVM_OPTS", raising=False)
    assert jvm_options() == list(DEFAULT_JVM_OPTIONS)


def test_the_variable_replaces_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_JVM_OPTS", " -Xmx512m  -XX:TieredStopAtLevel=1 ")
    assert jvm_options() == ["-Xmx512m", "-XX:TieredStopAtLevel=1"]


def test_an_empty_variable_keeps_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_JVM_OPTS", "  ")
    assert jvm_options() == list(DEFAULT_JVM_OPTIONS)
