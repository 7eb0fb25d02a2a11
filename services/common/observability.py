"""One HTTP endpoint per service process for operators: Prometheus metrics, liveness and
readiness, on METRICS_PORT (unset or 0: no endpoint, as in tests and runs by hand).

- `GET /metrics`: the process's Prometheus registry (the engine's metrics in
  services/common/metrics.py, plus the client's process and Python metrics).
- `GET /healthz`: 200 while the service's loop beat its heartbeat within `stale_after`
  seconds, else 503. The same signal the supervisor's watchdog reads from the heartbeat file.
- `GET /readyz`: 200 when every readiness check passes (broker and database reachable, the
  consumer has its assignment, ...), else 503; the body names each check and why it failed.

Guarantee: a probe never blocks the service (the server runs on its own daemon threads) and
answers within about one check timeout: a readiness check is bounded by its own timeout, and
its result is reused for `CHECK_CACHE_SECONDS` so a scraping load cannot multiply the checks.
"""

from __future__ import annotations

import importlib.metadata
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app

from services.common import membership
from services.common.heartbeat import Heartbeat
from services.common.metrics import SERVICE_INFO, SERVICE_RESTARTS
from services.common.restart_counts import my_restarts
from services.common.settings import Settings

# A loop that has not beaten for this long is taken as stuck (the watchdog waits longer:
# a probe failure only marks the pod, the watchdog kills).
LIVENESS_STALE_SECONDS = 30.0
# Readiness results are reused this long: a probe every second costs at most one check.
CHECK_CACHE_SECONDS = 2.0

# Bounds one readiness check's wait for the broker or the database.
CHECK_TIMEOUT_SECONDS = 2.0

# A readiness check returns None when it passes, else the reason it does not.
ReadinessCheck = Callable[[], str | None]


@dataclass(frozen=True)
class Readiness:
    ready: bool
    checks: Mapping[str, str]  # check name -> "ok" or the reason it failed


def evaluate(checks: Mapping[str, ReadinessCheck]) -> Readiness:
    """Run every check; a check that raises fails with the exception as its reason."""
    results: dict[str, str] = {}
    for name, check in checks.items():
        try:
            reason = check()
        except Exception as exc:  # a probe reports a broken dependency, it never raises
            reason = f"{type(exc).__name__}: {exc}"
        results[name] = "ok" if reason is None else reason
    return Readiness(all(r == "ok" for r in results.values()), results)


def broker_check(bootstrap: str, timeout: float = CHECK_TIMEOUT_SECONDS) -> ReadinessCheck:
    """Passes when the cluster answers a metadata request within `timeout`."""
    from services.common.kafka import make_admin, serve_logs

    admin = make_admin(bootstrap)

    def check() -> str | None:
        serve_logs(admin)
        metadata = admin.list_topics(timeout=timeout)
        return None if metadata.brokers else "no broker in the cluster's metadata"

    return check


def database_check(url: str, timeout: float = CHECK_TIMEOUT_SECONDS) -> ReadinessCheck:
    """Passes when PostgreSQL accepts a connection and answers `SELECT 1` within `timeout`."""
    import psycopg

    def check() -> str | None:
        with psycopg.connect(url, connect_timeout=max(1, round(timeout)),
                             options=f"-c statement_timeout={int(timeout * 1000)}") as conn:
            conn.execute("SELECT 1")
        return None

    return check


