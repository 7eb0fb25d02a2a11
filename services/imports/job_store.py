"""Import jobs in PostgreSQL (migration 0012): the upload, its claim, progress and report.

Guarantees:
- `accept` stores the job and its upload in one transaction: once it returns, the upload
  survives any crash of the API, and some runner will import it.
- A job is claimed by locking its row FOR UPDATE SKIP LOCKED on a connection held for the
  whole run (`claim`): two runners (threads, processes, API replicas) never run one job at
  once, and a runner that dies releases its claim with its connection, so the job is taken
  up again. Only the claiming transaction writes the job row (`finish`, `retry_later`);
  progress goes to import_job_progress from any connection, so readers see it as it runs.
- Reads are scoped to a tenant: another tenant's job is not found, like an unknown one.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from services.cli.contact_csv import RejectedRow

JobState = Literal["queued", "running", "done", "failed"]
# Rejected rows a job's report keeps (all are counted): bounds the row and the answer.
MAX_REPORTED_REJECTIONS = 1_000
# Jobs GET /imports lists, newest first.
MAX_LISTED_JOBS = 100


@dataclass(frozen=True, slots=True)
class ImportJob:
    """A job as a reader sees it. `rows_total` counts physical lines after the header (a
    quoted field may span lines, so `rows_done` reaches it only roughly before `done`)."""

    job_id: str
    list_id: str | None
    mode: str
    state: JobState
    byte_count: int
    rows_total: int
    rows_done: int
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    imported: int | None
    skipped: int | None
    rejected_count: int | None
    rejected: list[dict[str, Any]]
    last_error: str | None
    failure: str | None


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """What a runner needs to run a job it holds the claim of."""

    job_id: str
    tenant_id: str
    list_id: str | None
    mode: str
    attempts: int  # runs before this one
    last_error: str | None
    body: bytes


def count_rows(body: bytes) -> int:
    """Physical lines after the header line (a last line without a newline counts)."""
    lines = body.count(b"\n") + (1 if body and not body.endswith(b"\n") else 0)
    return max(lines - 1, 0)


def accept(conn: psycopg.Connection[Any], topic: str, tenant_id: str, list_id: str | None,
           mode: str, body: bytes) -> str:
    """Store a new queued job with its upload, for the runners of `topic`; its id."""
    job_id = str(uuid.uuid4())
    with conn.transaction():
        conn.execute(
            "INSERT INTO import_jobs (job_id, topic, tenant_id, list_id, mode, byte_count,"
            " rows_total) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (job_id, topic, tenant_id, list_id, mode, len(body), count_rows(body)))
        conn.execute("INSERT INTO import_uploads (job_id, tenant_id, body) VALUES (%s, %s, %s)",
                     (job_id, tenant_id, body))
        conn.execute("INSERT INTO import_job_progress (job_id, tenant_id) VALUES (%s, %s)",
                     (job_id, tenant_id))
    return job_id


_JOB_COLUMNS = """
SELECT j.job_id::text, j.list_id, j.mode,
       CASE WHEN j.state <> 'queued' THEN j.state
            WHEN p.started_at IS NOT NULL AND p.not_before <= now() THEN 'running'
            ELSE 'queued' END AS state,
       j.byte_count, j.rows_total, p.rows_done, p.attempts, j.created_at, p.started_at,
       j.finished_at, j.imported, j.skipped, j.rejected_count,
       coalesce(j.rejected, '[]'::jsonb) AS rejected, p.last_error, j.failure
FROM import_jobs j JOIN import_job_progress p ON p.job_id = j.job_id
"""


def job(conn: psycopg.Connection[Any], tenant_id: str, job_id: str) -> ImportJob | None:
    """One job of the tenant, or None."""
    try:
        uuid.UUID(job_id)
    except ValueError:
        return None
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(_JOB_COLUMNS + " WHERE j.tenant_id = %s AND j.job_id = %s",
                          (tenant_id, job_id)).fetchone()
    return ImportJob(**row) if row else None


def jobs(conn: psycopg.Connection[Any], tenant_id: str) -> list[ImportJob]:
    """The tenant's latest MAX_LISTED_JOBS jobs, newest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            _JOB_COLUMNS + " WHERE j.tenant_id = %s ORDER BY j.created_at DESC LIMIT %s",
            (tenant_id, MAX_LISTED_JOBS)).fetchall()
    return [ImportJob(**row) for row in rows]


