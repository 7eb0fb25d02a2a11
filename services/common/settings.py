"""Runtime settings for every service, read from the environment.

One place for addresses and names so that `make up`, the tests and production all point the
same code at different Kafka, PostgreSQL and SMTP endpoints without code changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from services.common.heartbeat import Heartbeat, shared_heartbeat

# Ports of the local platform started by `make up`; tests start their own on other ports.
DEFAULT_KAFKA_PORT = 29092
DEFAULT_POSTGRES_PORT = 25432
DEFAULT_SMTP_PORT = 22525


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


@dataclass(frozen=True)
class Settings:
    """Where the platform lives. Every field has an environment variable of the same name."""

    kafka_bootstrap_servers: str = field(
        default_factory=lambda: _env("KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{DEFAULT_KAFKA_PORT}")
    )
    database_url: str = field(
        default_factory=lambda: _env(
            "DATABASE_URL",
            f"postgresql://campaigns@127.0.0.1:{DEFAULT_POSTGRES_PORT}/campaigns",
        )
    )
    smtp_host: str = field(default_factory=lambda: _env("SMTP_HOST", "127.0.0.1"))
    smtp_port: int = field(default_factory=lambda: int(_env("SMTP_PORT", str(DEFAULT_SMTP_PORT))))
    # Prefix for every topic and consumer group: lets tests run isolated pipelines on one broker.
    topic_prefix: str = field(default_factory=lambda: _env("TOPIC_PREFIX", ""))
    # Replicas of the topics ensure_topics creates: -1 takes the cluster's
    # default.replication.factor (3 on the local 3-node cluster, 1 on a single node).
    topic_replication_factor: int = field(
        default_factory=lambda: int(_env("KAFKA_TOPIC_REPLICATION_FACTOR", "-1")))
    state_dir: Path = field(default_factory=lambda: Path(_env("CAMPAIGN_STATE_DIR", ".state")))
    # The file a service's loop touches to show it is not stuck ("" = no heartbeat); the
    # supervisor gives each program its own (services/common/heartbeat.py).
    heartbeat_file: str = field(default_factory=lambda: _env("HEARTBEAT_FILE", ""))

    # The port of the process's /metrics, /healthz and /readyz (0 = none; services/common/
    # observability.py), and the address it listens on (0.0.0.0 in a container).
    metrics_port: int = field(default_factory=lambda: int(_env("METRICS_PORT", "0")))
    metrics_host: str = field(default_factory=lambda: _env("METRICS_HOST", "127.0.0.1"))

    def heartbeat(self) -> Heartbeat:
        return shared_heartbeat(self.heartbeat_file or None)

    def group(self, name: str) -> str:
        """Consumer group id for a service, namespaced like the topics."""
        return f"{self.topic_prefix}{name}"
