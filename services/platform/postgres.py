"""A PostgreSQL server from Debian's package with the project's own data folder and port.

The server refuses to run as root, so when we are root it runs as the `postgres` user.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time
from pathlib import Path

import psycopg

from services.common.settings import child_environment

# initdb + first start on a cold disk; longer means the server is not coming up.
STARTUP_TIMEOUT_SECONDS = 60.0
SUPERUSER = "campaigns"


def postgres_bin() -> Path:
    """The newest installed server's bin folder, installing Debian's package when missing."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        if os.geteuid() != 0:
            raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
        subprocess.run(["apt-get", "update", "-q"], check=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"],
            check=True,
            env=child_environment({"DEBIAN_FRONTEND": "noninteractive"}),
        )
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent


def _as_postgres(argv: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


class PostgresServer:
    """One server: `start` is idempotent (init on first use), `stop` stops only it."""

    def __init__(self, state_dir: Path, port: int, *, durable: bool = True) -> None:
        self.home = (state_dir / "postgres").resolve()
        self.data = self.home / "data"
        self.port = port
        self.durable = durable

    def url(self, database: str = "campaigns") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _chown(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.home, "postgres", "postgres")
            # The postgres user must be able to reach its folder through ours.
            for parent in self.home.parents:
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    os.chmod(parent, mode | 0o001)
                if parent == Path("/"):
                    break

    def start(self) -> None:
        bin_dir = postgres_bin()
        self.home.mkdir(parents=True, exist_ok=True)
        self._chown()
        if not (self.data / "PG_VERSION").exists():
            subprocess.run(
                _as_postgres(
                    [str(bin_dir / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
                     "-A", "trust", "-E", "UTF8", "--no-locale"]
                ),
                check=True,
                stdout=subprocess.DEVNULL,
            )
        if not self.running():
            options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.home}"
            options += " -c max_connections=200 -c shared_buffers=256MB"
            if not self.durable:
                # Throwaway test clusters: crash safety of the server itself is not under test.
                options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            subprocess.run(
                _as_postgres(
                    [str(bin_dir / "pg_ctl"), "-D", str(self.data), "-l",
                     str(self.home / "server.log"), "-o", options, "-w",
                     "-t", str(int(STARTUP_TIMEOUT_SECONDS)), "start"]
                ),
                check=True,
                stdout=subprocess.DEVNULL,
            )
        self.wait_ready()
        self.create_database("campaigns")

    def running(self) -> bool:
        pid_file = self.data / "postmaster.pid"
        if not pid_file.exists():
            return False
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, 0)
        except (ValueError, OSError):
            return False
        return True

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
        return self.url(name)

    def stop(self) -> bool:
        if not self.running():
            return False
        subprocess.run(
            _as_postgres([str(postgres_bin() / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"]),
            check=True,
            stdout=subprocess.DEVNULL,
        )
        return True
