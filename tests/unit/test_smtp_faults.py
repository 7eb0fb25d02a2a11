"""Fault selection and configuration of the SMTP sink: pure logic, no sockets."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from services.smtp_sink import FaultPlan, Outcome, SinkConfig
from tests.sink_settings import sink_config_from

DRAWS = 10_000


def _shares(plan: FaultPlan, seed: int = 7) -> dict[Outcome, float]:
    rng = random.Random(seed)
    counts = Counter(plan.decide(rng) for _ in range(DRAWS))
    return {outcome: counts[outcome] / DRAWS for outcome in Outcome}


def test_rates_are_respected_over_many_draws() -> None:
    plan = FaultPlan(
        tempfail_rate=0.10,
        permfail_rate=0.05,
        drop_after_data_rate=0.03,
        drop_before_data_rate=0.02,
    )
    shares = _shares(plan)
    # 10,000 draws: one standard deviation of a 10% share is 0.3 points; 1.5 points is ~5 sigma.
    assert shares[Outcome.TEMPFAIL] == pytest.approx(0.10, abs=0.015)
    assert shares[Outcome.PERMFAIL] == pytest.approx(0.05, abs=0.015)
    assert shares[Outcome.DROP_AFTER_DATA] == pytest.approx(0.03, abs=0.015)
    assert shares[Outcome.DROP_BEFORE_DATA] == pytest.approx(0.02, abs=0.015)
    assert shares[Outcome.ACCEPT] == pytest.approx(0.80, abs=0.015)


def test_no_faults_means_every_message_is_accepted() -> None:
    assert _shares(FaultPlan())[Outcome.ACCEPT] == 1.0


@pytest.mark.parametrize(
    ("field", "outcome"),
    [
        ("tempfail_rate", Outcome.TEMPFAIL),
        ("permfail_rate", Outcome.PERMFAIL),
        ("drop_after_data_rate", Outcome.DROP_AFTER_DATA),
        ("drop_before_data_rate", Outcome.DROP_BEFORE_DATA),
    ],
)
def test_rate_one_always_gives_that_outcome(field: str, outcome: Outcome) -> None:
    assert _shares(FaultPlan(**{field: 1.0}))[outcome] == 1.0


def test_same_seed_same_outcomes() -> None:
    plan = FaultPlan(tempfail_rate=0.3, permfail_rate=0.3)
    rng_a, rng_b = random.Random(42), random.Random(42)
    seq_a = [plan.decide(rng_a) for _ in range(500)]
    seq_b = [plan.decide(rng_b) for _ in range(500)]
    assert seq_a == seq_b
    assert len(set(seq_a)) == 3  # the seed does not collapse the draws to one outcome


def test_plan_follows_config() -> None:
    config = SinkConfig(
        port=0, tempfail_rate=0.1, permfail_rate=0.2, drop_rate=0.3, drop_before_data_rate=0.4
    )
    assert FaultPlan.from_config(config) == FaultPlan(
        tempfail_rate=0.1,
        permfail_rate=0.2,
        drop_after_data_rate=0.3,
        drop_before_data_rate=0.4,
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tempfail_rate": -0.1},
        {"permfail_rate": 1.5},
        {"drop_rate": 2.0},
        {"drop_before_data_rate": -1.0},
        {"tempfail_rate": 0.6, "permfail_rate": 0.5},
        {"latency_ms": -1.0},
        {"port": 70000},
    ],
)
def test_invalid_config_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="SinkConfig"):
        SinkConfig(**kwargs)  # type: ignore[arg-type]


def test_invalid_plan_is_refused() -> None:
    with pytest.raises(ValueError, match="sum to at most 1"):
        FaultPlan(tempfail_rate=0.7, drop_after_data_rate=0.7)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        FaultPlan(permfail_rate=-0.01)


def test_rates_summing_to_one_despite_float_rounding_are_fine() -> None:
    SinkConfig(port=0, tempfail_rate=0.1, permfail_rate=0.2, drop_rate=0.7)


def test_from_env_reads_every_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    config = sink_config_from(
        monkeypatch, {
            "SMTP_HOST": "127.0.0.2",
            "SMTP_PORT": "2600",
            "SINK_RECORD_PATH": "/tmp/sink/messages.jsonl",
            "SINK_TEMPFAIL_RATE": "0.1",
            "SINK_PERMFAIL_RATE": "0.05",
            "SINK_DROP_RATE": "0.02",
            "SINK_DROP_BEFORE_DATA_RATE": "0.01",
            "SINK_LATENCY_MS": "15",
            "SINK_SEED": "123",
        }
    )
    assert config == SinkConfig(
        host="127.0.0.2",
        port=2600,
        record_path=Path("/tmp/sink/messages.jsonl"),
        tempfail_rate=0.1,
        permfail_rate=0.05,
        drop_rate=0.02,
        drop_before_data_rate=0.01,
        latency_ms=15.0,
        seed=123,
        keep_in_memory=False,  # a sink with a record file keeps nothing in memory
    )


def test_from_env_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    config = sink_config_from(monkeypatch, {})
    assert (config.host, config.port, config.record_path, config.seed) == (
        "127.0.0.1",
        22525,
        None,
        None,
    )
    assert config.tempfail_rate == config.permfail_rate == config.drop_rate == 0.0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SINK_TEMPFAIL_RATE": "lots"}, "SINK_TEMPFAIL_RATE"),
        ({"SINK_SEED": "1.5"}, "SINK_SEED"),
        ({"SMTP_PORT": "smtp"}, "SMTP_PORT"),
        ({"SINK_DROP_RATE": "0.8", "SINK_PERMFAIL_RATE": "0.8"}, "sum to at most 1"),
    ],
)
def test_from_env_reports_bad_values(
        monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sink_config_from(monkeypatch, env)


def test_a_sink_recording_to_a_file_keeps_no_copies_in_memory(tmp_path):
    from services.smtp_sink.records import RecordLog

    log = RecordLog(tmp_path / "m.jsonl", keep_in_memory=False)
    for i in range(3):
        log.append({"message_id": f"<{i}@x>"})
    assert len(log) == 3 and log.snapshot() == []
    assert log.wait_for(3, timeout=0.1)
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 3
