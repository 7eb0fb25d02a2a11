"""The failure-rate guard end to end (real broker, PostgreSQL, SMTP sink): a relay refusing
everything makes the completion tracker ask for a pause, the command handler pauses the
campaign (automatic, with the reason), and the senders hold the recipients not yet mailed.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import pytest

from schemas.commands import CreateCampaign, SendCampaign
from schemas.envelope import wrap
from schemas.events import CampaignHydrated, CampaignPaused, EmailFailed
from services.command_handler.handler import CommandHandler
from services.common.settings import Settings
from services.common.topics import COMMANDS, EVENTS, HELD
from services.completion.service import CompletionService
from services.completion.tracker import FailureGuard
from services.smtp_sink import SinkConfig, SmtpSink
from tests.integration.sender_kit import (
    TENANT,
    produce,
    read_deliveries,
    recipients,
    running_sender,
    steady,
    wait_until,
)
from tests.kafka_io import publish, read_topic

pytestmark = pytest.mark.integration

COUNT = 1000


@contextlib.contextmanager
def running(target, stop: threading.Event) -> Iterator[None]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target(stop)
        except BaseException as exc:  # surfaced in the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(60)
    assert not errors, errors


def test_a_failing_campaign_is_paused_automatically_and_its_recipients_held(settings: Settings):
    batch = recipients(COUNT)
    campaign = batch[0].campaign_id
    create = CreateCampaign(name="n", subject="s", from_address="news@example.com", body_text="b")
    guard = FailureGuard(min_deliveries=20, failure_rate=0.5)
    with SmtpSink(SinkConfig(port=0, permfail_rate=1.0, latency_ms=20)) as sink, \
            running(CommandHandler(settings).run, threading.Event()), \
            running(CompletionService(settings, guard=guard).run, threading.Event()):
        publish(settings, COMMANDS, [
            (campaign.encode(), wrap(create, tenant_id=TENANT, aggregate_id=campaign)),
            (campaign.encode(), wrap(SendCampaign(list_ids=["l"]), tenant_id=TENANT,
                                     aggregate_id=campaign)),
        ])
        # What the hydrator would publish (it does not run here).
        publish(settings, EVENTS, [(campaign.encode(), wrap(CampaignHydrated(total=COUNT),
                                                            tenant_id=TENANT,
                                                            aggregate_id=campaign))])
        produce(settings, batch)
        with running_sender(settings.replace(smtp_port=sink.port), concurrency=2) as worker:
            wait_until(lambda: worker.stats.held > 0, 120, "the campaign was not paused")
            refused = steady(lambda: sink.stats["permfail"])
        events = [m.payload for m in read_topic(settings, EVENTS, until=4)]

    paused = [e for e in events if isinstance(e, CampaignPaused)]
    assert len(paused) == 1 and paused[0].automatic
    assert "failure rate 100%" in (paused[0].reason or "")
    assert refused < COUNT, "everyone was mailed: the pause came too late to hold anyone"
    failed = [m.payload for m in read_deliveries(settings, refused)
              if isinstance(m.payload, EmailFailed)]
    assert len({f.contact_id for f in failed}) == refused
    assert len(read_topic(settings, HELD, until=COUNT - refused)) == COUNT - refused
