"""Chaos: PostgreSQL stopped with `pg_ctl stop -m immediate` mid-campaign, started 5 s later.

The sender, the completion tracker, the projector and the read API run as processes; the send ledger lives on a
PostgreSQL server of the test's own (the shared one is never touched). While a campaign is
being mailed, the server is stopped the hard way (every backend killed, connections cut) and
started again 5 s later. While it is away the API answers 503 with a reason, never hangs.
Then, exactly: every service is still alive (each waited the outage out), the read model
(over the API too) counts every recipient sent,
the campaign completes with exactly one CampaignCompleted, nobody is lost, duplicates in the
sink never exceed the ambiguous outcomes of the ledger, and every service stops on SIGTERM
within STOP_BOUND_SECONDS with exit code 0.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from schemas.events import CampaignCompleted
from services.smtp_sink import SinkConfig, SmtpSink
from tests.chaos.fault_kit import (
    RECIPIENTS_N,
    STOP_BOUND_SECONDS,
    TENANT,
    Campaign,
    EventWatch,
    PrivatePostgres,
    Services,
    check_delivery,
    free_port,
    isolated,
    sink_latency_ms,
    wait_for,
)

API_KEY = "chaos-database-key"


def api_get(url: str) -> tuple[int, str, dict[str, Any]]:
    """(status, body, JSON body or {}) of a GET, bounded at 10 s: a hung request fails here."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {API_KEY}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - loopback
            body = answer.read().decode()
            return answer.status, body, json.loads(body)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), {}
    except (urllib.error.URLError, ConnectionError) as exc:
        return 0, str(exc), {}


pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]

OUTAGE_SECONDS = 5.0
# After the database takes connections again: the rest of the campaign mailed and completed.
COMPLETION_BOUND_SECONDS = 60.0


@pytest.fixture
def private_postgres(server_folder):
    postgres = PrivatePostgres(server_folder / "platform")
    postgres.start()
    try:
        yield postgres
    finally:
        postgres.stop()


def test_database_immediate_stop_and_restart_mid_campaign(private_postgres, platform_settings,
                                                          tmp_path):
    settings = isolated(platform_settings.replace(database_url=private_postgres.url,
                                state_dir=tmp_path / "state"))
    campaign = Campaign(RECIPIENTS_N)
    with SmtpSink(SinkConfig(port=0, latency_ms=sink_latency_ms(campaign.size))) as sink:
        settings = settings.replace(smtp_port=sink.port)
        api_port = free_port()
        services = Services(settings, tmp_path / "logs", ["completion", "sender", "projector", "api"],
                            API_PORT=str(api_port), API_KEYS=f"{TENANT}:{API_KEY}")
        api = f"http://127.0.0.1:{api_port}/campaigns/{campaign.id}"
        watch = EventWatch(settings)
        try:
            campaign.hydrate(settings)
            wait_for(lambda: campaign.mailed(sink) >= campaign.size // 3, 120,
                     "a third of the campaign mailed", services)
            private_postgres.stop_immediately()
            stopped_at = time.monotonic()
            mailed_at_stop = campaign.mailed(sink)
            during = api_get(api)
            time.sleep(OUTAGE_SECONDS)
            services.check_alive()
            boot = private_postgres.restart()
            ready_at = time.monotonic()
            print(f"\ndatabase stopped at {mailed_at_stop}/{campaign.size} mailed; back after "
                  f"{ready_at - stopped_at:.1f}s (start {boot:.1f}s)")
            done = wait_for(lambda: watch.of_type(CampaignCompleted, campaign.id),
                            COMPLETION_BOUND_SECONDS, "CampaignCompleted after the restart",
                            services)
            print(f"CampaignCompleted {done[0].at - ready_at:.1f}s after the restart")
            time.sleep(3.0)  # a second completion must be seen, not missed
            completions = watch.of_type(CampaignCompleted, campaign.id)
            assert len(completions) == 1, f"{len(completions)} CampaignCompleted"
            payload = completions[0].message.payload
            assert isinstance(payload, CampaignCompleted)
            assert (payload.total, payload.sent, payload.failed) == (campaign.size, campaign.size, 0)
            delivery = check_delivery(campaign, [sink], settings.database_url)
            print(f"delivery: {delivery}")
            print(f"API while the database was away: {during}")
            assert during[0] == 503 and "database" in during[1].lower(), during
            answers: list[tuple[int, str, dict[str, Any]]] = []

            def read_model_complete() -> tuple[int, str, dict[str, Any]] | None:
                answers.append(api_get(api))
                code, _, body = answers[-1]
                return answers[-1] if code == 200 and body.get("sent") == campaign.size else None

            try:
                read = wait_for(read_model_complete, COMPLETION_BOUND_SECONDS, "the read model over the API",
                                services, poll=0.5)
            except AssertionError as exc:
                raise AssertionError(f"{exc}; last answer {answers[-1]}\nprojector:\n"
                                     f"{services.stacks('projector')}\napi:\n{services.logs('api', 10)}") from None
            assert read[2]["total"] == campaign.size and read[2]["status"] == "completed", read
            services.check_alive()
        finally:
            watch.close()
            stopped = services.stop_all()
            print(f"stop on SIGTERM: { {n: (s.code, round(s.seconds, 1)) for n, s in stopped.items()} }")
        for name, how in stopped.items():
            assert how.code == 0 and how.seconds < STOP_BOUND_SECONDS, (
                f"{name} did not stop cleanly: {how}\n{services.logs(name)}")
