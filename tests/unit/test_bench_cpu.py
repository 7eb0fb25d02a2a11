"""CPU per mail: every process but the sink, in all and per process."""

from __future__ import annotations

import os

from bench.proc_cpu import CpuMeter, per_mail_us


def test_cpu_per_mail_leaves_the_sink_out() -> None:
    used = {"sender": 0.5, "kafka": 0.25, "smtp_sink": 9.0, "postgres": 0.25}
    total, by_process = per_mail_us(used, 1000)
    assert total == 1000.0
    assert by_process == {"sender": 500.0, "kafka": 250.0, "postgres": 250.0}


def test_a_missing_figure_gives_no_total() -> None:
    total, by_process = per_mail_us({"sender": 0.5, "kafka": None}, 1000)
    assert total is None and by_process == {"sender": 500.0}
    assert per_mail_us({"sender": 0.5}, 0) == (None, {})


def test_the_meter_reads_a_live_process_and_reports_a_gone_one() -> None:
    meter = CpuMeter({"me": os.getpid(), "gone": 2**22 + 1}, None)
    sum(i * i for i in range(200_000))
    used = meter.used()
    assert used["gone"] is None
    assert used["me"] is not None and used["me"] >= 0.0
