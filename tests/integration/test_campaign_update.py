"""Editing a draft through `campaignctl campaign update`, with the real command handler and
projector running on this test's topics: the edit is accepted and shown, a send takes the
edited content, and an edit once sending started is refused with the reason (exit 1)."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest
from typer.testing import CliRunner

from schemas.events import CampaignSendRequested, CampaignUpdated
from services.cli.main import app
from services.common.settings import Settings
from services.common.topics import EVENTS
from tests.integration.test_missed_schedule import pipeline  # noqa: F401 (fixture)
from tests.kafka_io import read_topic
from tests.service_process import service_env

pytestmark = pytest.mark.integration


def run(settings: Settings, *args: str):
    return CliRunner().invoke(app, list(args), env=service_env(settings))


def shown(settings: Settings, tenant: str, campaign_id: str) -> dict[str, object]:
    """`campaign list`'s row, with the subject from the read model (which it does not print)."""
    listed = run(settings, "campaign", "list", "--tenant", tenant, "--json")
    assert listed.exit_code == 0, listed.output
    [row] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert row["campaign_id"] == campaign_id
    with psycopg.connect(settings.database_url) as conn:
        [(row["subject"],)] = conn.execute("SELECT subject FROM campaigns WHERE campaign_id = %s",
                                           (campaign_id,)).fetchall()
    return row


def test_a_draft_is_edited_then_sent_with_its_new_content(pipeline: Settings) -> None:  # noqa: F811
    settings, tenant = pipeline, f"t{uuid.uuid4().hex[:8]}"
    campaign_id = f"cmp-{uuid.uuid4().hex[:12]}"
    created = run(settings, "campaign", "create", "--tenant", tenant, "--id", campaign_id,
                  "--name", "Spring", "--subject", "Hello", "--from", "news@example.com",
                  "--text", "Hi")
    assert created.exit_code == 0, created.output

    edited = run(settings, "campaign", "update", campaign_id, "--tenant", tenant,
                 "--name", "Summer", "--subject", "Hello again", "--html", "<p>Hi</p>",
                 "--track-clicks", "--timeout", "60")
    assert edited.exit_code == 0, edited.output
    assert f"updated {campaign_id}" in edited.stdout
    row = shown(settings, tenant, campaign_id)
    assert (row["name"], row["subject"], row["status"]) == ("Summer", "Hello again", "draft")

    sent = run(settings, "campaign", "send", campaign_id, "--tenant", tenant,
               "--contact", "k1", "--no-watch")
    assert sent.exit_code == 0, sent.output
    refused = run(settings, "campaign", "update", campaign_id, "--tenant", tenant,
                  "--subject", "Too late", "--timeout", "60")
    assert refused.exit_code == 1, refused.output
    assert "fixed once sending starts" in refused.stderr and "Traceback" not in refused.output

    events = [m.payload for m in read_topic(settings, EVENTS, until=3)]
    [update] = [e for e in events if isinstance(e, CampaignUpdated)]
    [send] = [e for e in events if isinstance(e, CampaignSendRequested)]
    assert update.track_clicks and not update.track_opens
    assert send.template == update.template and send.template.track_clicks
    assert (send.template.subject, send.template.body_text, send.template.body_html) == (
        "Hello again", "Hi", "<p>Hi</p>")
    assert shown(settings, tenant, campaign_id)["subject"] == "Hello again"


def test_an_update_without_changes_or_with_two_bodies_exits_2(settings: Settings, tmp_path) -> None:
    body = tmp_path / "body.txt"
    body.write_text("Hi")
    for args in (["--tenant", "acme"],
                 ["--tenant", "acme", "--text", "Hi", "--text-file", str(body)],
                 ["--tenant", "acme", "--from", "not-an-address"]):
        result = run(settings, "campaign", "update", "cmp-1", *args)
        assert result.exit_code == 2, (args, result.output)
        assert "error" in result.stderr and "Traceback" not in result.output
