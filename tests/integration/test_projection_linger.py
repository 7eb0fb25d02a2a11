"""Live batching (projections.batching.LIVE_LINGER_SECONDS) against the real broker and
database: a trickle that follows a batch that was not full is gathered into one transaction,
while a backlog, its last partial batch included, is handed over without waiting."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import psycopg
import pytest

from projections.projector import Projector, projector_for
from services.common.settings import Settings
from services.common.topics import DELIVERIES
from tests.integration.test_projector import T0, Campaign, produce

pytestmark = pytest.mark.integration

# Far longer than the test takes: a batch that lingers waits for its records, never for this.
LONG_LINGER_SECONDS = 60.0
# A stuck poll loop, not a slow one.
LOOP_TIMEOUT_SECONDS = 30.0


def _sent_rows(settings: Settings, campaign: Campaign) -> int:
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM campaign_recipients"
                           " WHERE campaign_id = %s AND status = 'sent'", (campaign.id,)).fetchone()
    assert row is not None
    return int(row[0])


def _poll_until(projector: Projector, records: int) -> None:
    deadline = time.monotonic() + LOOP_TIMEOUT_SECONDS
    while projector.records_applied < records:
        assert time.monotonic() < deadline, f"{projector.records_applied} of {records} applied"
        projector.poll_once()


def test_a_trickle_after_a_small_batch_goes_in_one_transaction(settings: Settings) -> None:
    campaign = Campaign()
    sent = [campaign.sent(f"c{i}", 1, T0 + timedelta(seconds=i)) for i in range(4)]
    produce(settings, sent[:1])
    with projector_for(settings, topics=(DELIVERIES,), batch_size=3,
                   linger=LONG_LINGER_SECONDS) as projector:
        _poll_until(projector, 1)
        assert projector.batches_committed == 1  # one record: a batch that was not full

        def trickle() -> None:
            # Three separate deliveries, apart: without the linger each would be a batch.
            for record in sent[1:]:
                time.sleep(0.3)
                produce(settings, [record])

        producer = threading.Thread(target=trickle)
        producer.start()
        try:
            _poll_until(projector, 4)
        finally:
            producer.join()
        assert projector.batches_committed == 2
    assert _sent_rows(settings, campaign) == 4


def test_a_backlog_and_its_last_partial_batch_are_not_held(settings: Settings) -> None:
    campaign = Campaign()
    produce(settings, [campaign.sent(f"c{i}", 1, T0) for i in range(5)])
    with projector_for(settings, topics=(DELIVERIES,), batch_size=2,
                   linger=LONG_LINGER_SECONDS) as projector:
        # Batches of 2, 2, then 1 after a full one: were that one held for the linger, this
        # drain would time out.
        assert projector.drain(timeout=LOOP_TIMEOUT_SECONDS) == 5
    assert _sent_rows(settings, campaign) == 5
