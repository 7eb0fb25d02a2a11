"""The demo: start the platform, import 10,000 contacts in two overlapping lists, send a
campaign to both lists, watch it live, and check the result three ways.

Exit status 0 only when the read model's sent count, the SMTP sink's record of this campaign
and the number of distinct contacts are the same number, and nobody was mailed twice.
"""

from __future__ import annotations

import csv
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from schemas.commands import CreateCampaign, SendCampaign
from services.cli.contacts_import import import_contacts
from services.cli.progress import watch_campaign
from services.cli.publishing import publish_command
from services.common.settings import PlatformSettings, Settings, SettingsError, load
from services.platform.stack import Stack, StackPorts
from services.smtp_sink import header, read_records

TENANT = "demo"
# Bounds the wait for the campaign; far above the expected time, guards against a stuck stage.
WATCH_TIMEOUT_SECONDS = 600.0


def lists(contacts: int) -> dict[str, tuple[int, int]]:
    """Two overlapping lists: the first 70% are customers, the last 70% read the newsletter."""
    return {"customers": (0, int(contacts * 0.7)), "newsletter": (int(contacts * 0.3), contacts)}


def write_lists(folder: Path, contacts: int) -> dict[str, Path]:
    """One CSV per list; people in both lists appear in both files (upserts merge them)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for list_id, (start, end) in lists(contacts).items():
        path = folder / f"{list_id}.csv"
        with path.open("w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["email", "first_name", "last_name", "city"])
            for i in range(start, end):
                city = ("Oslo", "Lima")[i % 2]
                out.writerow([f"Person.{i}@Demo-Example.ORG", f"Ada{i}", f"Lovelace{i}", city])
        files[list_id] = path
    return files


def import_lists(files: dict[str, Path], settings: Settings, console: Console) -> None:
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        for list_id, path in files.items():
            task = progress.add_task(f"import {path.name:<16}", total=path.stat().st_size)

            def advance(done: int, total: int, task: TaskID = task) -> None:
                progress.update(task, completed=done, total=total)

            report = import_contacts(path, tenant_id=TENANT, list_id=list_id, settings=settings,
                                     on_progress=advance)
            progress.update(task, completed=path.stat().st_size)
            if report.rejected:
                raise SystemExit(f"{len(report.rejected)} rows rejected in {path}: {report.rejected[:3]}")
            console.print(f"  {report.imported:,} contacts imported into list [bold]{list_id}[/]")


def main() -> int:
    console = Console()
    try:
        platform = load(PlatformSettings)
    except SettingsError as error:
        console.print(f"[bold red]invalid settings[/]: {error}")
        return 2
    contacts = platform.demo_contacts
    stack = Stack(platform.state_dir, StackPorts.from_settings(platform))
    console.rule("[bold]campaign engine demo")
    console.print("Starting the local platform (Kafka, PostgreSQL, SMTP sink, four services)…")
    stack.up()
    settings = stack.settings()

    files = write_lists(stack.state_dir / "demo", contacts)
    import_lists(files, settings, console)

    campaign = f"cmp-{uuid.uuid4().hex[:12]}"
    create = CreateCampaign(
        name="Winter newsletter", subject='Hello {{ first_name | "there" }}, news from {{ attr.city }}',
        from_address="news@demo-example.org",
        body_text="Hi {{ first_name }},\nthis is the winter newsletter.\n",
        body_html="<p>Hi {{ first_name }},</p><p>this is the <b>winter newsletter</b>.</p>",
    )
    publish_command(settings, create, tenant_id=TENANT, campaign_id=campaign)
    started = time.monotonic()
    publish_command(settings, SendCampaign(list_ids=list(files)), tenant_id=TENANT, campaign_id=campaign)
    console.print(f"Campaign [bold]{campaign}[/] sent to lists {', '.join(files)}")
    final = watch_campaign(settings, campaign, TENANT, timeout=WATCH_TIMEOUT_SECONDS, console=console)
    elapsed = time.monotonic() - started

    mails = [r for r in read_records(stack.sink_records) if header(r, "X-Campaign-ID") == campaign]
    per_recipient = Counter(r["rcpt_tos"][0] for r in mails)
    distinct = contacts
    table = Table(title=f"Campaign {campaign}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("distinct contacts in the two lists", f"{distinct:,}")
    table.add_row("recipients (read model total)", f"{final.total or 0:,}")
    table.add_row("sent (read model)", f"{final.sent:,}")
    table.add_row("failed (read model)", f"{final.failed:,}")
    table.add_row("messages recorded by the SMTP sink", f"{len(mails):,}")
    table.add_row("recipients mailed more than once", f"{sum(1 for n in per_recipient.values() if n > 1):,}")
    table.add_row("send command to completed", f"{elapsed:.1f} s")
    table.add_row("rate", f"{final.sent / elapsed:,.0f} mails/s")
    console.print(table)
    ok = final.status == "completed" and final.sent == len(mails) == len(per_recipient) == distinct
    console.print("[bold green]OK[/]: every contact mailed exactly once." if ok else
                  "[bold red]MISMATCH[/]: the counts above disagree.")
    console.print(f"Live dashboard: http://127.0.0.1:{stack.ports.api}/dashboard#key={stack.api_key(TENANT)}")
    console.print("The platform keeps running: `make status`, `make down`.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
