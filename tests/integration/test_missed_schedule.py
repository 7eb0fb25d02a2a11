"""A schedule found late, through the public interfaces: the HTTP API and campaignctl.

The real command handler (its clock finds a ScheduleCampaign whose send_at is two hours past
its 60 s grace, as if the handler had been down) and the real projector run in threads on
this test's topics; the API publishes through its outbox relay. What is checked: the campaign
shows its schedule, its state and the reason it was missed; the command's outcome says so;
its event stream ends on it; a send is refused with what to do instead; a forced send fires
it; a pending schedule and a cancelled one show as such.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from projections.projector import projector_for
from services.api.app import create_app
from services.api.auth import ApiKeys
from services.cli.main import app as cli
from services.command_handler.handler import CommandHandler
from services.common.settings import Settings
from tests.integration.test_api import read_events, serving
from tests.service_process import service_env

pytestmark = pytest.mark.integration

# Long enough for the handler's clock (1 s tick) and the projector's batch after it.
OUTCOME_TIMEOUT_S = 60.0
LATE = re.compile(r"found 72\d\d s late, grace 60 s")


@pytest.fixture
def pipeline(settings: Settings) -> Iterator[Settings]:
    """The command handler and the projector, running until the test ends."""
    stop = threading.Event()
    handler, projector = CommandHandler(settings), projector_for(settings)
    threads = [threading.Thread(target=handler.run, args=(stop,), daemon=True),
               threading.Thread(target=projector.run, args=(stop,), daemon=True)]
    for thread in threads:
        thread.start()
    yield settings
    stop.set()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive()


def eventually(read: Callable[[], Any], done: Callable[[Any], bool]) -> Any:
    deadline = time.monotonic() + OUTCOME_TIMEOUT_S
    while True:
        value = read()
        if done(value):
            return value
        assert time.monotonic() < deadline, value
        time.sleep(0.2)


def has_row(table: str, field: str, value: str) -> bool:
    """Whether `campaign show`'s table has the row `field | value`."""
    return re.search(rf"│ {field}\s+│ {value}\s", table) is not None


def create_body(campaign_id: str) -> dict[str, Any]:
    return {"type": "CreateCampaign", "aggregate_id": campaign_id,
            "payload": {"name": "Spring", "subject": "Hi", "from_address": "news@example.com",
                        "body_text": "Hello"}}


def schedule_body(campaign_id: str, send_at: datetime) -> dict[str, Any]:
    return {"type": "ScheduleCampaign", "aggregate_id": campaign_id,
            "payload": {"send_at": send_at.isoformat(), "grace_seconds": 60,
                        "send": {"list_ids": ["all"]}}}


def test_a_missed_schedule_is_shown_with_its_reason_over_http(pipeline: Settings) -> None:
    tenant, key = f"t-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    auth = {"Authorization": f"Bearer {key}"}
    late, later = f"cmp-{uuid.uuid4().hex[:10]}", f"cmp-{uuid.uuid4().hex[:10]}"
    now = datetime.now(UTC)
    app = create_app(pipeline, ApiKeys([(tenant, key)]))
    with TestClient(app) as api:

        def post(body: dict[str, Any]) -> str:
            answer = api.post("/commands", json=body, headers=auth)
            assert answer.status_code == 202, answer.text
            return str(answer.json()["command_id"])

        def command(command_id: str) -> Any:
            return lambda: api.get(f"/commands/{command_id}", headers=auth).json()

        def campaign(campaign_id: str) -> Any:
            return lambda: api.get(f"/campaigns/{campaign_id}", headers=auth).json()

        post(create_body(late))
        post(create_body(later))
        scheduled = post(schedule_body(late, now - timedelta(hours=2)))
        pending = post(schedule_body(later, now + timedelta(hours=1)))

        # The command's outcome: accepted, then its schedule missed, with the reason.
        outcome = eventually(command(scheduled),
                             lambda s: (s.get("schedule") or {}).get("state") == "missed")
        assert outcome["status"] == "accepted" and outcome["reason"] is None
        assert LATE.fullmatch(outcome["schedule"]["reason"]), outcome
        assert datetime.fromisoformat(outcome["schedule"]["send_at"]) == now - timedelta(hours=2)
        first, second = outcome["events"]
        assert (first["type"], first["caused_by"]) == ("CampaignScheduled", None)
        assert (second["type"], second["caused_by"]) == ("CampaignScheduleMissed", first["event_id"])

        # The campaign: back to draft, its schedule missed and why.
        shown = campaign(late)()
        assert shown["status"] == "draft"
        assert shown["schedule"]["state"] == "missed"
        assert shown["schedule"]["reason"] == outcome["schedule"]["reason"]
        assert shown["schedule"]["missed_at"] is not None
        listed = {c["campaign_id"]: c for c in api.get("/campaigns", headers=auth).json()["campaigns"]}
        assert listed[late]["schedule"] == shown["schedule"]

        # The command's event stream ends on that outcome: its last frame carries the miss.
        with serving(create_app(pipeline, ApiKeys([(tenant, key)]), relay=False)) as base, \
                httpx.Client(base_url=base, timeout=30) as http, \
                http.stream("GET", f"/commands/{scheduled}/events", headers=auth) as response:
            assert response.status_code == 200
            frames = list(read_events(response))
        assert frames[-1][1]["schedule"]["state"] == "missed"
        assert LATE.fullmatch(frames[-1][1]["schedule"]["reason"])

        # A pending schedule says so, in the command's outcome and on the campaign.
        waiting = eventually(command(pending), lambda s: s["schedule"] is not None)
        assert (waiting["status"], waiting["schedule"]["state"]) == ("accepted", "scheduled")
        assert (campaign(later)()["status"], campaign(later)()["schedule"]["state"]) == (
            "scheduled", "scheduled")

        # A send of the missed campaign is refused with what happened and what to do.
        refused = eventually(command(post({"type": "SendCampaign", "aggregate_id": late,
                                           "payload": {"list_ids": ["all"]}})),
                             lambda s: s["status"] == "rejected")
        assert "was missed" in refused["reason"] and "ForceScheduledSend" in refused["reason"]
        assert LATE.search(refused["reason"]), refused

        # Forced: it fires; the miss stays on record. Cancelled: the pending one is dropped.
        post({"type": "ForceScheduledSend", "aggregate_id": late, "payload": {}})
        post({"type": "CancelCampaign", "aggregate_id": later, "payload": {}})
        fired = eventually(campaign(late), lambda c: c["schedule"]["state"] == "fired")
        assert fired["status"] == "sending" and LATE.fullmatch(fired["schedule"]["reason"])
        dropped = eventually(campaign(later), lambda c: c["schedule"]["state"] == "cancelled")
        assert dropped["status"] == "cancelled"
        assert eventually(command(pending), lambda s: s["schedule"]["state"] == "cancelled")


