"""`python -m services.tracker`: serve open pixels and click redirects on
$TRACKER_HOST:$TRACKER_PORT (default 127.0.0.1:28090) until SIGTERM or SIGINT, signing keys
from TRACKER_KEYS (the senders' must match); /metrics, /healthz and /readyz on METRICS_PORT.

Readiness does not ask the broker: with Kafka away the tracker still answers every person
(and counts the lost hits), so taking it out of a load balancer would only turn those
answers into errors.
"""

from __future__ import annotations

import signal
import sys

import uvicorn

from services.common.logs import configure_logging
from services.common.observability import start_observability
from services.common.settings import TrackerSettings, load_or_exit
from services.engagement.tokens import TrackingKeys
from services.tracker.app import create_app

# Requests in hand get this long at shutdown (each waits for Kafka at most tracker_hit_wait_ms).
GRACEFUL_SHUTDOWN_S = 3


def main() -> int:
    log = configure_logging("tracker")
    settings = load_or_exit(TrackerSettings, log)
    try:
        keys = TrackingKeys.parse(settings.tracker_keys.get_secret_value())
    except ValueError as error:
        log.error("invalid settings", error=f"TRACKER_KEYS: {error}")
        return 2
    start_observability(settings, "tracker", {}, assignment=None)
    app = create_app(settings, keys)
    # uvicorn re-raises the stop signal once it has shut down; with this handler in place
    # (it restores it first) that ends the process with status 0, not "killed by SIGTERM".
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(
        app, host=settings.tracker_host, port=settings.tracker_port,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, log_level="info",
        log_config=None, access_log=False,  # a line per pixel would drown the service log
    )
    log.info("stopped", signing_key=keys.signing_key_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
