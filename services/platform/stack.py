"""The whole local stack: Kafka, PostgreSQL, the SMTP sink and the four services.

`up` is idempotent (starts only what is not running), `down` stops exactly what `up` started
(tracked by pid files under the state folder), `status` says what runs where.
"""

from __future__ import annotations

import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from projections.migrate import apply_migrations
from services.common.settings import (
    DEFAULT_KAFKA_PORT,
    DEFAULT_POSTGRES_PORT,
    DEFAULT_SMTP_PORT,
    Settings,
)
from services.common.topics import ensure_topics
from services.platform.kafka import KafkaNode
from services.platform.postgres import PostgresServer
from services.platform.processes import ManagedProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("command_handler", "hydrator", "sender", "projector", "completion", "api")


@dataclass(frozen=True)
class StackPorts:
    kafka: int = int(os.environ.get("KAFKA_PORT", DEFAULT_KAFKA_PORT))
    kafka_controller: int = int(os.environ.get("KAFKA_CONTROLLER_PORT", DEFAULT_KAFKA_PORT + 1))
    postgres: int = int(os.environ.get("POSTGRES_PORT", DEFAULT_POSTGRES_PORT))
    smtp: int = int(os.environ.get("SMTP_PORT", DEFAULT_SMTP_PORT))


class Stack:
    def __init__(self, state_dir: Path, ports: StackPorts | None = None) -> None:
        self.state_dir = state_dir.resolve()
        self.ports = ports or StackPorts()
        self.kafka = KafkaNode(
            self.state_dir, self.ports.kafka, self.ports.kafka_controller,
            libs_dir=self.state_dir / "kafka-libs",
        )
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
        path = self.state_dir / "unsubscribe-secret"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_urlsafe(32))
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
            "PUBLIC_API_URL": f"http://127.0.0.1:{os.environ.get('API_PORT', '28080')}",
            "PYTHONUNBUFFERED": "1",
        }

    def process(self, name: str) -> ManagedProcess:
        module = "services.smtp_sink" if name == "smtp_sink" else f"services.{name}"
        return ManagedProcess(
            name, [sys.executable, "-m", module], self.state_dir, env=self.env(), cwd=REPO_ROOT
        )

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
        for name in ("smtp_sink", *SERVICES):
            pid = self.process(name).start()
            print(f"{name:<10} pid {pid}", flush=True)

    def down(self) -> None:
        for name in (*reversed(SERVICES), "smtp_sink"):
            if self.process(name).stop():
                print(f"{name:<10} stopped", flush=True)
        if self.kafka.stop():
            print("kafka      stopped", flush=True)
        if self.postgres.stop():
            print("postgres   stopped", flush=True)

    def status(self) -> bool:
        """Print what runs; True when everything does."""
        ok = True
        for name in ("smtp_sink", *SERVICES):
            pid = self.process(name).pid()
            ok &= pid is not None
            print(f"{name:<16} {'running pid ' + str(pid) if pid else 'stopped'}")
        kpid = self.kafka.process.pid()
        ok &= kpid is not None
        print(f"{'kafka':<16} {'running pid ' + str(kpid) if kpid else 'stopped'} ({self.kafka.bootstrap})")
        pg = self.postgres.running()
        ok &= pg
        print(f"{'postgres':<16} {'running' if pg else 'stopped'} (127.0.0.1:{self.ports.postgres})")
        return ok