def test_campaignctl_reports_a_missed_schedule_and_shows_it(pipeline: Settings) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"

    def run(*args: str) -> Any:
        return CliRunner().invoke(cli, list(args), env=service_env(pipeline, COLUMNS="200"))

    late, later = f"cmp-{uuid.uuid4().hex[:10]}", f"cmp-{uuid.uuid4().hex[:10]}"
    for campaign_id in (late, later):
        created = run("campaign", "create", "--tenant", tenant, "--id", campaign_id, "--name", "N",
                      "--subject", "S", "--from", "news@example.com", "--text", "Hi")
        assert created.exit_code == 0, created.output
    two_hours_ago = (datetime.now(UTC) - timedelta(hours=2)).isoformat()

    # The outcome of `campaign schedule`: missed, with the reason and what sends it; exit 1.
    missed = run("campaign", "schedule", late, "--tenant", tenant, "--at", two_hours_ago,
                 "--grace", "60", "--list", "all", "--timeout", str(OUTCOME_TIMEOUT_S))
    assert missed.exit_code == 1, missed.output
    assert LATE.search(missed.stderr) and "missed" in missed.stderr, missed.output
    assert f"campaignctl campaign force-send {late}" in missed.stderr
    assert "Traceback" not in missed.output

    # `campaign show`: the schedule, its state and the reason.
    shown = run("campaign", "show", late, "--tenant", tenant)
    assert shown.exit_code == 0, shown.output
    assert has_row(shown.stdout, "schedule", "missed"), shown.stdout
    assert "scheduled for" in shown.stdout and LATE.search(shown.stdout)
    assert has_row(shown.stdout, "status", "draft")

    # `campaign watch` does not wait forever for a campaign that will not send: exit 1.
    watched = run("campaign", "watch", late, "--tenant", tenant, "--timeout", "20")
    assert watched.exit_code == 1, watched.output
    assert LATE.search(watched.stderr), watched.output

    # A schedule in the future is recorded: exit 0 with when.
    pending = run("campaign", "schedule", later, "--tenant", tenant, "--list", "all",
                  "--at", (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
                  "--timeout", str(OUTCOME_TIMEOUT_S))
    assert pending.exit_code == 0, pending.output
    assert f"scheduled: {later} sends at" in pending.stdout
    assert has_row(run("campaign", "show", later, "--tenant", tenant).stdout, "schedule", "scheduled")

    # A naive time is invalid input: exit 2, nothing published.
    naive = run("campaign", "schedule", later, "--tenant", tenant, "--list", "all",
                "--at", "2030-03-01T09:00:00")
    assert naive.exit_code == 2 and "send_at" in naive.stderr, naive.output

    # force-send fires the missed one; show then says fired and keeps the reason.
    forced = run("campaign", "force-send", late, "--tenant", tenant, "--no-watch")
    assert forced.exit_code == 0, forced.output
    fired = eventually(lambda: run("campaign", "show", late, "--tenant", tenant).stdout,
                       lambda out: has_row(out, "schedule", "fired"))
    assert has_row(fired, "status", "sending") and LATE.search(fired)
