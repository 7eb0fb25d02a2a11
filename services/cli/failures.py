"""How `campaignctl` fails: one red line on stderr and an exit code, never a traceback.

Exit codes: 0 done, 1 a fatal error (Kafka or PostgreSQL unreachable, not found, rejected,
timeout), 2 invalid input (a bad option, value or setting), 130 interrupted.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import psycopg
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from schemas.base import InvalidEmail
from services.cli.contacts_import import CsvImportError
from services.cli.progress import CommandWasRejected, ScheduleWasMissed
from services.cli.publishing import PublishError
from services.common.settings import Settings, SettingsError, load

EXIT_FATAL = 1
EXIT_INVALID = 2

# soft_wrap: ids and reasons stay on one line, whatever the terminal width, so they can be copied.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = EXIT_FATAL) -> NoReturn:
    err.print(f"[red]error: {escape(message)}[/red]", highlight=False)
    raise typer.Exit(code)


def cli_settings() -> Settings:
    """The platform's settings from the environment; a bad value exits 2 naming its variable."""
    try:
        return load(Settings)
    except SettingsError as exc:
        fail(f"invalid settings: {exc}", EXIT_INVALID)


def validation_message(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "input"
        shown = repr(error.get("input"))
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" + ("" if shown in message else f" (got {shown})"))
    return "invalid input: " + "; ".join(parts)


@contextmanager
def fatal_errors() -> Iterator[None]:
    """Turn the failures a user can act on into a red message and an exit code."""
    try:
        yield
    except ValidationError as exc:
        fail(validation_message(exc), EXIT_INVALID)
    except (CommandWasRejected, ScheduleWasMissed):
        raise typer.Exit(EXIT_FATAL) from None  # the watch already printed it in red
    except (CsvImportError, PublishError, TimeoutError) as exc:
        fail(str(exc))
    except InvalidEmail as exc:
        fail(str(exc), EXIT_INVALID)
    except OSError as exc:
        fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
    except psycopg.Error as exc:
        fail(f"PostgreSQL: {str(exc).strip()}")
    except KeyboardInterrupt:
        fail("interrupted", 130)
