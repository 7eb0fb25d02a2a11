"""Run a service as a real OS process against a test's settings (for e2e and crash tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from services.common.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "DATABASE_URL": settings.database_url,
        "SMTP_HOST": settings.smtp_host,
        "SMTP_PORT": str(settings.smtp_port),
        "TOPIC_PREFIX": settings.topic_prefix,
        "CAMPAIGN_STATE_DIR": str(settings.state_dir),
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


class ServiceProcess:
    """`with ServiceProcess("hydrator", settings) as proc:` starts it; leaving stops it."""

    def __init__(self, service: str, settings: Settings, log_dir: Path | None = None, **env: str) -> None:
        self.service = service
        self.settings = settings
        self.env = service_env(settings, **env)
        self.log_path = (log_dir or settings.state_dir / "test-logs") / f"{settings.topic_prefix}{service}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.service}"], env=self.env, cwd=REPO_ROOT,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def running(self) -> bool:
        """Started and not exited yet."""
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_records(self) -> tuple[list[dict[str, Any]], list[str]]:
        """The log's lines that are JSON objects (parsed), and every line that is not one."""
        records: list[dict[str, Any]] = []
        other: list[str] = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                other.append(line)
        return records, other

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
