"""The bench campaign: N distinct contacts in one list of a fresh tenant, imported through the
CLI's importer, created and sent through the command topic, watched in the read model.
"""

from __future__ import annotations

import csv
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.raw_smtp import RawContact
from projections.queries import CampaignProgress, campaign_progress
from schemas.commands import CreateCampaign, SendCampaign
from schemas.contacts import contact_id_for
from schemas.events import MessageTemplate
from services.cli.contacts_import import ImportReport, import_contacts
from services.cli.progress import find_rejection
from services.cli.publishing import publish_command
from services.common.settings import Settings

# How often the read model is polled while the campaign runs (the brief's 0.1 s): the e2e
# time is known to within this, and the load is one indexed single-row read per poll.
POLL_SECONDS = 0.1
# A campaign whose read model shows no movement for this long is declared stuck (a stage is
# down or wedged), so the bench fails with a pointer to the logs instead of waiting out the
# overall timeout.
STALL_SECONDS = 120.0
# Terminal statuses of a campaign in the read model.
FINISHED = ("completed", "cancelled")
# The campaign's content, close to the demo's: a personalised subject, text and HTML bodies.
SUBJECT = 'Hello {{ first_name | "there" }}, news from {{ attr.city }}'
FROM_ADDRESS = "news@bench-example.org"
BODY_TEXT = "Hi {{ first_name }},\nthis is the benchmark newsletter from {{ attr.city }}.\n"
BODY_HTML = "<p>Hi {{ first_name }},</p><p>this is the <b>benchmark newsletter</b>.</p>"
CITIES = ("Oslo", "Lima", "Pune", "Accra")


@dataclass(frozen=True)
class BenchIds:
    """Fresh names per run, so runs never share contacts, campaigns or sink records."""

    tenant_id: str
    list_id: str
    campaign_id: str
    raw_campaign_id: str

    @classmethod
    def fresh(cls) -> BenchIds:
        tag = uuid.uuid4().hex[:6]
        return cls(f"bench-{tag}", "everyone", f"cmp-bench-{tag}", f"raw-bench-{tag}")


def template() -> MessageTemplate:
    """The template as the command handler puts it into events (same subject, from, bodies)."""
    return MessageTemplate(subject=SUBJECT, from_address=FROM_ADDRESS, body_text=BODY_TEXT,
                           body_html=BODY_HTML)


def contacts(ids: BenchIds, count: int) -> list[RawContact]:
    """`count` distinct contacts of the bench tenant (the CSV rows and the raw run's recipients)."""
    domain = f"{ids.tenant_id}.example.com"
    people = []
    for i in range(count):
        email = f"person.{i}@{domain}"
        people.append(RawContact(
            contact_id=contact_id_for(ids.tenant_id, email), email=email,
            first_name=f"Ada{i}", last_name=f"Lovelace{i}", attributes={"city": CITIES[i % 4]},
        ))
    return people


def write_csv(people: list[RawContact], path: Path) -> None:
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["email", "first_name", "last_name", "city"])
        for person in people:
            out.writerow([person.email, person.first_name, person.last_name,
                          person.attributes["city"]])


def import_people(people: list[RawContact], ids: BenchIds, settings: Settings) -> ImportReport:
    """Write `people` to a CSV file in a temporary folder and import it (`import_csv`)."""
    with tempfile.TemporaryDirectory(prefix="bench-") as folder:
        path = Path(folder) / f"{ids.tenant_id}.csv"
        write_csv(people, path)
        return import_csv(path, ids, settings)


def import_csv(path: Path, ids: BenchIds, settings: Settings) -> ImportReport:
    """Import through the CLI's importer: acknowledged by the broker when it returns."""
    return import_contacts(path, tenant_id=ids.tenant_id, list_id=ids.list_id, settings=settings,
                           on_progress=None)


@dataclass
class CampaignRun:
    """What watching the campaign observed, on this machine's clocks."""

    send_published_at: datetime  # wall clock just before SendCampaign was published
    e2e_seconds: float  # monotonic: send published -> first poll that saw 'completed'
    final: CampaignProgress
    # (wall clock after a poll returned, sent + failed it showed), one per poll.
    polls: list[tuple[datetime, int]] = field(default_factory=list)


class CampaignFailed(RuntimeError):
    """The campaign was rejected, got stuck, or did not finish in time."""


def run_campaign(
    ids: BenchIds, settings: Settings, *, recipients: int, timeout: float, console: Console
) -> CampaignRun:
    """Create and send the campaign, then poll the read model every POLL_SECONDS until it is
    completed. Raises CampaignFailed with the reason otherwise."""
    content = template()
    create = CreateCampaign(name=f"bench {recipients:,}", subject=content.subject,
                            from_address=content.from_address, body_text=content.body_text,
                            body_html=content.body_html)
    created_at = datetime.now(UTC)
    publish_command(settings, create, tenant_id=ids.tenant_id, campaign_id=ids.campaign_id)
    send_at = datetime.now(UTC)
    started = time.monotonic()
    publish_command(settings, SendCampaign(list_ids=[ids.list_id]),
                                 tenant_id=ids.tenant_id, campaign_id=ids.campaign_id)
    polls: list[tuple[datetime, int]] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with psycopg.connect(settings.database_url, autocommit=True) as conn, \
            Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(f"{ids.campaign_id} waiting", total=recipients)
        last_done, last_change = -1, started
        while True:
            progress = campaign_progress(conn, ids.campaign_id, ids.tenant_id)
            now = time.monotonic()
            if progress is not None:
                done = progress.sent + progress.failed
                polls.append((datetime.now(UTC), done))
                bar.update(task, description=f"{ids.campaign_id} {progress.status}", completed=done)
                if progress.status in FINISHED:
                    if progress.status != "completed":
                        raise CampaignFailed(f"campaign ended {progress.status}, not completed")
                    return CampaignRun(send_at, now - started, progress, polls)
                if done != last_done:
                    last_done, last_change = done, now
            # Any rejection for this fresh campaign id since it was created is one of ours.
            rejection = find_rejection(conn, ids.tenant_id, ids.campaign_id, command_id=None,
                                       since=created_at)
            if rejection is not None:
                raise CampaignFailed(f"{rejection.command_type} rejected: {rejection.reason}")
            if now - last_change > STALL_SECONDS:
                state = "not in the read model" if progress is None else (
                    f"{progress.status}, total {progress.total}, queued {progress.queued},"
                    f" sent {progress.sent}, failed {progress.failed}")
                raise CampaignFailed(f"no progress for {STALL_SECONDS:g} s; campaign {state}")
            if now - started > timeout:
                raise CampaignFailed(f"not completed after {timeout:g} s")
            time.sleep(POLL_SECONDS)
