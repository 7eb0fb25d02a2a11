"""Chaos: the SMTP relay (the project's sink) restarted between two campaigns.

The sender keeps its SMTP connections open between campaigns. The relay is stopped (every
connection closed) and started again on the same port; then a second campaign is sent. Its
recipients must not pay for the dead connections: none counted ambiguous (the relay never saw
a message on them), none deferred (a connection found dead before MAIL is replaced, and the
mail goes out on a fresh one), nothing lost or doubled, and no stall: the second campaign
takes about as long as the first. The sender runs with the default retry policy (30 s base),
so a deferral would show as a stall of tens of seconds.
"""

from __future__ import annotations

import time

import psycopg
import pytest

from services.smtp_sink import SinkConfig, SmtpSink
from tests.chaos.fault_kit import (
    RECIPIENTS_N,
    STOP_BOUND_SECONDS,
    Campaign,
    Services,
    check_delivery,
    free_port,
    isolated,
    wait_for,
)

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]

# The second campaign may take this much longer than the first (start-up noise of a 2-core
# machine), not the retry backoff of a deferral.
STALL_ALLOWANCE_SECONDS = 5.0
LATENCY_MS = 5.0


def deferred(database_url: str, campaign_id: str) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM send_ledger WHERE campaign_id = %s"
                           " AND attempts > 1", (campaign_id,)).fetchone()
    return int(row[0]) if row else 0


def mail_campaign(settings, campaign: Campaign, sink: SmtpSink, services: Services) -> float:
    began = time.monotonic()
    campaign.hydrate(settings)
    wait_for(lambda: campaign.mailed(sink) >= campaign.size, 180,
             f"campaign {campaign.id} mailed", services)
    return time.monotonic() - began


def test_relay_restart_between_campaigns_costs_no_ambiguity_and_no_stall(settings, tmp_path):
    port = free_port()
    settings = isolated(settings, smtp_port=port, state_dir=tmp_path / "state")
    first, second = Campaign(RECIPIENTS_N), Campaign(RECIPIENTS_N)
    services = Services(settings, tmp_path / "logs", ["sender"],
                        SENDER_RETRY_BASE_SECONDS="30", SENDER_RETRY_MAX_DELAY_SECONDS="3600")
    try:
        with SmtpSink(SinkConfig(port=port, latency_ms=LATENCY_MS)) as before:
            took_first = mail_campaign(settings, first, before, services)
            wait_for(lambda: _settled(first, before, settings.database_url), 30,
                     "the first campaign settled", services, poll=0.5)
        time.sleep(1.0)  # the relay is away a moment, as in a real restart
        with SmtpSink(SinkConfig(port=port, latency_ms=LATENCY_MS)) as after:
            took_second = mail_campaign(settings, second, after, services)
            wait_for(lambda: _settled(second, after, settings.database_url), 30,
                     "the second campaign settled", services, poll=0.5)
            delivery = check_delivery(second, [after], settings.database_url)
        retried = deferred(settings.database_url, second.id)
        print(f"\nfirst campaign {took_first:.1f}s, second (after the relay restart) "
              f"{took_second:.1f}s; second: {delivery}, deferred={retried}")
        assert delivery.ambiguous == 0, f"{delivery.ambiguous} spurious ambiguous outcomes"
        assert delivery.duplicates == 0
        assert retried == 0, f"{retried} recipients deferred for dead pooled connections"
        assert took_second <= took_first + STALL_ALLOWANCE_SECONDS, (
            f"stalled: {took_second:.1f}s against {took_first:.1f}s")
        services.check_alive()
    finally:
        stopped = services.stop_all()
        print(f"stop on SIGTERM: { {n: (s.code, round(s.seconds, 1)) for n, s in stopped.items()} }")
    for name, how in stopped.items():
        assert how.code == 0 and how.seconds < STOP_BOUND_SECONDS, (
            f"{name} did not stop cleanly: {how}\n{services.logs(name)}")


def _settled(campaign: Campaign, sink: SmtpSink, database_url: str) -> bool:
    try:
        check_delivery(campaign, [sink], database_url)
    except AssertionError:
        return False
    return True
