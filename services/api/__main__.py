"""`python -m services.api`: serve the read API, command gateway, one-click unsubscribe and
dashboard on $API_HOST:$API_PORT (default 127.0.0.1:28080) until SIGTERM or SIGINT; API keys from
API_KEYS / API_KEYS_FILE (see auth.py), the unsubscribe secret from UNSUBSCRIBE_SECRET.

Open streams are given GRACEFUL_SHUTDOWN_S to finish, then closed: server-sent event streams
never end by themselves, and a browser reconnects to wherever the API comes back.
"""

from __future__ import annotations

import signal
import sys

import uvicorn

from services.api.app import create_app
from services.api.auth import ApiKeyError, load_api_keys
from services.common.logs import configure_logging
from services.common.observability import standard_checks, start_observability
from services.common.settings import ApiSettings, load_or_exit

# SSE streams are endless: without a bound, a SIGTERM would wait for every browser to leave.
GRACEFUL_SHUTDOWN_S = 3


def main() -> int:
    log = configure_logging("api")
    settings = load_or_exit(ApiSettings, log)
    try:
        api_keys = load_api_keys(settings)
    except ApiKeyError as error:
        log.error("invalid settings", error=str(error))
        return 2
    if not api_keys:
        log.warning("no API keys configured: every request will be refused (set API_KEYS)")
    # Signs and checks one-click unsubscribe links; the sender must use the same secret.
    secret = settings.unsubscribe_secret.get_secret_value().encode() or None
    if secret is None:
        log.warning("UNSUBSCRIBE_SECRET not set: /unsubscribe answers 503")
    start_observability(settings, "api", standard_checks(settings, consumer=False))
    app = create_app(settings, api_keys, unsubscribe_secret=secret)
    # uvicorn re-raises the stop signal once it has shut down; with this handler in place
    # (it restores it first) that ends the process with status 0, not "killed by SIGTERM".
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    # uvicorn handles SIGTERM/SIGINT itself: it stops accepting, drains, runs the lifespan's
    # shutdown (closing the pool) and returns.
    uvicorn.run(
        app, host=settings.api_host, port=settings.api_port,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, log_level="info",
        log_config=None,  # uvicorn's records go to the root logger's JSON handler
    )
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
