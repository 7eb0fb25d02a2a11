"""The import runner: one thread per API process that runs queued import jobs, one at a time.

Guarantees:
- At most one run of a job at any moment across every API replica (the job row's lock, see
  job_store.claim); a run interrupted by a crash or a lost database connection leaves the
  job queued and unlocked, and the next runner imports it again from its first row: the
  import is idempotent (contact ids derive from tenant + address), so nothing is lost and a
  repeat changes no contact.
- Kafka down or refusing records: the job waits and is retried, up to MAX_ATTEMPTS runs with
  a growing pause (RETRY_BASE_S, doubling, at most RETRY_MAX_S), then fails with the reason;
  its upload stays stored either way. A file the import refuses whole (no usable header)
  fails at once with the reason.
- Progress (rows read so far) is written every PROGRESS_WRITE_S while a run goes on.
- Never dies of a PostgreSQL or Kafka outage: every failure is logged, waited out
  (OUTAGE_WAIT_S) and the loop carries on until `stop`.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, cast

import psycopg
import structlog

from services.cli.contacts_import import CsvImportError, ImportMode, ImportReport, import_contacts
from services.cli.publishing import PublishError
from services.common.settings import Settings
from services.common.topics import CONTACTS, topic_name
from services.imports import job_store
from services.imports.job_store import ClaimedJob

# Runs of one job before it fails for good: with the pauses below, about 8 minutes of Kafka
# outage are waited out (a broker restart takes well under one).
MAX_ATTEMPTS = 8
# Pause before the second run, doubled for each further one, capped: a broker that is down
# is asked again soon, one that stays down is not hammered.
RETRY_BASE_S = 5.0
RETRY_MAX_S = 120.0
# How often an idle runner looks for due jobs (an accepted upload wakes it at once).
IDLE_POLL_S = 2.0
# After a PostgreSQL failure outside a run, the pause before trying again.
OUTAGE_WAIT_S = 3.0
# A database that does not answer a connect within this is treated as down.
DB_CONNECT_TIMEOUT_S = 10
# Progress writes: often enough for a progress bar, rare enough to cost nothing.
PROGRESS_WRITE_S = 0.5
# How long stopping waits for a run in flight; past it the process may exit mid-run (the
# claim goes with the connection and the job is run again elsewhere).
STOP_WAIT_S = 5.0
# What a rejection says when Kafka, not the row, was at fault: the run is then repeated.
KAFKA_REFUSALS = ("not acknowledged by Kafka",)


def retry_delay(attempts: int) -> float:
    """The pause before the next run of a job that has had `attempts` runs."""
    return float(min(RETRY_BASE_S * 2 ** max(attempts - 1, 0), RETRY_MAX_S))


def kafka_failed(report: ImportReport) -> str | None:
    """Why a finished run must be repeated (rows Kafka did not acknowledge), or None."""
    for row in report.rejected:
        if row.reason.startswith(KAFKA_REFUSALS):
            return f"line {row.line}: {row.reason}"
    return None


class RowProgress:
    """Turns the import's byte offsets into rows read and writes them every PROGRESS_WRITE_S."""

    def __init__(self, body: bytes, write: Any) -> None:
        self._body, self._write = body, write
        self._offset = self.lines = 0
        self._written_at = 0.0

    @property
    def rows(self) -> int:
        return max(self.lines - 1, 0)  # the header is not a row

    def __call__(self, bytes_read: int, _total: int) -> None:
        self.lines += self._body.count(b"\n", self._offset, bytes_read)
        self._offset = max(self._offset, bytes_read)
        now = time.monotonic()
        if now - self._written_at >= PROGRESS_WRITE_S:
            self._written_at = now
            self._write(self.rows)


