"""`campaignctl lists ...` and `campaignctl campaign duplicate` against the real broker, the
command handler, the projector and PostgreSQL: outcomes, rejections and exit codes."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest

from projections.projector import projector_for
from services.command_handler.handler import CommandHandler
from tests.integration.test_cli_parity import run
from tests.integration.test_lists_api import running

pytestmark = pytest.mark.integration


@pytest.fixture
def pipeline(settings) -> Iterator[None]:
    """The command handler and the projector on this test's topics."""
    workers = [running(CommandHandler(settings).run),
               running(projector_for(settings, poll_timeout=0.2).run)]
    yield
    for stop, _ in workers:
        stop.set()
    for _, thread in workers:
        thread.join(30)
        assert not thread.is_alive()


def test_lists_are_created_renamed_shown_and_deleted(settings, pipeline) -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    created = run(settings, "lists", "create", "news", "--tenant", tenant, "--name", "News")
    assert created.exit_code == 0, created.output
    assert "created news" in created.stdout
    again = run(settings, "lists", "create", "news", "--tenant", tenant, "--name", "News")
    assert again.exit_code == 1 and "already exists" in again.stderr
    assert run(settings, "lists", "rename", "news", "--tenant", tenant,
               "--name", "Weekly").exit_code == 0
    shown = run(settings, "lists", "show", "news", "--tenant", tenant, "--json")
    assert shown.exit_code == 0, shown.output
    assert (json.loads(shown.stdout)["name"], json.loads(shown.stdout)["members"]) == ("Weekly", 0)
    listed = run(settings, "lists", "list", "--tenant", tenant)
    assert listed.exit_code == 0 and "Weekly" in listed.stdout
    # Another tenant sees nothing and cannot delete it.
    assert run(settings, "lists", "show", "news", "--tenant", "other").exit_code == 1
    foreign = run(settings, "lists", "delete", "news", "--tenant", "other")
    assert foreign.exit_code == 1 and "unknown list" in foreign.stderr
    assert run(settings, "lists", "delete", "news", "--tenant", tenant).exit_code == 0
    gone = run(settings, "lists", "show", "news", "--tenant", tenant)
    assert gone.exit_code == 1 and "not found" in gone.stderr
    reused = run(settings, "lists", "create", "news", "--tenant", tenant, "--name", "News")
    assert reused.exit_code == 1 and "not reused" in reused.stderr


def test_a_campaign_is_duplicated_from_the_cli(settings, pipeline) -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    source = f"cmp-{uuid.uuid4().hex[:8]}"
    created = run(settings, "campaign", "create", "--tenant", tenant, "--id", source,
                  "--name", "Spring", "--subject", "Hi", "--from", "news@example.com",
                  "--text", "Hello")
    assert created.exit_code == 0, created.output
    # The source must be decided first: its create and the duplicate are on two partitions.
    deadline = time.monotonic() + 60
    while source not in run(settings, "campaign", "list", "--tenant", tenant).stdout:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    copy_id = f"copy-{uuid.uuid4().hex[:8]}"  # campaign ids are global in the read models
    copy = run(settings, "campaign", "duplicate", source, "--tenant", tenant,
               "--new-id", copy_id, "--name", "Autumn")
    assert copy.exit_code == 0, copy.output
    assert f"created {copy_id}" in copy.stdout
    listed = run(settings, "campaign", "list", "--tenant", tenant, "--json")
    names = {json.loads(line)["campaign_id"]: json.loads(line)["name"]
             for line in listed.stdout.splitlines()}
    assert names[copy_id] == "Autumn"
    taken = run(settings, "campaign", "duplicate", source, "--tenant", tenant, "--new-id", copy_id)
    assert taken.exit_code == 1 and "already exists" in taken.stderr
    unknown = run(settings, "campaign", "duplicate", "nope", "--tenant", tenant)
    assert unknown.exit_code == 1 and "unknown campaign" in unknown.stderr


def test_bad_input_exits_2_and_an_absent_platform_exits_1(settings) -> None:
    bad = run(settings, "lists", "create", "bad id", "--tenant", "acme", "--name", "x")
    assert bad.exit_code == 2 and "list_id" in bad.stderr
    assert run(settings, "lists", "create", "ok", "--tenant", "acme", "--name", "").exit_code == 2
    away = {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9",
            "DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none"}
    for args in (["lists", "list", "--tenant", "acme"], ["lists", "show", "x", "--tenant", "acme"],
                 ["lists", "delete", "x", "--tenant", "acme"],
                 ["campaign", "duplicate", "c1", "--tenant", "acme"]):
        result = run(settings, *args, **away)
        assert result.exit_code == 1, (args, result.output)
        assert "error" in result.stderr and "Traceback" not in result.output
