"""The engine's services run under supervisord (PyPI `supervisor`): a crashed process is
restarted with backoff, a stuck one by the watchdog (services/platform/watchdog.py).

`Supervision(state_dir, programs)` writes one supervisord configuration under
`<state>/supervisor/`, starts supervisord (a daemon, on a unix socket there: no TCP port),
and talks to it over XML-RPC for `status`, `pid` and `stop`. Each watched program gets its own
HEARTBEAT_FILE (`<state>/heartbeats/<name>`); every program inherits supervisord's
environment, which is the platform's settings.

Guarantees: `start` is idempotent (programs already running are left alone) and returns once
supervisord answers; `stop` stops every program (SIGTERM, SIGKILL after STOP_WAIT_SECONDS) and
supervisord itself, and returns only when they are gone; a program that exits by itself is
started again, after 1, 2, 3 ... s while it keeps failing within START_SECONDS.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.restart_counts import RESTARTS_FILE, RESTARTS_FILE_ENV, read_counts, restarts
from services.common.settings import child_environment
from services.platform.processes import pid_alive

# A service that ignores SIGTERM this long is killed: a stuck shutdown must not hang `down`.
STOP_WAIT_SECONDS = 15
# A process that dies sooner than this after its start counts as a failed start (backoff).
START_SECONDS = 3
# Failed starts in a row before supervisord gives up (FATAL); the wait grows by 1 s each.
START_RETRIES = 100
# Bounds waiting for supervisord's socket to answer after starting it.
READY_TIMEOUT_SECONDS = 30.0
# Bounds waiting for supervisord to stop every program and exit.
SHUTDOWN_TIMEOUT_SECONDS = 90.0


@dataclass(frozen=True)
class Program:
    """One supervised process: its command line, and whether the watchdog watches it."""

    name: str
    argv: Sequence[str]
    heartbeat: bool = True
    env: Mapping[str, str] = field(default_factory=dict)


def _quote(value: str) -> str:
    # supervisord interpolates %(name)s in every value: a literal % is written %%.
    return value.replace("%", "%%")


class Supervision:
    def __init__(self, state_dir: Path, programs: Sequence[Program], *, env: Mapping[str, str],
                 cwd: Path, watchdog_env: Mapping[str, str] | None = None) -> None:
        self.state_dir = state_dir.resolve()
        self.programs = list(programs)
        self.env = dict(env)
        self.cwd = cwd
        self.watchdog_env = dict(watchdog_env or {})
        self.folder = self.state_dir / "supervisor"
        self.logs = self.state_dir / "logs"
        self.heartbeats = self.state_dir / "heartbeats"

    @property
    def socket(self) -> Path:
        return self.folder / "supervisor.sock"

    @property
    def config_file(self) -> Path:
        return self.folder / "supervisord.conf"

    @property
    def pid_file(self) -> Path:
        return self.folder / "supervisord.pid"

    def log_file(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def config(self) -> str:
        """The supervisord configuration for these programs (pure)."""
        lines = [
            "[unix_http_server]", f"file={_quote(str(self.socket))}", "chmod=0700", "",
            "[supervisord]", f"logfile={_quote(str(self.folder / 'supervisord.log'))}",
            f"pidfile={_quote(str(self.pid_file))}", f"childlogdir={_quote(str(self.logs))}",
            "logfile_maxbytes=10MB", "logfile_backups=2", "loglevel=info", "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface", "",
            "[supervisorctl]", f"serverurl=unix://{_quote(str(self.socket))}", "",
        ]
        for program in self.programs:
            env = dict(program.env)
            if program.heartbeat:
                env["HEARTBEAT_FILE"] = str(self.heartbeats / program.name)
            env[RESTARTS_FILE_ENV] = str(self.folder / RESTARTS_FILE)  # its restarts gauge
            lines += [
                f"[program:{program.name}]",
                f"command={_quote(shlex.join(program.argv))}",
                f"directory={_quote(str(self.cwd))}",
                "autostart=true", "autorestart=true",
                f"startsecs={START_SECONDS}", f"startretries={START_RETRIES}",
                f"stopwaitsecs={STOP_WAIT_SECONDS}", "stopsignal=TERM",
                "stopasgroup=true", "killasgroup=true",
                "redirect_stderr=true",
                f"stdout_logfile={_quote(str(self.log_file(program.name)))}",
                "stdout_logfile_maxbytes=50MB", "stdout_logfile_backups=2",
            ]
            if env:
                pairs = ",".join(f'{key}="{_quote(value)}"' for key, value in sorted(env.items()))
                lines.append(f"environment={pairs}")
            lines.append("")
        watched = [p.name for p in self.programs if p.heartbeat]
        watchdog = [sys.executable, "-m", "services.platform.watchdog", str(self.state_dir), *watched]
        lines += [
            "[eventlistener:watchdog]",
            f"command={_quote(shlex.join(watchdog))}",
            f"directory={_quote(str(self.cwd))}",
            "events=PROCESS_STATE,TICK_5", "autorestart=true", "buffer_size=100",
            "stdout_logfile=NONE",  # stdout is the listener protocol, not a log
            f"stderr_logfile={_quote(str(self.log_file('watchdog')))}",
            "stderr_logfile_maxbytes=10MB",
        ]
        if self.watchdog_env:
            pairs = ",".join(f'{k}="{_quote(v)}"' for k, v in sorted(self.watchdog_env.items()))
            lines.append(f"environment={pairs}")
        return "\n".join(lines) + "\n"

    def supervisord_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def rpc(self) -> Any:
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, f"unix://{self.socket}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def start(self) -> None:
        """Start supervisord with every program, or the programs that are not running."""
        for folder in (self.folder, self.logs, self.heartbeats):
            folder.mkdir(parents=True, exist_ok=True)
        if self.supervisord_pid() is not None:
            self.rpc().supervisor.startAllProcesses(True)
            return
        self.config_file.write_text(self.config())
        subprocess.run(
            [sys.executable, "-m", "supervisor.supervisord", "-c", str(self.config_file)],
            env=child_environment(self.env), cwd=self.cwd, check=True, timeout=READY_TIMEOUT_SECONDS,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while True:
            try:
                states = {i["statename"] for i in self.rpc().supervisor.getAllProcessInfo()}
                if states and "STARTING" not in states:
                    return  # every program running, or backing off (status shows which)
            except (OSError, xmlrpc.client.Fault):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"supervisord did not start its programs ({self.socket})")
            time.sleep(0.2)

    def stop(self) -> bool:
        """Stop every program and supervisord; True when it was running."""
        pid = self.supervisord_pid()
        if pid is None:
            return False
        try:
            self.rpc().supervisor.shutdown()
        except (OSError, xmlrpc.client.Fault):
            pass
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT_SECONDS
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid_alive(pid):
            os.kill(pid, 9)
        return True

    def processes(self) -> list[dict[str, Any]]:
        """supervisord's view of every program (empty when it is not running)."""
        if self.supervisord_pid() is None:
            return []
        try:
            infos: list[dict[str, Any]] = self.rpc().supervisor.getAllProcessInfo()
        except (OSError, xmlrpc.client.Fault):
            return []
        return infos

    def pid(self, name: str) -> int | None:
        for info in self.processes():
            if info["name"] == name and info["statename"] in ("RUNNING", "STARTING") and info["pid"]:
                return int(info["pid"])
        return None

    def restarts(self, name: str) -> int:
        return restarts(read_counts(self.folder).get(name, {}))

    def status_lines(self) -> list[str]:
        """One line per program, its name first: state, pid, uptime, restarts (watchdog
        restarts among them)."""
        counts = read_counts(self.folder)
        lines = []
        for info in self.processes():
            name = info["name"]
            if name == "watchdog":
                continue
            mine = counts.get(name, {})
            up = int(info["now"] - info["start"]) if info["statename"] == "RUNNING" else 0
            pid = f"pid {info['pid']}" if info["pid"] else "-"
            lines.append(
                f"{name:<16} {info['statename']:<9} {pid:<11} up {_duration(up):>8}  "
                f"restarts {restarts(mine)} (watchdog {mine.get('watchdog', 0)})"
            )
        return lines


def _duration(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
