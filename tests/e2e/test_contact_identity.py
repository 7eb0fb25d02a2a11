"""Contacts through the whole pipeline, driven by `campaignctl`: suppressions survive later
imports, one person is one contact whatever the case of the address, internationalised
addresses are mailed (or failed with a clear reason)."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from projections.queries import campaign_progress
from services.cli.main import app
from services.smtp_sink import SinkConfig, SmtpSink, header
from tests.service_process import ServiceProcess, service_env

pytestmark = pytest.mark.e2e
SERVICES = ("command_handler", "hydrator", "sender", "projector", "completion")


def cli(settings, *args: str) -> str:
    result = CliRunner().invoke(app, list(args), env=service_env(settings))
    assert result.exit_code == 0, result.output
    return result.stdout


def csv_file(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def wait_for(predicate, timeout, what, procs):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for p in procs:
            assert p.proc.poll() is None, f"{p.service} died:\n{p.log_tail()}"
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def send_and_wait(settings, conn, procs, tenant: str, *lists: str) -> str:
    campaign = cli(settings, "campaign", "create", "--tenant", tenant, "--name", "N", "--subject", "Hi",
                   "--from", "news@example.com", "--text", "Hello").strip()
    cli(settings, "campaign", "send", campaign, "--tenant", tenant, *[a for x in lists for a in ("--list", x)],
        "--no-watch")
    wait_for(lambda: (p := campaign_progress(conn, campaign)) and p.status == "completed", 180,
             f"{campaign} completed", procs)
    return campaign


def projected(conn, tenant: str, count: int):
    rows = conn.execute("SELECT count(*) FROM contact_profiles WHERE tenant_id = %s", (tenant,)).fetchone()
    return rows is not None and rows[0] >= count


def test_blocklist_survives_a_later_upsert_import(settings, tmp_path):
    tenant = f"t{uuid.uuid4().hex[:8]}"
    with SmtpSink(SinkConfig(port=0)) as sink:
        run = replace(settings, smtp_port=sink.port)
        procs = [ServiceProcess(name, run).start() for name in SERVICES]
        try:
            with psycopg.connect(settings.database_url, autocommit=True) as conn:
                cli(settings, "contacts", "import", csv_file(tmp_path / "block.csv", "email\nblocked@example.com\n"),
                    "--tenant", tenant, "--mode", "blocklist")
                wait_for(lambda: projected(conn, tenant, 1), 60, "blocklist projected", procs)
                time.sleep(2)
                cli(settings, "contacts", "import",
                    csv_file(tmp_path / "news.csv", "email,first_name\nblocked@example.com,B\nfine@example.com,F\n"),
                    "--tenant", tenant, "--list", "news")
                wait_for(lambda: projected(conn, tenant, 2), 60, "upsert projected", procs)
                time.sleep(2)
                campaign = send_and_wait(settings, conn, procs, tenant, "news")
                rows = dict(conn.execute(
                    "SELECT email, coalesce(reason, status) FROM campaign_recipients WHERE campaign_id = %s",
                    (campaign,)).fetchall())
                suppressed = conn.execute(
                    "SELECT suppressed_reason FROM contacts WHERE tenant_id = %s AND suppressed_reason IS NOT NULL",
                    (tenant,)).fetchall()
        finally:
            for p in procs:
                p.stop()
        mails = [m for m in sink.messages if header(m, "X-Campaign-ID") == campaign]
    assert rows == {"blocked@example.com": "suppressed:manual_blocklist", "fine@example.com": "sent"}
    assert suppressed == [("manual_blocklist",)]
    assert [m["rcpt_tos"] for m in mails] == [["fine@example.com"]]