# The oldest due queued job whose row nobody holds; a job whose runner died is queued (its
# state never left 'queued') and unlocked, so it is found again.
_CLAIM = """
SELECT j.job_id::text, j.tenant_id, j.list_id, j.mode, p.attempts, p.last_error
FROM import_jobs j JOIN import_job_progress p ON p.job_id = j.job_id
WHERE j.topic = %s AND j.state = 'queued' AND p.not_before <= now()
ORDER BY j.created_at
LIMIT 1
FOR UPDATE OF j SKIP LOCKED
"""


def claim(claims: psycopg.Connection[Any], topic: str) -> ClaimedJob | None:
    """Claim the next due job of `topic` on `claims` (a connection not in autocommit mode, given to this
    job alone): its transaction stays open, holding the job row, until `finish` or
    `retry_later` commits or the caller rolls back. None (and nothing held) when no job is due."""
    row = claims.execute(_CLAIM, (topic,)).fetchone()
    if row is None:
        claims.rollback()
        return None
    job_id, tenant_id, list_id, mode, attempts, last_error = row
    body = claims.execute("SELECT body FROM import_uploads WHERE job_id = %s", (job_id,)).fetchone()
    if body is None:  # cannot happen while the job is queued (both are written together)
        claims.execute("UPDATE import_jobs SET state = 'failed', finished_at = now(),"
                       " failure = 'the upload is missing' WHERE job_id = %s", (job_id,))
        claims.commit()
        return None
    return ClaimedJob(job_id, tenant_id, list_id, mode, attempts, last_error, bytes(body[0]))


def started(conn: psycopg.Connection[Any], job_id: str) -> None:
    """A run of the job begins (autocommit `conn`, not the claim's)."""
    conn.execute("UPDATE import_job_progress SET attempts = attempts + 1, rows_done = 0,"
                 " started_at = now(), updated_at = now() WHERE job_id = %s", (job_id,))


def progressed(conn: psycopg.Connection[Any], job_id: str, rows_done: int) -> None:
    """Rows read so far by the current run (autocommit `conn`)."""
    conn.execute("UPDATE import_job_progress SET rows_done = %s, updated_at = now()"
                 " WHERE job_id = %s", (rows_done, job_id))


def finish(claims: psycopg.Connection[Any], job_id: str, *, imported: int, skipped: int,
           rejected_count: int, rejected: list[RejectedRow], rows_done: int) -> None:
    """The job is done: its report stored, its upload deleted, its claim released."""
    report = [{"line": r.line, "reason": r.reason} for r in rejected[:MAX_REPORTED_REJECTIONS]]
    claims.execute(
        "UPDATE import_jobs SET state = 'done', finished_at = clock_timestamp(), imported = %s,"
        " skipped = %s, rejected_count = %s, rejected = %s WHERE job_id = %s",
        (imported, skipped, rejected_count, Jsonb(report), job_id))
    claims.execute("UPDATE import_job_progress SET rows_done = %s, last_error = NULL,"
                   " updated_at = now() WHERE job_id = %s", (rows_done, job_id))
    claims.execute("DELETE FROM import_uploads WHERE job_id = %s", (job_id,))
    claims.commit()


def give_up(claims: psycopg.Connection[Any], job_id: str, failure: str) -> None:
    """The job failed for good (`failure` says why); its upload is kept for an operator."""
    claims.execute("UPDATE import_jobs SET state = 'failed', finished_at = clock_timestamp(), failure = %s"
                   " WHERE job_id = %s", (failure, job_id))
    claims.execute("UPDATE import_job_progress SET last_error = %s, updated_at = now()"
                   " WHERE job_id = %s", (failure, job_id))
    claims.commit()


def retry_later(claims: psycopg.Connection[Any], job_id: str, error: str, delay_s: float) -> None:
    """The run could not reach Kafka: the job stays queued and is due again in `delay_s`."""
    claims.execute(
        # clock_timestamp: now() is when the claim began, maybe minutes ago.
        "UPDATE import_job_progress SET last_error = %s, not_before = clock_timestamp() + make_interval("
        "secs => %s), updated_at = now() WHERE job_id = %s", (error, delay_s, job_id))
    claims.commit()
