"""campaignctl's one-contact and campaign-control commands against the real broker, the
projector and PostgreSQL: what they publish, what `get` and `list` then show, and how they fail."""

from __future__ import annotations

import json
import uuid

import pytest
from typer.testing import CliRunner

from schemas.commands import PauseCampaign, ResumeCampaign
from schemas.contacts import ContactDeleted, ContactUnsubscribed, ContactUpserted, contact_id_for
from services.cli.main import app
from services.common.topics import COMMANDS, CONTACTS
from tests.integration.test_projector import drain
from tests.kafka_io import read_topic
from tests.service_process import service_env

pytestmark = pytest.mark.integration


def run(settings, *args: str, **env: str):
    return CliRunner().invoke(app, list(args), env={**service_env(settings), **env})


def test_a_contact_is_added_shown_unsubscribed_and_deleted(settings) -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    added = run(settings, "contacts", "add", "Ada@Example.COM", "--tenant", tenant,
                "--first-name", "Ada", "--attr", "city=Oslo", "--list", "news")
    assert added.exit_code == 0, added.output
    contact_id = contact_id_for(tenant, "Ada@example.com")
    assert contact_id in added.stdout
    [upsert] = read_topic(settings, CONTACTS, until=1)
    assert upsert.payload == ContactUpserted(contact_id=contact_id, email="Ada@example.com",
                                             first_name="Ada", attributes={"city": "Oslo"},
                                             lists=["news"])
    drain(settings)
    shown = run(settings, "contacts", "get", "ada@example.com", "--tenant", tenant, "--json")
    assert shown.exit_code == 0, shown.output
    view = json.loads(shown.stdout)
    assert (view["contact_id"], view["lists"], view["attributes"]) == (
        contact_id, ["news"], {"city": "Oslo"})
    assert not view["globally_unsubscribed"] and not view["deleted"]
    # Another tenant does not see it.
    assert run(settings, "contacts", "get", contact_id, "--tenant", "other").exit_code == 1

    assert run(settings, "contacts", "unsubscribe", contact_id, "--tenant", tenant,
               "--reason", "asked by phone").exit_code == 0
    assert run(settings, "contacts", "delete", "ADA@example.com", "--tenant", tenant).exit_code == 0
    facts = [m.payload for m in read_topic(settings, CONTACTS, until=3)[1:]]
    assert facts == [ContactUnsubscribed(contact_id=contact_id, reason="asked by phone"),
                     ContactDeleted(contact_id=contact_id)]
    drain(settings)
    view = json.loads(run(settings, "contacts", "get", contact_id, "--tenant", tenant,
                          "--json").stdout)
    assert view["globally_unsubscribed"] and view["deleted"]


def test_bad_contact_input_exits_2_with_the_reason(settings) -> None:
    result = run(settings, "contacts", "add", "not-an-address", "--tenant", "acme")
    assert result.exit_code == 2 and "error" in result.stderr
    result = run(settings, "contacts", "add", "a@example.com", "--tenant", "acme", "--attr", "nope")
    assert result.exit_code == 2 and "--attr takes name=value" in result.stderr
    assert "Traceback" not in result.output


def test_pause_and_resume_publish_their_commands(settings) -> None:
    paused = run(settings, "campaign", "pause", "cmp-1", "--tenant", "acme", "--reason", "typo")
    assert paused.exit_code == 0, paused.output
    assert run(settings, "campaign", "resume", "cmp-1", "--tenant", "acme").exit_code == 0
    commands = read_topic(settings, COMMANDS, until=2)
    assert [c.payload for c in commands] == [PauseCampaign(reason="typo"), ResumeCampaign()]
    assert str(commands[0].envelope.id) in paused.stdout


def test_list_shows_a_tenants_campaigns_filtered_by_status(settings) -> None:
    import psycopg

    tenant = f"t{uuid.uuid4().hex[:8]}"
    ids = [f"cmp-{uuid.uuid4().hex[:12]}" for _ in range(3)]
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        for campaign_id, status in zip(ids, ("draft", "completed", "completed"), strict=True):
            conn.execute("INSERT INTO campaigns (tenant_id, campaign_id, name, status)"
                         " VALUES (%s, %s, 'Spring', %s)", (tenant, campaign_id, status))
        try:
            listed = run(settings, "campaign", "list", "--tenant", tenant, "--status", "completed",
                         "--json")
            assert listed.exit_code == 0, listed.output
            rows = [json.loads(line) for line in listed.stdout.splitlines()]
            assert sorted(r["campaign_id"] for r in rows) == sorted(ids[1:])
            table = run(settings, "campaign", "list", "--tenant", tenant)
            assert all(campaign_id in table.stdout for campaign_id in ids)
            assert run(settings, "campaign", "list", "--tenant", "other", "--json").stdout == ""
        finally:
            conn.execute("DELETE FROM campaigns WHERE tenant_id = %s", (tenant,))
    assert run(settings, "campaign", "list", "--tenant", tenant, "--status", "bogus").exit_code == 2
    assert run(settings, "campaign", "list", "--tenant", tenant, "--limit", "0").exit_code == 2


def test_with_the_platform_away_every_command_exits_1_without_a_traceback(settings) -> None:
    away = {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9", "DATABASE_URL":
            "postgresql://nobody@127.0.0.1:9/none"}
    for args in (["contacts", "add", "a@example.com", "--tenant", "acme"],
                 ["contacts", "get", "c1", "--tenant", "acme"],
                 ["campaign", "list", "--tenant", "acme"],
                 ["campaign", "pause", "cmp-1", "--tenant", "acme"]):
        result = run(settings, *args, **away)
        assert result.exit_code == 1, (args, result.output)
        assert "error" in result.stderr and "Traceback" not in result.output


def test_a_bad_setting_exits_2_naming_its_variable(settings) -> None:
    result = run(settings, "campaign", "list", "--tenant", "acme", SMTP_PORT="smtp")
    assert result.exit_code == 2
    assert "SMTP_PORT" in result.stderr