class ImportRunner:
    """Runs import jobs from PostgreSQL on a thread of its own: `start()`, `wake()` after an
    upload is stored, `stop()`."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="import-runner", daemon=True)
        self._log = structlog.get_logger().bind(component="import-runner")

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(STOP_WAIT_S)

    def _connect(self, autocommit: bool) -> psycopg.Connection[Any]:
        return psycopg.connect(self._settings.database_url, autocommit=autocommit,
                               connect_timeout=DB_CONNECT_TIMEOUT_S)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                ran = self.run_one()
            except psycopg.Error as exc:
                self._log.warning("import runner: database unavailable", error=str(exc))
                self._stop.wait(OUTAGE_WAIT_S)
                continue
            except Exception:  # never let the thread die: the next pass tries again
                self._log.exception("import runner failed")
                self._stop.wait(OUTAGE_WAIT_S)
                continue
            if not ran:
                self._wake.wait(IDLE_POLL_S)
                self._wake.clear()

    def run_one(self) -> bool:
        """Claim and run the next due job; False when none was due."""
        with self._connect(autocommit=False) as claims, self._connect(autocommit=True) as notes:
            claimed = job_store.claim(claims, topic_name(CONTACTS, self._settings))
            if claimed is None:
                return False
            self._run(claims, notes, claimed)
            return True

    def _run(self, claims: psycopg.Connection[Any], notes: psycopg.Connection[Any],
             claimed: ClaimedJob) -> None:
        log = self._log.bind(job_id=claimed.job_id, tenant_id=claimed.tenant_id)
        if claimed.attempts >= MAX_ATTEMPTS:  # every run so far died mid-way (a poison file?)
            job_store.give_up(claims, claimed.job_id,
                              f"interrupted or failed {claimed.attempts} times; last: {claimed.last_error}")
            return
        job_store.started(notes, claimed.job_id)
        attempts = claimed.attempts + 1

        def write_progress(rows: int) -> None:
            try:
                job_store.progressed(notes, claimed.job_id, rows)
            except psycopg.Error as exc:  # progress is a courtesy; the run goes on
                log.warning("import progress not written", error=str(exc))

        progress = RowProgress(claimed.body, write_progress)
        log.info("import started", attempt=attempts, bytes=len(claimed.body))
        try:
            report = self._import(claimed, progress)
        except CsvImportError as exc:
            job_store.give_up(claims, claimed.job_id, str(exc))
            log.info("import refused", reason=str(exc))
            return
        except PublishError as exc:
            self._retry(claims, claimed.job_id, attempts, str(exc), log)
            return
        except Exception as exc:  # a bug or an unforeseen driver error: retried, bounded
            log.exception("import run failed")
            self._retry(claims, claimed.job_id, attempts, f"{type(exc).__name__}: {exc}", log)
            return
        trouble = kafka_failed(report)
        if trouble is not None:
            self._retry(claims, claimed.job_id, attempts, trouble, log)
            return
        job_store.finish(claims, claimed.job_id, imported=report.imported, skipped=report.skipped,
                         rejected_count=report.rejected_count, rejected=report.rejected,
                         rows_done=progress.rows)
        log.info("import done", imported=report.imported, rejected=report.rejected_count,
                 seconds=round(report.seconds, 2))

    def _retry(self, claims: psycopg.Connection[Any], job_id: str, attempts: int,
                       error: str, log: Any) -> None:
        if attempts >= MAX_ATTEMPTS:
            job_store.give_up(claims, job_id, f"gave up after {attempts} attempts: {error}")
            log.warning("import failed", attempts=attempts, error=error)
            return
        delay = retry_delay(attempts)
        job_store.retry_later(claims, job_id, error, delay)
        log.warning("import waits to be retried", attempts=attempts, retry_in_s=delay, error=error)

    def _import(self, claimed: ClaimedJob, progress: RowProgress) -> ImportReport:
        # The import streams a file; the upload goes to a private temporary one, removed at once.
        handle, name = tempfile.mkstemp(prefix="import-", suffix=".csv")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(claimed.body)
            return import_contacts(
                Path(name), tenant_id=claimed.tenant_id, list_id=claimed.list_id,
                settings=self._settings, on_progress=progress,
                mode=cast(ImportMode, claimed.mode))
        finally:
            os.unlink(name)
