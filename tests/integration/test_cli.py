"""campaignctl against the real broker and database: contact import, commands, watch and show."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import psycopg
import pytest
from rich.console import Console
from typer.testing import CliRunner

from schemas.commands import CreateCampaign, SendCampaign
from schemas.contacts import ContactUpserted, contact_id_for, contact_key
from services.cli.contacts_import import import_contacts
from services.cli.main import app
from services.cli.progress import CommandWasRejected, watch_campaign
from services.cli.publishing import TopicUnavailable, publish_command
from services.common.topics import COMMANDS, CONTACTS
from tests.kafka_io import read_topic
from tests.service_process import service_env

pytestmark = pytest.mark.integration

ROWS = 2_000
# Line numbers (header = 1) of the bad rows written by `contacts_csv`, with their reasons.
BAD_LINES = {
    101: "not a valid e-mail address",
    502: "empty email",
    903: "expected 4 fields, found 3",
    1304: "longer than 1000 characters",
    1705: "not valid UTF-8",
}


def contacts_csv(path: Path) -> Path:
    """ROWS data rows (lines 2..ROWS+1), of which the lines in BAD_LINES are bad."""
    with open(path, "wb") as f:
        f.write(b"email,first_name,city,lists\n")
        for line in range(2, ROWS + 2):
            email, name, city = f"user{line}@Example.com", f"User {line}", "Zürich"
            if line == 101:
                email = "no-at-sign.example.com"
            elif line == 502:
                email = "  "
            elif line == 1304:
                city = "x" * 1001
            if line == 903:
                f.write(f"{email},{name},{city}\n".encode())
            elif line == 1705:
                f.write(f"{email},{name},".encode() + b"Z\xfcrich,news\n")
            else:
                f.write(f'{email},"{name}",{city},news;vip\n'.encode())
    return path


def expected_ids(tenant: str) -> set[str]:
    return {
        contact_id_for(tenant, f"user{line}@example.com")
        for line in range(2, ROWS + 2)
        if line not in BAD_LINES
    }


def test_import_produces_one_upsert_per_good_row_and_reimport_is_idempotent(settings, tmp_path):
    path = contacts_csv(tmp_path / "contacts.csv")
    progress: list[tuple[int, int]] = []
    report = import_contacts(path, tenant_id="acme", list_id="all", settings=settings,
                             on_progress=lambda done, total: progress.append((done, total)))
    assert report.imported == ROWS - len(BAD_LINES)
    assert report.rejected_count == len(BAD_LINES)
    assert [r.line for r in report.rejected] == sorted(BAD_LINES)
    for row in report.rejected:
        assert BAD_LINES[row.line] in row.reason
    assert progress[-1] == (path.stat().st_size, path.stat().st_size)

    records = read_topic(settings, CONTACTS, until=report.imported)
    assert len(records) == ROWS - len(BAD_LINES)
    first_ids = [m.envelope.aggregate_id for m in records]
    assert set(first_ids) == expected_ids("acme")
    sample = next(m for m in records if m.payload.email == "user2@example.com")
    assert sample.payload == ContactUpserted(
        contact_id=contact_id_for("acme", "user2@example.com"), email="user2@example.com",
        first_name="User 2", attributes={"city": "Zürich"}, lists=["all", "news", "vip"],
    )
    assert sample.envelope.tenant_id == "acme"

    again = import_contacts(path, tenant_id="acme", list_id="all", settings=settings)
    assert again.imported == report.imported
    records = read_topic(settings, CONTACTS, until=2 * report.imported)
    assert len(records) == 2 * report.imported
    # Both imports upserted exactly the same contacts: every contact id twice, no other id.
    assert Counter(m.envelope.aggregate_id for m in records) == Counter(first_ids * 2)
    # Envelopes are new facts (new ids), the contacts are the same ones (same ids and keys).
    assert len({m.envelope.id for m in records}) == len(records)


def test_records_are_keyed_by_tenant_and_contact(settings, tmp_path):
    from confluent_kafka import Consumer

    from services.common.topics import topic_name

    path = tmp_path / "one.csv"
    path.write_text("email\nsolo@example.com\n")
    assert import_contacts(path, tenant_id="acme", list_id=None, settings=settings).imported == 1
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": str(uuid.uuid4()),
                         "auto.offset.reset": "earliest"})
    consumer.subscribe([topic_name(CONTACTS, settings)])
    try:
        deadline = time.monotonic() + 30
        msg = None
        while msg is None and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error():
                msg = None
    finally:
        consumer.close()
    assert msg is not None
    assert msg.key() == contact_key("acme", contact_id_for("acme", "solo@example.com"))


# --- the CLI ----------------------------------------------------------------------------------


def run(settings, *args: str):
    return CliRunner().invoke(app, list(args), env=service_env(settings))


def test_cli_import_prints_the_report_and_exits_0_with_bad_rows(settings, tmp_path):
    path = contacts_csv(tmp_path / "contacts.csv")
    result = run(settings, "contacts", "import", str(path), "--tenant", "acme", "--list", "all")
    assert result.exit_code == 0, result.output
    assert f"imported {ROWS - len(BAD_LINES):,} contacts" in result.stdout
    assert f"rejected {len(BAD_LINES)} rows" in result.stdout
    for line in BAD_LINES:
        assert f"line {line}:" in result.stdout
    assert len(read_topic(settings, CONTACTS, until=ROWS - len(BAD_LINES))) == ROWS - len(BAD_LINES)


def test_cli_import_without_email_column_exits_1_with_the_reason_and_no_traceback(settings, tmp_path):
    path = tmp_path / "no-email.csv"
    path.write_text("name,city\nAnn,Paris\n")
    script = Path(sys.executable).with_name("campaignctl")
    proc = subprocess.run(
        [str(script), "contacts", "import", str(path), "--tenant", "acme"],
        env=service_env(settings, COLUMNS="200"), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert "no 'email' column" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_import_of_a_missing_file_exits_1(settings, tmp_path):
    result = run(settings, "contacts", "import", str(tmp_path / "absent.csv"), "--tenant", "acme")
    assert result.exit_code == 1
    assert "No such file" in result.stderr and "absent.csv" in result.stderr


def test_cli_create_with_a_bad_from_address_exits_2_with_a_clear_message(settings):
    result = run(settings, "campaign", "create", "--tenant", "acme", "--name", "N", "--subject", "S",
                 "--from", "not an address", "--text", "hi")
    assert result.exit_code == 2
    assert "from_address" in result.stderr and "not a valid e-mail address" in result.stderr
    assert read_topic(settings, COMMANDS, timeout=3, idle=1) == []


def test_cli_create_publishes_the_command_and_prints_the_id(settings, tmp_path):
    html = tmp_path / "body.html"
    html.write_text("<p>Hello</p>")
    result = run(settings, "campaign", "create", "--tenant", "acme", "--name", "Spring", "--subject", "Hi",
                 "--from", "news@Example.com", "--text", "Hello", "--html-file", str(html))
    assert result.exit_code == 0, result.output
    campaign_id = result.stdout.strip()
    assert campaign_id.startswith("cmp-") and len(campaign_id) == len("cmp-") + 12
    [command] = read_topic(settings, COMMANDS, until=1)
    assert command.envelope.aggregate_id == campaign_id and command.envelope.tenant_id == "acme"
    assert command.payload == CreateCampaign(name="Spring", subject="Hi", from_address="news@example.com",
                                             body_text="Hello", body_html="<p>Hello</p>")


def test_cli_send_without_watch_publishes_send_campaign(settings):
    result = run(settings, "campaign", "send", "cmp-1", "--tenant", "acme", "--list", "l1", "--list", "l2",
                 "--contact", "c1", "--no-watch")
    assert result.exit_code == 0, result.output
    [command] = read_topic(settings, COMMANDS, until=1)
    assert command.payload == SendCampaign(list_ids=["l1", "l2"], contact_ids=["c1"])
    assert str(command.envelope.id) in result.stdout


def test_cli_show_of_an_unknown_campaign_exits_1(settings):
    result = run(settings, "campaign", "show", f"cmp-{uuid.uuid4().hex[:12]}", "--tenant", "acme")
    assert result.exit_code == 1
    assert "not found" in result.stderr


# --- publishing and watching --------------------------------------------------------------------


def test_publish_fails_fast_when_the_topic_does_not_exist(settings):
    missing = settings.replace(topic_prefix=f"absent{uuid.uuid4().hex[:6]}.")
    started = time.monotonic()
    with pytest.raises(TopicUnavailable, match="does not exist"):
        publish_command(missing, SendCampaign(list_ids=["l"]), tenant_id="acme", campaign_id="c1")
    assert time.monotonic() - started < 15


@pytest.fixture
def read_model(settings):
    """Rows written straight into the read model (as the projector would), removed afterwards."""
    campaign_id = f"cmp-{uuid.uuid4().hex[:12]}"
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        yield conn, campaign_id
        conn.execute("DELETE FROM campaigns WHERE campaign_id = %s", (campaign_id,))
        conn.execute("DELETE FROM command_rejections WHERE campaign_id = %s", (campaign_id,))


def test_watch_returns_on_completion_and_show_prints_the_table(settings, read_model):
    conn, campaign_id = read_model
    conn.execute(
        "INSERT INTO campaigns (tenant_id, campaign_id, name, status, total, queued, sent, failed,"
        " started_at, completed_at) VALUES ('acme', %s, 'Spring', 'completed', 10, 10, 9, 1,"
        " now() - interval '2 seconds', now())",
        (campaign_id,),
    )
    final = watch_campaign(settings, campaign_id, "acme", timeout=10, console=Console(quiet=True))
    assert (final.status, final.total, final.sent, final.failed) == ("completed", 10, 9, 1)

    result = run(settings, "campaign", "watch", campaign_id, "--tenant", "acme", "--timeout", "10")
    assert result.exit_code == 0, result.output
    assert "sent" in result.stdout and "rate" in result.stdout

    result = run(settings, "campaign", "show", campaign_id, "--tenant", "acme")
    assert result.exit_code == 0, result.output
    assert "Spring" in result.stdout and "completed" in result.stdout
    # Another tenant does not see it.
    assert run(settings, "campaign", "show", campaign_id, "--tenant", "other").exit_code == 1


def test_watch_stops_on_a_rejection_of_the_watched_command(settings, read_model):
    conn, campaign_id = read_model
    command_id = uuid.uuid4()
    conn.execute(
        "INSERT INTO command_rejections (event_id, tenant_id, campaign_id, command_id, command_type, reason,"
        " occurred_at, correlation_id) VALUES (%s, 'acme', %s, %s, 'SendCampaign', 'campaign is sending,"
        " not draft', now(), %s)",
        (uuid.uuid4(), campaign_id, command_id, command_id),
    )
    with pytest.raises(CommandWasRejected, match="not draft"):
        watch_campaign(settings, campaign_id, "acme", timeout=10, console=Console(quiet=True),
                       command_id=command_id)


def test_watch_times_out_on_a_campaign_that_never_appears(settings):
    with pytest.raises(TimeoutError, match="not projected yet"):
        watch_campaign(settings, f"cmp-{uuid.uuid4().hex[:12]}", "acme", timeout=0.5,
                       console=Console(quiet=True))


def test_cli_import_progress_accepts_a_large_file_quickly(settings, tmp_path):
    """Not a benchmark: a floor that catches an accidental slow path (e.g. pydantic per row)."""
    path = tmp_path / "big.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["email", "first_name", "last_name", "plan"])
        for i in range(50_000):
            writer.writerow([f"u{i}@example.com", f"F{i}", f"L{i}", "pro"])
    report = import_contacts(path, tenant_id="acme", list_id="all", settings=settings)
    assert report.imported == 50_000 and report.rejected_count == 0
    assert report.rows_per_second > 10_000, report


def test_cli_watch_reports_a_rejection_once_in_red_and_exits_1(settings, read_model):
    conn, campaign_id = read_model
    conn.execute(
        "INSERT INTO command_rejections (event_id, tenant_id, campaign_id, command_id, command_type, reason,"
        " occurred_at, correlation_id) VALUES (%s, 'acme', %s, NULL, 'CancelCampaign',"
        " 'unknown campaign [x]', now(), %s)",
        (uuid.uuid4(), campaign_id, uuid.uuid4()),
    )
    result = run(settings, "campaign", "watch", campaign_id, "--tenant", "acme", "--timeout", "10")
    assert result.exit_code == 1
    assert result.output.count("unknown campaign [x]") == 1
