"""`campaignctl ops lag`: how far each of the engine's consumer groups is behind, per partition.

Two snapshots `--interval` seconds apart give each partition's consumption rate and time to
drain; `--watch` keeps taking them; `--json` prints one JSON document per snapshot pair for
scripts. Exit codes: 0 shown; 1 the cluster did not answer within `--timeout`.
"""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from services.cli.consumer_lag import LagRow, engine_groups, format_drain, lag_rows, take_snapshot
from services.common.settings import Settings

ops_app = typer.Typer(help="Operators: consumer lag.", no_args_is_help=True)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _table(rows: list[LagRow]) -> Table:
    table = Table("group", "topic", "partition", "committed", "log end", "lag", "rate/s", "drain")
    for row in rows:
        table.add_row(row.group, row.topic, str(row.partition),
                      "-" if row.committed is None else str(row.committed), str(row.log_end),
                      str(row.lag), f"{row.rate_per_second:.1f}", format_drain(row.seconds_to_drain))
    return table


@ops_app.command("lag")
def ops_lag(
    group: Annotated[str, typer.Option(
        "--group", help="Only groups whose id starts with this (after the engine's prefix).")] = "",
    interval: Annotated[float, typer.Option(
        "--interval", min=0.1, help="Seconds between the two snapshots a rate is taken over.")] = 2.0,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh until interrupted.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    timeout: Annotated[float, typer.Option(
        "--timeout", min=0.5, help="Give up when the cluster does not answer within S seconds.")
    ] = 10.0,
) -> None:
    """Per group and partition: committed offset, log end, lag, rate and time to drain."""
    settings = Settings()
    # log_level 0: the client's own connection-refused lines would bury the one error shown.
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers, "log_level": 0})
    try:
        groups = engine_groups(admin, settings.group(group), timeout)
        before = take_snapshot(admin, groups, timeout)
        while True:
            time.sleep(interval)
            after = take_snapshot(admin, groups, timeout)
            rows = lag_rows(before, after)
            if as_json:
                out.print_json(json.dumps({"groups": groups, "partitions": [r.as_json() for r in rows]}))
            elif not rows:
                out.print(f"no consumer group of the engine has committed offsets "
                          f"(groups found: {len(groups)})")
            else:
                out.print(_table(rows))
            if not watch:
                return
            before = after
            groups = engine_groups(admin, settings.group(group), timeout)
    except (KafkaException, TimeoutError) as exc:
        err.print(f"[red]error: the cluster did not answer: {escape(str(exc))}[/red]",
                  highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        return
