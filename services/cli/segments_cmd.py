"""`campaignctl segment define|change|delete`: segment commands onto campaign.commands.

Criteria are JSON (`--criteria '{"op": "eq", "field": "attr.plan", "value": "pro"}'` or
`--criteria-file`), checked before anything is published: an invalid expression exits 2 with
the path of each fault. The command handler answers with SegmentDefined / SegmentChanged /
SegmentDeleted on segments.events, or CommandRejected (already exists, does not exist).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console

from schemas.base import Record
from schemas.segments import ChangeSegment, DefineSegment, DeleteSegment, InvalidCriteria, parse_criteria
from services.cli.publishing import PublishError, publish_command
from services.common.settings import Settings

segment_app = typer.Typer(help="Segments: define, change, delete.", no_args_is_help=True)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

Tenant = Annotated[str, typer.Option("--tenant", help="Tenant id.")]
SegmentId = Annotated[str, typer.Argument(help="Segment id.")]
CriteriaText = Annotated[str | None, typer.Option("--criteria", help="Criteria expression (JSON).")]
CriteriaFile = Annotated[
    Path | None, typer.Option("--criteria-file", help="Criteria expression file (JSON).")
]


def _fail(message: str, code: int) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except (InvalidCriteria, ValidationError) as exc:
        _fail(str(exc), 2)
    except PublishError as exc:
        _fail(str(exc), 1)
    except OSError as exc:
        _fail(str(exc), 1)


def _criteria(text: str | None, path: Path | None) -> Any:
    if text is not None and path is not None:
        _fail("give --criteria or --criteria-file, not both", 2)
    raw = text if text is not None else (path.read_text(encoding="utf-8") if path else None)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        _fail(f"criteria are not JSON: {exc}", 2)
    return parse_criteria(data)


def _publish(command: Record, tenant: str, segment_id: str) -> None:
    command_id = publish_command(Settings(), command, tenant_id=tenant, campaign_id=segment_id)
    out.print(f"{type(command).__name__} {segment_id} published (command {command_id})", highlight=False)


@segment_app.command("define")
def segment_define(
    segment_id: SegmentId,
    tenant: Tenant,
    name: Annotated[str, typer.Option("--name", help="Segment name.")],
    criteria: CriteriaText = None,
    criteria_file: CriteriaFile = None,
) -> None:
    """Define a new segment."""
    with _errors():
        parsed = _criteria(criteria, criteria_file)
        if parsed is None:
            _fail("give --criteria or --criteria-file", 2)
        _publish(DefineSegment(segment_id=segment_id, name=name, criteria=parsed), tenant, segment_id)


@segment_app.command("change")
def segment_change(
    segment_id: SegmentId,
    tenant: Tenant,
    name: Annotated[str | None, typer.Option("--name", help="New name.")] = None,
    criteria: CriteriaText = None,
    criteria_file: CriteriaFile = None,
) -> None:
    """Rename a segment, change its criteria, or both."""
    with _errors():
        parsed = _criteria(criteria, criteria_file)
        _publish(ChangeSegment(segment_id=segment_id, name=name, criteria=parsed), tenant, segment_id)


@segment_app.command("delete")
def segment_delete(segment_id: SegmentId, tenant: Tenant) -> None:
    """Delete a segment (sends already started keep their snapshot of it)."""
    with _errors():
        _publish(DeleteSegment(segment_id=segment_id), tenant, segment_id)
