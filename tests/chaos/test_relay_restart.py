"""Chaos: the SMTP relay (the project's sink) restarted between two campaigns, and away for
20 s in the middle of one.

The sender keeps its SMTP connections open between campaigns. The relay is stopped (every
connection closed) and started again on the same port; then a second campaign is sent. Its
recipients must not pay for the dead connections: none counted ambiguous (the relay never saw
a message on them), none deferred (a connection found dead before MAIL is replaced, and the
mail goes out on a fresh one), nothing lost or doubled, and no stall: the second campaign
takes about as long as the first. The sender runs with the default retry policy (30 s base),
so a deferral would show as a stall of tens of seconds.
"""

from __future__ import annotations

import os
import time

import psycopg
import pytest

from schemas.events import CampaignCompleted
from services.smtp_sink import SinkConfig, SmtpSink
from tests.chaos.fault_kit import (
    RECIPIENTS_N,
    STOP_BOUND_SECONDS,
    Campaign,
    EventWatch,
    Services,
    check_delivery,
    free_port,
    isolated,
    sink_latency_ms,
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


RELAY_DOWN_SECONDS = float(os.environ.get("CHAOS_RELAY_DOWN_SECONDS", "20"))


def test_relay_down_mid_campaign_is_waited_out(platform_settings, tmp_path):
    """The relay goes away for RELAY_DOWN_SECONDS with a third of the campaign mailed: the
    recipients meanwhile are deferred and retried, none lost or failed, none doubled beyond the
    ambiguous count, exactly one CampaignCompleted once the relay is back."""
    port = free_port()
    settings = isolated(platform_settings, smtp_port=port, state_dir=tmp_path / "state")
    campaign = Campaign(RECIPIENTS_N)
    services = Services(settings, tmp_path / "logs", ["completion", "sender"],
                        SENDER_MAX_ATTEMPTS="1000", SENDER_MAX_AGE_SECONDS="3600")
    watch = EventWatch(settings)
    try:
        with SmtpSink(SinkConfig(port=port, latency_ms=sink_latency_ms(campaign.size))) as before:
            campaign.hydrate(settings)
            wait_for(lambda: campaign.mailed(before) >= campaign.size // 3, 120,
                     "a third of the campaign mailed", services)
            mailed_before = campaign.mailed(before)
        down_at = time.monotonic()
        time.sleep(RELAY_DOWN_SECONDS)
        services.check_alive()
        with SmtpSink(SinkConfig(port=port, latency_ms=LATENCY_MS)) as after:
            back_at = time.monotonic()
            done = wait_for(lambda: watch.of_type(CampaignCompleted, campaign.id), 120,
                            "CampaignCompleted after the relay came back", services)
            time.sleep(3.0)  # a second completion must be seen, not missed
            completions = watch.of_type(CampaignCompleted, campaign.id)
            delivery = check_delivery(campaign, [before, after], settings.database_url)
        retried = deferred(settings.database_url, campaign.id)
        print(f"\nrelay down {RELAY_DOWN_SECONDS:.0f}s at {mailed_before}/{campaign.size} mailed; "
              f"CampaignCompleted {done[0].at - back_at:.1f}s after it came back "
              f"({done[0].at - down_at:.1f}s after it went); {delivery}, deferred={retried}")
        assert len(completions) == 1, f"{len(completions)} CampaignCompleted"
        payload = completions[0].message.payload
        assert isinstance(payload, CampaignCompleted)
        assert (payload.total, payload.sent, payload.failed) == (campaign.size, campaign.size, 0)
        assert retried > 0, "no recipient was deferred: the relay was not away mid-campaign"
        services.check_alive()
    finally:
        watch.close()
        stopped = services.stop_all()
    for name, how in stopped.items():
        assert how.code == 0 and how.seconds < STOP_BOUND_SECONDS, (
            f"{name} did not stop cleanly: {how}\n{services.logs(name)}")
