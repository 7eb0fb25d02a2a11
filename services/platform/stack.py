"""The whole local stack: Kafka, PostgreSQL, the SMTP sink and the engine's services.

`up` is idempotent (starts only what is not running): Kafka and PostgreSQL as pid-tracked
processes, the SMTP sink and the services under supervisord (services/platform/supervision.py),
which restarts any that crashes, and through its watchdog any whose heartbeat goes stale.
`down` stops exactly what `up` started; `status` says what runs where, with each service's
state, uptime and restart count.
"""

from __future__ import annotations

import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from projections.migrate import apply_migrations
from services.common.observability import ask_readiness
from services.common.settings import (
    DEFAULT_API_PORT,
    DEFAULT_BOUNCE_SMTP_PORT,
    DEFAULT_KAFKA_PORT,
    DEFAULT_POSTGRES_PORT,
    DEFAULT_SMTP_PORT,
    DEFAULT_TRACKER_PORT,
    PlatformSettings,
    Settings,
    load,
)
from services.common.topics import ensure_topics
from services.platform.kafka import KafkaCluster
from services.platform.postgres import PostgresServer
from services.platform.supervision import Program, Supervision

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("command_handler", "hydrator", "sender", "projector", "completion", "api", "tracker")
# Supervised and watched (heartbeat) too, but with no /metrics, /readyz endpoint of their own.
RECEIVERS = ("bounces",)
# The local stack's VERP domain: mail to it reaches the bounce receiver only by direct SMTP.
BOUNCE_DOMAIN = "bounces.localhost"
# Bounds `status` waiting for one service's readiness answer.
READINESS_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class StackPorts:
    kafka: int = DEFAULT_KAFKA_PORT
    kafka_controller: int = DEFAULT_KAFKA_PORT + 1
    postgres: int = DEFAULT_POSTGRES_PORT
    smtp: int = DEFAULT_SMTP_PORT
    # Each service's /metrics, /healthz, /readyz: metrics + its index in SERVICES.
    metrics: int = 29400
    # 3: a 3-node KRaft cluster on kafka, +2, +4 (controllers on +1, +3, +5).
    kafka_brokers: int = 1
    api: int = DEFAULT_API_PORT
    tracker: int = DEFAULT_TRACKER_PORT
    bounce_smtp: int = DEFAULT_BOUNCE_SMTP_PORT

    @classmethod
    def from_settings(cls, settings: PlatformSettings) -> StackPorts:
        return cls(settings.kafka_port, settings.kafka_controller_port, settings.postgres_port,
                   settings.smtp_port, settings.metrics_base_port, settings.kafka_brokers,
                   settings.api_port)


