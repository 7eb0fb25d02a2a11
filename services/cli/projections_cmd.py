"""`campaignctl projections rebuild`: replay every projected topic from offset zero into a fresh
schema, check it against the live read models, and swap it in atomically (projections.rebuild).
The engagement lane's engagement_events and its positions ('engagement') are rebuilt, compared
and swapped with the rest.

Exit codes: 0 rebuilt and swapped (equal, or forced); 1 refused (the rebuilt models differ, or
the live projector's positions were never matched) or PostgreSQL / Kafka failed; the live read
models are then untouched.
"""

from __future__ import annotations

from typing import Annotated

import psycopg
import typer
from confluent_kafka import KafkaException
from rich.console import Console
from rich.markup import escape

from projections.migrate import apply_migrations
from projections.rebuild import DEFAULT_DRAIN_TIMEOUT_SECONDS, RebuildRefused, rebuild
from services.common.settings import Settings

projections_app = typer.Typer(help="Read models: rebuild from the topics.", no_args_is_help=True)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


@projections_app.command("rebuild")
def projections_rebuild(
    force: Annotated[bool, typer.Option(
        "--force", help="Swap in even if the rebuilt models differ from the live ones.")] = False,
    keep_schema: Annotated[bool, typer.Option(
        "--keep-schema", help="Keep the rebuild schema afterwards (to inspect it).")] = False,
    timeout: Annotated[float, typer.Option(
        "--timeout", help="Give up if the replay has not caught up after S seconds.")
    ] = DEFAULT_DRAIN_TIMEOUT_SECONDS,
) -> None:
    """Replay from offset zero into a fresh schema, compare with the live models, swap."""
    settings = Settings()
    try:
        apply_migrations(settings.database_url)
        out.print("replaying every projected topic (engagement included) from offset zero …")
        report = rebuild(settings, force=force, keep_schema=keep_schema, drain_timeout=timeout)
    except RebuildRefused as exc:
        err.print(f"[red]refused: {escape(str(exc))}[/red] (live read models untouched)",
                  highlight=False)
        raise typer.Exit(1) from None
    except (psycopg.Error, KafkaException, TimeoutError) as exc:
        err.print(f"[red]error: {escape(str(exc))}[/red]", highlight=False)
        raise typer.Exit(1) from None
    differing = {t: n for t, n in report.differences.items() if n}
    verdict = "equal to the live ones" if report.equal else f"forced over differences {differing}"
    out.print(f"rebuilt {report.records:,} records into {report.schema}: {verdict}; swapped in.")
