"""Background processes with pid files: idempotent start, stop exactly what was started."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.common.settings import child_environment

# A process that ignores SIGTERM this long is killed: a stuck shutdown must not hang `down`.
STOP_GRACE_SECONDS = 20.0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


@dataclass
class ManagedProcess:
    """One long-running process, tracked by a pid file under the state folder."""

    name: str
    argv: list[str]
    state_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "pids" / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "logs" / f"{self.name}.log"

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def start(self) -> int:
        """Start unless already running; returns the pid."""
        running = self.pid()
        if running:
            return running
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=child_environment(self.env),
                cwd=self.cwd,
                start_new_session=True,  # survives the shell that ran `make up`
            )
        self.pid_file.write_text(str(proc.pid))
        return proc.pid

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> bool:
        """SIGTERM, wait, then SIGKILL. Returns True if something was running."""
        pid = self.pid()
        self.pid_file.unlink(missing_ok=True)
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return True
            _reap(pid)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
        _reap(pid)
        return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
