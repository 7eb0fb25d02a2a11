"""Chaos: the Kafka broker SIGKILLed mid-campaign and restarted 5 s later.

The command handler, the completion tracker and the sender run as processes against a broker
of the test's own (the shared one is never touched). While a campaign is being mailed and a
steady stream of commands flows (one every 100 ms, also while the broker is down: the test's
producer keeps them until it is back), the broker is killed with SIGKILL and started again on
the same data 5 s later. Then, exactly:
- every command published before, during and after the outage is accepted exactly once (one
  CampaignCreated caused by it on campaign.events, read_committed, nothing else);
- the campaign completes: exactly one CampaignCompleted with every recipient sent;
- nobody is lost, duplicates in the sink never exceed the ambiguous outcomes of the ledger;
- every service is still alive afterwards and serving (a new command is accepted);
- with the broker killed again (for good), each service stops on SIGTERM within
  STOP_BOUND_SECONDS with exit code 0.
"""

from __future__ import annotations

import time

import pytest

from schemas.events import CampaignCompleted, CampaignCreated, CampaignSendRequested
from services.smtp_sink import SinkConfig, SmtpSink
from tests.chaos.fault_kit import (
    RECIPIENTS_N,
    STOP_BOUND_SECONDS,
    Campaign,
    CommandStream,
    EventWatch,
    PrivateKafka,
    Services,
    check_delivery,
    isolated,
    sink_latency_ms,
    wait_for,
)

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]

OUTAGE_SECONDS = 5.0
# After the broker answers again: every command accepted, and the campaign completed, within
# these (the clients reconnect, transactions resume; the rest of the campaign is mailed).
COMMANDS_BOUND_SECONDS = 60.0
COMPLETION_BOUND_SECONDS = 90.0


@pytest.fixture
def private_kafka(tmp_path):
    kafka = PrivateKafka(tmp_path / "platform")
    kafka.start()
    try:
        yield kafka
    finally:
        kafka.stop()


def test_broker_sigkill_and_restart_mid_campaign(private_kafka, platform_settings, tmp_path):
    settings = isolated(platform_settings.replace(kafka_bootstrap_servers=private_kafka.bootstrap,
                                state_dir=tmp_path / "state"))
    campaign = Campaign(RECIPIENTS_N)
    with SmtpSink(SinkConfig(port=0, latency_ms=sink_latency_ms(campaign.size))) as sink:
        settings = settings.replace(smtp_port=sink.port)
        services = Services(settings, tmp_path / "logs", ["command_handler", "completion", "sender"])
        watch = EventWatch(settings)
        stream = CommandStream(settings)
        try:
            campaign.send(settings)
            wait_for(lambda: watch.of_type(CampaignSendRequested, campaign.id), 90,
                     "the send to be accepted", services)
            campaign.hydrate(settings)
            stream.start()
            wait_for(lambda: campaign.mailed(sink) >= campaign.size // 3, 120,
                     "a third of the campaign mailed", services)
            private_kafka.kill()
            killed_at = time.monotonic()
            mailed_at_kill = campaign.mailed(sink)
            time.sleep(OUTAGE_SECONDS)
            boot = private_kafka.start()
            ready_at = time.monotonic()
            print(f"\nbroker killed at {mailed_at_kill}/{campaign.size} mailed; back after "
                  f"{ready_at - killed_at:.1f}s (boot {boot:.1f}s)")

            done = wait_for(lambda: watch.of_type(CampaignCompleted, campaign.id),
                            COMPLETION_BOUND_SECONDS, "CampaignCompleted after the restart",
                            services)
            completed_after = done[0].at - ready_at
            time.sleep(2.0)  # commands keep flowing a little after the campaign
            sent = stream.stop()

            def accepted(command_id):
                return watch.caused_by(command_id)

            wait_for(lambda: all(accepted(c) for c, _ in sent), COMMANDS_BOUND_SECONDS,
                     "every command accepted", services)
            after_restart = [(c, at) for c, at in sent if at >= ready_at]
            first_after = min(accepted(c)[0].at for c, _ in after_restart) - ready_at
            outage_commands = [c for c, at in sent if killed_at <= at < ready_at]
            last_outage = max((accepted(c)[0].at for c in outage_commands), default=ready_at)
            time.sleep(3.0)  # a copy committed late must be seen, not missed
            print(f"after the restart: first new command accepted in {first_after:.1f}s, the "
                  f"{len(outage_commands)} commands of the outage by "
                  f"+{last_outage - ready_at:.1f}s, CampaignCompleted at +{completed_after:.1f}s")

            for command_id, _ in sent:
                caused = [s.message.payload for s in accepted(command_id)]
                assert len(caused) == 1 and isinstance(caused[0], CampaignCreated), (
                    f"command {command_id}: {caused}")
            completions = watch.of_type(CampaignCompleted, campaign.id)
            assert len(completions) == 1, f"{len(completions)} CampaignCompleted"
            payload = completions[0].message.payload
            assert isinstance(payload, CampaignCompleted)
            assert (payload.total, payload.sent, payload.failed) == (campaign.size, campaign.size, 0)
            delivery = check_delivery(campaign, [sink], settings.database_url)
            print(f"delivery: {delivery}; {len(sent)} commands, each accepted once")

            services.check_alive()
            probe = CommandStream(settings)
            probe_id = probe.publish_one()
            probe.stop()
            wait_for(lambda: accepted(probe_id), 15, "a command after the checks", services)
            # SIGTERM is honoured during an outage too: the broker goes away for good now.
            watch.close()
            private_kafka.kill()
            time.sleep(3.0)
        finally:
            stream.stop(check=False)
            watch.close()
            stopped = services.stop_all()
            print(f"stop on SIGTERM: { {n: (s.code, round(s.seconds, 1)) for n, s in stopped.items()} }")
        for name, how in stopped.items():
            assert how.code == 0 and how.seconds < STOP_BOUND_SECONDS, (
                f"{name} did not stop cleanly: {how}\n{services.logs(name)}")
