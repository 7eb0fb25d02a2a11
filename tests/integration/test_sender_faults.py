"""The sender and the completion tracker against a faulty relay (real broker, PostgreSQL,
SMTP sink injecting 20% 4xx, 5% 5xx, 5% dropped connections and latency).

Checks the exact output: every recipient ends in exactly one terminal delivery; the transient
failures (4xx, drops) end sent, only 5xx end failed (and suppress the contact); the sink's
record equals the EmailSent events; every injected transient fault is one EmailDeferred;
possible duplicates equal the drops after DATA; the campaign completes with the sink's counts.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator

import pytest

from schemas.contacts import ContactSuppressed
from schemas.envelope import wrap
from schemas.events import CampaignCompleted, CampaignHydrated, EmailDeferred, EmailFailed, EmailSent
from services.common.settings import Settings
from services.common.topics import CONTACTS, EVENTS
from services.completion.service import CompletionService
from services.smtp_sink import SinkConfig, SmtpSink
from tests.integration.sender_kit import (
    TENANT,
    deliveries_until,
    ledger_rows,
    produce,
    recipients,
    running_sender,
    terminal_for_all,
)
from tests.kafka_io import publish, read_topic

pytestmark = pytest.mark.integration

FAULTS = SinkConfig(port=0, tempfail_rate=0.20, permfail_rate=0.05, drop_rate=0.025,
                    drop_before_data_rate=0.025, latency_ms=3, seed=20261129)
COUNT = 1000


@contextlib.contextmanager
def running_tracker(settings: Settings) -> Iterator[CompletionService]:
    stop = threading.Event()
    service = CompletionService(settings)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            service.run(stop)
        except BaseException as exc:  # surfaced in the test
            errors.append(exc)

    thread = threading.Thread(target=run, name="tracker", daemon=True)
    thread.start()
    try:
        yield service
    finally:
        stop.set()
        thread.join(60)
    assert not errors, errors


def test_every_recipient_ends_once_and_transient_failures_end_sent(settings):
    batch = recipients(COUNT)
    campaign = batch[0].campaign_id
    publish(settings, EVENTS, [(campaign.encode(), wrap(CampaignHydrated(total=COUNT),
                                                        tenant_id=TENANT, aggregate_id=campaign))])
    produce(settings, batch)
    with SmtpSink(FAULTS) as sink, running_tracker(settings), \
            running_sender(settings.replace(smtp_port=sink.port)):
        events = deliveries_until(settings, terminal_for_all(COUNT), timeout=240)
        completed = [m.payload for m in read_topic(settings, EVENTS, until=2)
                     if isinstance(m.payload, CampaignCompleted)]
        records = sink.messages
        faults = sink.stats

    payloads = [e.payload for e in events]
    terminal = [p for p in payloads if isinstance(p, EmailSent | EmailFailed)]
    assert len(terminal) == COUNT  # exactly one each (no crash here, so no replays either)
    assert Counter(t.contact_id for t in terminal) == Counter({r.contact_id: 1 for r in batch})
    sent = [t for t in terminal if isinstance(t, EmailSent)]
    failed = [t for t in terminal if isinstance(t, EmailFailed)]
    # Only 5xx ends failed; every transient failure was retried until sent.
    assert failed and {(f.permanent, f.smtp_code) for f in failed} == {(True, 550)}
    assert faults["permfail"] == len(failed)
    # The sink's record is exactly the sent events: one message per sent recipient.
    emails = {r.contact_id: r.email for r in batch}
    mailed = Counter(rec["rcpt_tos"][0] for rec in records)
    assert set(mailed.values()) == {1}
    assert set(mailed) == {emails[s.contact_id] for s in sent}
    # Every transient fault the sink injected is one deferral, retried on a later attempt.
    deferred = [p for p in payloads if isinstance(p, EmailDeferred)]
    transient_faults = faults["tempfail"] + faults["drop_after_data"] + faults["drop_before_data"]
    assert len(deferred) == transient_faults > 0
    per_contact = Counter(d.contact_id for d in deferred)
    assert all(t.attempt == per_contact[t.contact_id] + 1 for t in terminal)
    # Connections lost once the content was out: possible duplicates, counted in the ledger
    # and the events. The sender chunks (the sink offers CHUNKING): the content goes out with
    # MAIL and RCPT, so a drop at RCPT is as ambiguous as one after the content (smtp_pool).
    ambiguous = sum(t.ambiguous for t in terminal)
    assert ambiguous == faults["drop_after_data"] + faults["drop_before_data"]
    assert faults["drop_after_data"] > 0 and faults["drop_before_data"] > 0
    assert sum(r["ambiguous"] for r in ledger_rows(settings, campaign)) == ambiguous
    # Hard bounces ("550 5.1.1") suppress the contact.
    suppressed = read_topic(settings, CONTACTS, until=len(failed))
    assert all(isinstance(m.payload, ContactSuppressed) for m in suppressed)
    assert {m.payload.contact_id for m in suppressed} == {f.contact_id for f in failed}
    # The campaign completes once, with the sink's counts.
    assert completed == [CampaignCompleted(total=COUNT, sent=len(mailed), failed=len(failed))]
