"""Versioned schema migrations: numbered SQL files applied once each, in order.

Each file runs in its own transaction together with its row in schema_migrations, so a
failed migration leaves nothing half-applied. An advisory lock lets several services start
at once without applying a file twice.
"""

from __future__ import annotations

from pathlib import Path

import psycopg

MIGRATIONS = Path(__file__).parent / "migrations"
# Arbitrary constant shared by every process that migrates this database.
_LOCK_KEY = 724_201_117


def pending(conn: psycopg.Connection) -> list[Path]:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    return [p for p in sorted(MIGRATIONS.glob("*.sql")) if p.stem not in done]


def apply_migrations(database_url: str) -> list[str]:
    """Apply every pending migration; returns the versions applied now."""
    applied: list[str] = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            for path in pending(conn):
                with conn.transaction():
                    conn.execute(path.read_text())
                    conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (path.stem,))
                applied.append(path.stem)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return applied


if __name__ == "__main__":
    from services.common.settings import Settings, load

    print(apply_migrations(load(Settings).database_url))
