"""SMTP sink: a real SMTP server that records what it accepts and injects configured faults.

Used by the local platform (`python -m services.smtp_sink`), the tests (in-process
`SmtpSink`), the demo and the benchmarks. It records every message it accepted with 250,
exactly once, before replying 250; faulted messages (451, 550, dropped connections) are never
recorded.
"""

from services.smtp_sink.config import SinkConfig
from services.smtp_sink.faults import FaultPlan, Outcome
from services.smtp_sink.records import Record, build_record, count_records, header, read_records
from services.smtp_sink.server import EventCallback, SmtpSink

__all__ = [
    "EventCallback",
    "FaultPlan",
    "Outcome",
    "Record",
    "SinkConfig",
    "SmtpSink",
    "build_record",
    "count_records",
    "header",
    "read_records",
]
