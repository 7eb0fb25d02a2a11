"""`python -m services.smtp_sink`: run the SMTP sink as a process until SIGTERM or SIGINT.

Configured from the environment (`SinkSettings`, see the README's settings table). It records every message it
accepted with 250, exactly once, before replying 250 (one JSON line per message in
SINK_RECORD_PATH, flushed before the reply); faulted messages are never recorded. Logs one
JSON line per event on stderr: start, each injected fault, each accepted message (at DEBUG),
periodic stats, stop. On SIGTERM/SIGINT it closes all connections, flushes the record file and
exits 0.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

from services.common.logs import configure_logging
from services.common.settings import SinkSettings, load_or_exit
from services.smtp_sink.config import SinkConfig
from services.smtp_sink.server import SmtpSink

# Interval of the "stats" log line: often enough to watch a benchmark progress, rare enough
# not to flood the log of an idle platform (and only written when the counts changed).
_STATS_INTERVAL_S = 5.0


def main() -> int:
    settings = load_or_exit(SinkSettings, configure_logging("smtp-sink"))
    log = configure_logging("smtp-sink", level=settings.log_level)
    try:
        config = SinkConfig.from_settings(settings)
    except ValueError as error:
        log.error("invalid_config", error=str(error))
        return 2

    def on_event(event: str, fields: dict[str, Any]) -> None:
        if event == "message_accepted":
            log.debug(event, **fields)  # per message: only when asked for, it costs throughput
        else:
            log.info(event, **fields)

    stopping = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("stop_requested", signal=signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    sink = SmtpSink(config, on_event=on_event)
    try:
        sink.start()
    except (OSError, RuntimeError) as error:
        log.error("start_failed", host=config.host, port=config.port, error=str(error))
        return 1
    log.info(
        "smtp_sink_started",
        host=sink.host,
        port=sink.port,
        record_path=str(config.record_path) if config.record_path else None,
        tempfail_rate=config.tempfail_rate,
        permfail_rate=config.permfail_rate,
        drop_rate=config.drop_rate,
        drop_before_data_rate=config.drop_before_data_rate,
        latency_ms=config.latency_ms,
        seed=config.seed,
        tls="implicit" if config.implicit_tls else "starttls" if config.tls else None,
        require_starttls=config.require_starttls,
        auth_users=len(config.auth_users),  # how many, never who or their passwords
        refuse_connections=config.refuse_connections,
        pipelining=config.pipelining,
        chunking=config.chunking,
        smtputf8=config.smtputf8,
    )
    last_stats = sink.stats
    try:
        while not stopping.wait(_STATS_INTERVAL_S):
            stats = sink.stats
            if stats != last_stats:
                log.info("stats", **stats)
                last_stats = stats
    finally:
        sink.stop()
    log.info("smtp_sink_stopped", **sink.stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