def liveness(age: float | None, stale_after: float) -> tuple[bool, str]:
    """Alive when the loop beat within `stale_after` seconds. A loop that has not beaten yet
    counts as alive: a service starting up is not stuck (the watchdog's start grace agrees)."""
    if age is None:
        return True, "no beat yet"
    if age <= stale_after:
        return True, f"last beat {age:.1f} s ago"
    return False, f"last beat {age:.1f} s ago, stale after {stale_after:.0f} s"


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
        pass  # probes every few seconds would flood the JSON service log with access lines


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class ObservabilityServer:
    """Serves /metrics, /healthz and /readyz for one process on a daemon thread."""

    def __init__(
        self,
        port: int,
        heartbeat: Heartbeat,
        checks: Mapping[str, ReadinessCheck] | None = None,
        *,
        host: str = "127.0.0.1",
        registry: CollectorRegistry = REGISTRY,
        stale_after: float = LIVENESS_STALE_SECONDS,
        about: Mapping[str, str] | None = None,
        assignment: Callable[[], list[str]] | None = None,
    ) -> None:
        self.heartbeat = heartbeat
        self.about = dict(about or {})
        self.assignment = assignment
        self.checks: dict[str, ReadinessCheck] = dict(checks or {})
        self.stale_after = stale_after
        self._metrics = make_wsgi_app(registry)
        self._lock = threading.Lock()
        self._cached: tuple[float, Readiness] | None = None
        self._server = make_server(host, port, self._app, _ThreadingServer, _QuietHandler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="observability", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def add_check(self, name: str, check: ReadinessCheck) -> None:
        with self._lock:
            self.checks[name] = check
            self._cached = None

    def start(self) -> ObservabilityServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def readiness(self) -> Readiness:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > CHECK_CACHE_SECONDS:
                self._cached = (now, evaluate(self.checks))
            return self._cached[1]

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self._metrics(environ, start_response)
        if path == "/healthz":
            alive, detail = liveness(self.heartbeat.seconds_since_beat(), self.stale_after)
            return _json(start_response, 200 if alive else 503,
                         {"alive": alive, "detail": detail})
        if path == "/readyz":
            state = self.readiness()
            body: dict[str, object] = {**self.about, "ready": state.ready,
                                       "checks": dict(state.checks)}
            if self.assignment is not None:
                body["assignment"] = self.assignment()
            return _json(start_response, 200 if state.ready else 503, body)
        return _json(start_response, 404,
                     {"error": f"no such path {path!r}: try /metrics, /healthz or /readyz"})


def version() -> str:
    try:
        return importlib.metadata.version("campaign-engine")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def start_observability(
    settings: Settings, service: str, checks: Mapping[str, ReadinessCheck],
    *, assignment: Callable[[], list[str]] | None = membership.assignment,
) -> ObservabilityServer | None:
    """Serve the process's endpoint on settings.metrics_port (None when it is 0). A port
    that cannot be bound raises OSError: a misconfigured probe port must show at start.
    /readyz lists `assignment()`: by default the partitions of every consumer in the process
    (services/common/membership.py)."""
    if not settings.metrics_port:
        return None
    SERVICE_RESTARTS.set_function(  # read at each scrape: always current
        lambda: my_restarts(settings.restart_counts_file, settings.supervisor_process_name))
    SERVICE_INFO.labels(service=service, version=version()).set(1)
    server = ObservabilityServer(
        settings.metrics_port, settings.heartbeat(), checks, host=settings.metrics_host,
        about={"service": service, "version": version()}, assignment=assignment)
    return server.start()


def standard_checks(settings: Settings, *, database: bool = True,
                    consumer: bool = True) -> dict[str, ReadinessCheck]:
    """Broker reachable, PostgreSQL reachable for services that use it, and for services that
    consume, every consumer joined to its group (services/common/membership.py)."""
    checks = {"broker": broker_check(settings.kafka_bootstrap_servers)}
    if database:
        checks["database"] = database_check(settings.database_url)
    if consumer:
        checks["assignment"] = membership.readiness_check
    return checks


def ask_readiness(base_url: str, timeout: float = CHECK_TIMEOUT_SECONDS * 2) -> dict[str, object]:
    """A service's /readyz answer as a dict; {"ready": False, "error": ...} when it does not
    answer within `timeout` (the client side of `ops status` and `make status`)."""
    if not base_url.startswith(("http://", "https://")):
        return {"ready": False, "error": f"not an http(s) address: {base_url!r}"}
    url = f"{base_url.rstrip('/')}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:  # noqa: S310 - scheme checked
            return dict(json.load(answer))
    except urllib.error.HTTPError as exc:  # 503 carries the failed checks
        try:
            return dict(json.load(exc))
        except ValueError:
            return {"ready": False, "error": f"HTTP {exc.code}"}
    except urllib.error.URLError as exc:
        return {"ready": False, "error": str(exc.reason)}
    except (OSError, ValueError) as exc:
        return {"ready": False, "error": str(exc)}


def _json(start_response: Callable[..., Any], status: int, body: object) -> list[bytes]:
    data = json.dumps(body).encode()
    reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
    start_response(f"{status} {reason}", [("Content-Type", "application/json"),
                                          ("Content-Length", str(len(data)))])
    return [data]
