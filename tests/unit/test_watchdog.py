"""The watchdog's pure rules: which programs are stuck, how (re)starts are counted, and the
supervisord configuration the platform writes."""

from __future__ import annotations

import configparser
from pathlib import Path

from services.common.restart_counts import restarts
from services.platform.supervision import Program, Supervision
from services.platform.watchdog import ProgramView, count_event, stuck

NOW = 10_000.0


def view(name: str, *, state: str = "RUNNING", up: float = 500.0, beat_age: float | None = 1.0) -> ProgramView:
    return ProgramView(name, state, NOW - up, None if beat_age is None else NOW - beat_age)


def test_a_fresh_heartbeat_is_left_alone_and_a_stale_one_is_restarted() -> None:
    programs = [view("fresh", beat_age=2.0), view("stale", beat_age=61.0)]
    assert stuck(programs, NOW, stale_after=60.0, start_grace=120.0) == ["stale"]


def test_a_program_that_never_beat_gets_the_start_grace_first() -> None:
    young = view("young", up=100.0, beat_age=None)
    old = view("old", up=121.0, beat_age=None)
    assert stuck([young, old], NOW, stale_after=60.0, start_grace=120.0) == ["old"]


def test_a_beat_from_before_the_current_start_does_not_count() -> None:
    # The file's last touch is older than the process: the new process never beat.
    previous_life = ProgramView("svc", "RUNNING", NOW - 30.0, NOW - 40.0)
    assert stuck([previous_life], NOW, stale_after=10.0, start_grace=60.0) == []
    assert stuck([previous_life], NOW, stale_after=10.0, start_grace=20.0) == ["svc"]


def test_a_beat_in_the_whole_second_of_the_start_is_the_predecessors() -> None:
    # supervisord's start is in whole seconds: the killed process's last beat at .7 of the
    # second the new one started in must not count as the new one's.
    started = float(int(NOW) - 6)
    restarted = ProgramView("svc", "RUNNING", started, started + 0.7)
    assert stuck([restarted], NOW, stale_after=5.0, start_grace=60.0) == []
    beat_since = ProgramView("svc", "RUNNING", started, started + 1.2)
    assert stuck([beat_since], NOW, stale_after=5.0, start_grace=60.0) == []
    assert stuck([beat_since], NOW + 1.0, stale_after=5.0, start_grace=60.0) == ["svc"]


def test_only_running_programs_are_judged() -> None:
    programs = [view(n, state=n, beat_age=1_000.0) for n in ("STARTING", "BACKOFF", "EXITED", "FATAL")]
    assert stuck(programs, NOW, stale_after=60.0, start_grace=120.0) == []


def test_starts_and_crashes_are_counted_per_program() -> None:
    counts: dict[str, dict[str, int]] = {}
    for event in ("PROCESS_STATE_STARTING", "PROCESS_STATE_RUNNING", "PROCESS_STATE_EXITED",
                  "PROCESS_STATE_STARTING", "PROCESS_STATE_BACKOFF", "PROCESS_STATE_STARTING"):
        counts = count_event(counts, event, {"processname": "sender"})
    counts = count_event(counts, "PROCESS_STATE_STARTING", {"processname": "api"})
    assert counts["sender"] == {"starts": 3, "crashes": 2, "watchdog": 0}
    assert restarts(counts["sender"]) == 2
    assert restarts(counts["api"]) == 0
    assert restarts({}) == 0


def test_the_configuration_supervises_every_program_with_restarts(tmp_path: Path) -> None:
    programs = [Program("sender", ["python", "-m", "services.sender"]),
                Program("smtp_sink", ["python", "-m", "services.smtp_sink"], heartbeat=False,
                        env={"SINK_NOTE": "100%"})]
    text = Supervision(tmp_path, programs, env={}, cwd=tmp_path).config()
    parser = configparser.RawConfigParser()
    parser.read_string(text)
    sender = parser["program:sender"]
    assert sender["command"] == "python -m services.sender"
    assert sender["autorestart"] == "true"
    assert f'HEARTBEAT_FILE="{tmp_path}/heartbeats/sender"' in sender["environment"]
    sink = parser["program:smtp_sink"]
    assert "HEARTBEAT_FILE" not in sink["environment"]
    assert 'SINK_NOTE="100%%"' in sink["environment"]  # supervisord reads %% as a literal %
    assert f'RESTART_COUNTS_FILE="{tmp_path}/supervisor/restarts.json"' in sender["environment"]
    listener = parser["eventlistener:watchdog"]
    assert listener["command"].endswith(f"services.platform.watchdog {tmp_path} sender")
    assert "TICK_5" in listener["events"]


def test_a_supervised_service_reads_its_own_restarts(tmp_path: Path, monkeypatch) -> None:
    from services.common.restart_counts import my_restarts
    from services.common.settings import Settings

    counts = tmp_path / "restarts.json"
    counts.write_text('{"sender": {"starts": 4, "crashes": 2, "watchdog": 1}}')
    monkeypatch.delenv("SUPERVISOR_PROCESS_NAME", raising=False)
    monkeypatch.delenv("RESTART_COUNTS_FILE", raising=False)
    unsupervised = Settings()
    assert my_restarts(unsupervised.restart_counts_file, unsupervised.supervisor_process_name) == 0
    monkeypatch.setenv("RESTART_COUNTS_FILE", str(counts))
    monkeypatch.setenv("SUPERVISOR_PROCESS_NAME", "sender")
    supervised = Settings()
    assert my_restarts(supervised.restart_counts_file, supervised.supervisor_process_name) == 3
    assert my_restarts(counts, "projector") == 0  # not started yet
    counts.write_text("not json")
    assert my_restarts(counts, "sender") == 0