class Stack:
    def __init__(self, state_dir: Path, ports: StackPorts | None = None) -> None:
        self.state_dir = state_dir.resolve()
        self.ports = ports or StackPorts.from_settings(load(PlatformSettings))
        kafka_ports = [(self.ports.kafka, self.ports.kafka_controller)]
        if self.ports.kafka_brokers > 1:
            kafka_ports = [(self.ports.kafka + 2 * i, self.ports.kafka + 2 * i + 1)
                           for i in range(self.ports.kafka_brokers)]
        self.kafka = KafkaCluster(self.state_dir, kafka_ports, self.state_dir / "kafka-libs")
        self.postgres = PostgresServer(self.state_dir, self.ports.postgres)

    @property
    def api_keys_file(self) -> Path:
        """Per-tenant API keys of the local read API; the demo tenant's key is made on first use."""
        path = self.state_dir / "api-keys"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"demo:{secrets.token_urlsafe(24)}\n")
            path.chmod(0o600)
        return path

    @property
    def unsubscribe_secret(self) -> str:
        """Signs the List-Unsubscribe links of the sender; the API verifies them. Made once."""
        return self._secret("unsubscribe-secret", "")

    @property
    def tracker_keys(self) -> str:
        """TRACKER_KEYS: the sender signs opens and clicks, the tracker verifies. Made once."""
        return self._secret("tracker-keys", "k1:")

    @property
    def verp_keys(self) -> str:
        """BOUNCE_VERP_KEYS: the sender signs return paths, the bounce receiver reads them."""
        return self._secret("verp-keys", "a:")

    def _secret(self, name: str, prefix: str) -> str:
        path = self.state_dir / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(prefix + secrets.token_urlsafe(32))
            path.chmod(0o600)
        return path.read_text().strip()

    def api_key(self, tenant: str) -> str | None:
        for line in self.api_keys_file.read_text().splitlines():
            name, _, key = line.partition(":")
            if name == tenant:
                return key
        return None

    @property
    def sink_records(self) -> Path:
        return self.state_dir / "smtp-sink" / "messages.jsonl"

    def settings(self) -> Settings:
        return Settings(
            kafka_bootstrap_servers=self.kafka.bootstrap,
            database_url=self.postgres.url(),
            smtp_host="127.0.0.1",
            smtp_port=self.ports.smtp,
            topic_prefix="",
            state_dir=self.state_dir,
        )

    def env(self) -> dict[str, str]:
        s = self.settings()
        return {
            "KAFKA_BOOTSTRAP_SERVERS": s.kafka_bootstrap_servers,
            "DATABASE_URL": s.database_url,
            "SMTP_HOST": s.smtp_host,
            "SMTP_PORT": str(s.smtp_port),
            "TOPIC_PREFIX": s.topic_prefix,
            "CAMPAIGN_STATE_DIR": str(self.state_dir),
            "SINK_RECORD_PATH": str(self.sink_records),
            "API_KEYS_FILE": str(self.api_keys_file),
            "UNSUBSCRIBE_SECRET": self.unsubscribe_secret,
            "API_PORT": str(self.ports.api),
            "PUBLIC_API_URL": f"http://127.0.0.1:{self.ports.api}",
            "TRACKER_KEYS": self.tracker_keys,
            "TRACKER_PORT": str(self.ports.tracker),
            "TRACKER_PUBLIC_URL": f"http://127.0.0.1:{self.ports.tracker}",
            "BOUNCE_VERP_KEYS": self.verp_keys,
            "BOUNCE_DOMAIN": BOUNCE_DOMAIN,
            "BOUNCE_SMTP_PORT": str(self.ports.bounce_smtp),
            "PYTHONUNBUFFERED": "1",
        }

    def supervision(self) -> Supervision:
        programs = [Program("smtp_sink", [sys.executable, "-m", "services.smtp_sink"], heartbeat=False)]
        programs += [Program(name, [sys.executable, "-m", f"services.{name}"],
                             env={"METRICS_PORT": str(self.metrics_port(name))})
                     for name in SERVICES]
        programs += [Program(name, [sys.executable, "-m", f"services.{name}"]) for name in RECEIVERS]
        return Supervision(self.state_dir, programs, env=self.env(), cwd=REPO_ROOT)

    def metrics_port(self, service: str) -> int:
        return self.ports.metrics + SERVICES.index(service)

    def readiness(self, service: str) -> dict[str, object]:
        """The service's /readyz answer ({"ready": False, "error": ...} when it does not answer)."""
        return ask_readiness(self.probe_url(service), READINESS_TIMEOUT_SECONDS)

    def probe_url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.metrics_port(service)}"

    def pid(self, name: str) -> int | None:
        """The running process of a supervised program (a service or the SMTP sink)."""
        return self.supervision().pid(name)

    def log_file(self, name: str) -> Path:
        return self.supervision().log_file(name)

    def up(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        print(f"kafka      starting on {self.kafka.bootstrap}", flush=True)
        self.kafka.start()
        print(f"postgres   starting on 127.0.0.1:{self.ports.postgres}", flush=True)
        self.postgres.start()
        applied = apply_migrations(self.postgres.url())
        print(f"migrations {', '.join(applied) or 'up to date'}", flush=True)
        created = ensure_topics(self.settings())
        print(f"topics     {len(created)} created", flush=True)
        self.sink_records.parent.mkdir(parents=True, exist_ok=True)
        supervision = self.supervision()
        supervision.start()
        print(f"supervisor {supervision.socket}", flush=True)
        for line in supervision.status_lines():
            print(line, flush=True)

    def down(self) -> None:
        if self.supervision().stop():
            print("services   stopped (supervisor and every program)", flush=True)
        if self.kafka.stop():
            print("kafka      stopped", flush=True)
        if self.postgres.stop():
            print("postgres   stopped", flush=True)

    def status(self) -> bool:
        """Print what runs; True when everything does."""
        supervision = self.supervision()
        states = {info["name"]: info["statename"] for info in supervision.processes()}
        ok = all(states.get(name) == "RUNNING" for name in ("smtp_sink", *SERVICES, *RECEIVERS))
        if states:
            for line in supervision.status_lines():
                name = line.split()[0]
                if name in SERVICES and states.get(name) == "RUNNING":
                    line += "  " + _readiness_text(self.readiness(name))
                print(line)
        else:
            print(f"{'services':<16} stopped (no supervisor)")
        kafka = self.kafka.pids()
        for node in self.kafka.nodes:
            kpid = kafka.get(node.name)
            ok &= kpid is not None
            print(f"{node.name:<16} {'running pid ' + str(kpid) if kpid else 'stopped'} ({node.bootstrap})")
        pg = self.postgres.running()
        ok &= pg
        print(f"{'postgres':<16} {'running' if pg else 'stopped'} (127.0.0.1:{self.ports.postgres})")
        return ok


def _readiness_text(answer: dict[str, object]) -> str:
    if answer.get("ready"):
        return "ready"
    if "error" in answer:
        return f"not answering ({answer['error']})"
    checks = answer.get("checks")
    failed = {k: v for k, v in checks.items() if v != "ok"} if isinstance(checks, dict) else {}
    return "not ready: " + "; ".join(f"{k}: {v}" for k, v in failed.items())
