"""Rebuild the read models from offset zero, check them against the live ones, swap them in.

Guarantee: the live read models change only inside the swap transaction, all at once (every
read-model table and the live consumer group's positions, or nothing), and only when the rebuilt
models were projected up to exactly the live positions and equal the live rows (or the caller
forces the swap). Readers see the old models or the new ones, never a mix. A live projector
running meanwhile keeps its exactly-once guarantee: the swap replaces its stored positions, so
its next batch fails the compare-and-set, reloads them and goes on from there. The live
projector's lanes (projections.lanes.LANES) all store their positions under
`POSITIONS_NAME`; its engagement lane (projections.engagement_projector: engagement_events)
under `ENGAGEMENT_POSITIONS_NAME`. "The live positions" are both groups', compared and swapped
together with every table. The rebuild replays every topic through one `Projector` and the
engagement topics through one `EngagementProjector` (the read models do not depend on the
order the topics are read in).

How: a fresh schema `rebuild_<tag>` gets an empty twin of every read-model table (`LIKE ...
INCLUDING ALL`: columns, defaults, checks, keys, indexes) and of projector_positions; a
`Projector` with its own consumer group and that schema on its search_path replays every
projected topic from offset zero until caught up. The swap then locks the live tables, checks
positions and rows, and copies the rebuilt rows over the live ones in one transaction. It
copies rather than renaming schemas: the analyst views, row-level security policies and grants
are bound to the live tables, and a copy keeps every one of them in place.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
from confluent_kafka import KafkaException
from psycopg import sql

from projections.engagement_projector import (
    ENGAGEMENT_POSITIONS_NAME,
    EngagementProjector,
    engagement_projector_for,
)
from projections.lanes import POSITIONS_NAME
from projections.projector import projector_for
from services.common.kafka import make_admin
from services.common.settings import Settings

# The tables the projector writes, in the order rows are copied in a swap.
READ_MODEL_TABLES = (
    "campaigns", "campaign_recipients", "command_rejections", "recipient_attempts",
    "tenant_daily_sends", "campaign_throughput", "contacts", "contact_list_members",
    "command_outcomes", "segments", "contact_profiles", "engagement_events", "lists",
)
# Columns stamped with the projector's wall clock: they differ between any two projections of
# the same events, so the comparison leaves them out.
WALL_CLOCK_COLUMNS = frozenset({"updated_at"})
POSITIONS_TABLE = "projector_positions"
# A rebuild that does not catch up within this is stuck, not slow.
DEFAULT_DRAIN_TIMEOUT_SECONDS = 3600.0
# Catch-up rounds before giving up on matching a live projector that keeps moving, and the
# pause between them (a live projector a batch behind gets time to commit it).
SWAP_ATTEMPTS = 10
SWAP_RETRY_PAUSE_S = 1.0
ADMIN_TIMEOUT_SECONDS = 30.0


class RebuildRefused(RuntimeError):
    """The rebuilt models were not swapped in; the message says why."""


@dataclass
class RebuildReport:
    schema: str
    group: str
    engagement_group: str = ""
    records: int = 0
    # table -> rows present on one side only (live EXCEPT ALL rebuilt, and the reverse).
    differences: dict[str, int] = field(default_factory=dict)
    positions_match: bool = False
    swapped: bool = False

    @property
    def equal(self) -> bool:
        return self.positions_match and not any(self.differences.values())


def _columns(conn: psycopg.Connection[Any], table: str) -> list[str]:
    rows = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s)"
        " AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        (f"public.{table}",),
    ).fetchall()
    return [r[0] for r in rows]


def create_schema(conn: psycopg.Connection[Any], schema: str) -> None:
    """An empty twin of every read-model table and of the positions table in `schema`."""
    with conn.transaction():
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        for table in (*READ_MODEL_TABLES, POSITIONS_TABLE):
            conn.execute(sql.SQL("CREATE TABLE {}.{} (LIKE public.{} INCLUDING ALL)").format(
                sql.Identifier(schema), sql.Identifier(table), sql.Identifier(table)))


def drop_schema(conn: psycopg.Connection[Any], schema: str) -> None:
    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def compare(conn: psycopg.Connection[Any], schema: str) -> dict[str, int]:
    """Rows that differ per table between the live models and `schema` (wall clock aside)."""
    differences = {}
    for table in READ_MODEL_TABLES:
        cols = sql.SQL(", ").join(
            sql.Identifier(c) for c in _columns(conn, table) if c not in WALL_CLOCK_COLUMNS)
        live = sql.SQL("SELECT {} FROM public.{}").format(cols, sql.Identifier(table))
        rebuilt = sql.SQL("SELECT {} FROM {}.{}").format(
            cols, sql.Identifier(schema), sql.Identifier(table))
        query = sql.SQL(
            "SELECT count(*) FROM (({live} EXCEPT ALL {rebuilt})"
            " UNION ALL ({rebuilt} EXCEPT ALL {live})) AS d"
        ).format(live=live, rebuilt=rebuilt)
        row = conn.execute(query).fetchone()
        differences[table] = int(row[0]) if row else 0
    return differences


def _positions(conn: psycopg.Connection[Any], table: sql.Composable,
               group: str) -> dict[tuple[str, int], int]:
    rows = conn.execute(
        sql.SQL("SELECT topic, partition, next_offset FROM {} WHERE consumer_group = %s")
        .format(table), (group,)).fetchall()
    return {(t, p): o for t, p, o in rows}


def _swap(conn: psycopg.Connection[Any], schema: str, groups: dict[str, str]) -> None:
    """Inside the caller's transaction: rebuilt rows replace the live ones, and the rebuild's
    positions become the live groups' (`groups`: live group -> the rebuild's)."""
    for table in READ_MODEL_TABLES:
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in _columns(conn, table))
        # DELETE, not TRUNCATE: TRUNCATE is not MVCC-safe, and a reader whose snapshot is
        # older than the swap would see empty tables.
        conn.execute(sql.SQL("DELETE FROM public.{}").format(sql.Identifier(table)))
        conn.execute(sql.SQL("INSERT INTO public.{t} ({c}) SELECT {c} FROM {s}.{t}").format(
            t=sql.Identifier(table), c=cols, s=sql.Identifier(schema)))
    for live_group, rebuild_group in groups.items():
        conn.execute("DELETE FROM public.projector_positions WHERE consumer_group = %s",
                     (live_group,))
        conn.execute(
            sql.SQL("INSERT INTO public.projector_positions (consumer_group, topic, partition,"
                    " next_offset) SELECT %s, topic, partition, next_offset FROM {}.{}"
                    " WHERE consumer_group = %s").format(
                sql.Identifier(schema), sql.Identifier(POSITIONS_TABLE)),
            (live_group, rebuild_group))


def rebuild(
    settings: Settings,
    *,
    force: bool = False,
    keep_schema: bool = False,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_SECONDS,
    logger: Any = None,
) -> RebuildReport:
    """Replay into a fresh schema, compare with the live models, swap if equal (or `force`).

    Raises RebuildRefused when the rebuilt models differ (without `force`) or never reached the
    live projector's positions; the live models are then untouched. The rebuild schema and
    consumer group are removed at the end unless `keep_schema`.
    """
    tag = uuid.uuid4().hex[:10]
    report = RebuildReport(schema=f"rebuild_{tag}",
                           group=settings.group(f"projector-rebuild-{tag}"),
                           engagement_group=settings.group(f"projector-rebuild-{tag}-engagement"))
    # Live group -> the rebuild's, for the main lanes and the engagement lane.
    groups = {settings.group(POSITIONS_NAME): report.group,
              settings.group(ENGAGEMENT_POSITIONS_NAME): report.engagement_group}
    rebuilt_positions = sql.SQL("{}.{}").format(
        sql.Identifier(report.schema), sql.Identifier(POSITIONS_TABLE))
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        create_schema(conn, report.schema)
        try:
            engagement = engagement_projector_for(
                settings, group=report.engagement_group, positions_group=report.engagement_group,
                schema=report.schema, logger=logger)
            with projector_for(settings, group=report.group, schema=report.schema,
                               logger=logger) as projector, _closing(engagement):
                for _ in range(SWAP_ATTEMPTS):
                    report.records += projector.drain(timeout=drain_timeout)
                    report.records += engagement.drain(timeout=drain_timeout)
                    with conn.transaction():
                        # Freeze the live models: the live projector's next batch waits here.
                        conn.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(
                            sql.SQL(", ").join(sql.Identifier("public", t) for t in
                                               (*READ_MODEL_TABLES, POSITIONS_TABLE))))
                        report.positions_match = all(
                            _positions(conn, sql.Identifier("public", POSITIONS_TABLE), live)
                            == _positions(conn, rebuilt_positions, ours)
                            for live, ours in groups.items())
                        if report.positions_match or force:
                            report.differences = compare(conn, report.schema)
                            if not report.equal and not force:
                                raise RebuildRefused(
                                    "rebuilt read models differ from the live ones: "
                                    + ", ".join(f"{t} {n} rows" for t, n in
                                                report.differences.items() if n))
                            _swap(conn, report.schema, groups)
                            report.swapped = True
                            return report
                    # The live projector is elsewhere: let it move, catch up, look again.
                    time.sleep(SWAP_RETRY_PAUSE_S)
                raise RebuildRefused(
                    f"the live projector's positions never matched the rebuild's after"
                    f" {SWAP_ATTEMPTS} rounds (is it running and caught up?)")
        finally:
            if not keep_schema:
                drop_schema(conn, report.schema)
            _delete_group(settings, report.group)
            _delete_group(settings, report.engagement_group)


@contextlib.contextmanager
def _closing(engagement: EngagementProjector) -> Iterator[EngagementProjector]:
    try:
        yield engagement
    finally:
        engagement.close()


def _delete_group(settings: Settings, group: str) -> None:
    admin = make_admin(settings.kafka_bootstrap_servers)
    for future in admin.delete_consumer_groups(
            [group], request_timeout=ADMIN_TIMEOUT_SECONDS).values():
        # Only a lag gauge lives there; a group already gone (or never committed) is fine.
        with contextlib.suppress(KafkaException):
            future.result()
