"""`campaignctl ops`: what operators look at.

`ops status`: each service's state (under the local supervisor), readiness with the reason of
each failed check, version and partition assignment, from the services' /readyz endpoints
(`--endpoint NAME=URL`, or by default the local stack's ports). Exit 0 when every service is
ready, 1 otherwise.

`ops lag`: how far each of the engine's consumer groups is behind, per partition. Two
snapshots `--interval` seconds apart give each partition's consumption rate and time to drain;
`--watch` keeps taking them; `--json` prints one JSON document per snapshot pair for scripts.
Exit codes: 0 shown; 1 the cluster did not answer within `--timeout`.
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
from services.common.observability import ask_readiness
from services.common.settings import Settings
from services.platform.stack import SERVICES, Stack

ops_app = typer.Typer(help="Operators: service status and consumer lag.", no_args_is_help=True)
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


def _endpoints(given: list[str], stack: Stack) -> dict[str, str]:
    if not given:
        return {name: stack.probe_url(name) for name in SERVICES}
    endpoints = {}
    for item in given:
        name, sep, url = item.partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise typer.BadParameter(f"{item!r}: expected NAME=http://HOST:PORT", param_hint="--endpoint")
        endpoints[name] = url
    return endpoints


def _problem(answer: dict[str, object]) -> str:
    if "error" in answer:
        return f"not answering: {answer['error']}"
    checks = answer.get("checks")
    if not isinstance(checks, dict):
        return ""
    return "; ".join(f"{k}: {v}" for k, v in checks.items() if v != "ok")


@ops_app.command("status")
def ops_status(
    endpoint: Annotated[list[str] | None, typer.Option(
        "--endpoint", help="NAME=URL of a service's metrics port (repeatable; default: the "
        "local stack's services).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Each service: supervisor state, readiness (and why not), version, assignment."""
    settings = Settings()
    stack = Stack(settings.state_dir)
    endpoints = _endpoints(endpoint or [], stack)
    supervised = {} if endpoint else {p["name"]: p for p in stack.supervision().processes()}
    report = []
    for name, url in endpoints.items():
        answer = ask_readiness(url)
        info = supervised.get(name)
        report.append({
            "service": name,
            "state": info["statename"] if info else None,
            "uptime_s": int(info["now"] - info["start"]) if info and info["statename"] == "RUNNING" else None,
            "restarts": stack.supervision().restarts(name) if info else None,
            "ready": bool(answer.get("ready")),
            "version": answer.get("version"),
            "assignment": answer.get("assignment"),
            "problem": _problem(answer),
        })
    if as_json:
        out.print_json(json.dumps({"services": report}))
    else:
        table = Table("service", "state", "up", "restarts", "ready", "version", "assigned", "problem")
        for row in report:
            assigned = row["assignment"]
            table.add_row(
                str(row["service"]), str(row["state"] or "-"),
                "-" if row["uptime_s"] is None else f"{row['uptime_s']} s",
                "-" if row["restarts"] is None else str(row["restarts"]),
                "yes" if row["ready"] else "[red]no[/red]", str(row["version"] or "-"),
                "-" if not isinstance(assigned, list) else str(len(assigned)),
                escape(str(row["problem"])))
        out.print(table)
    if not all(row["ready"] for row in report):
        raise typer.Exit(1)
