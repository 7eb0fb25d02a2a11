"""Chaos: SIGKILL the sender repeatedly while a faulty relay keeps recipients on the delay
topics, restart it each time, and check every recipient's fate against the exact expected set.

Only the sender runs (as a real process); recipients are produced straight onto
campaign.recipients. The sink injects 20% 4xx, 5% 5xx, 5% dropped connections (half after
the final ".") and latency, so at every kill some recipients are in flight, some wait on a
delay topic and some are being retried. Afterwards:
- nothing is lost: every recipient has a terminal delivery, and all of a recipient's terminal
  events agree (copies are allowed, contradictions are not);
- only 5xx ends failed: every transient failure was retried until sent;
- every sent recipient is in the sink's record; copies in the sink, and mail to recipients
  that ended failed, never exceed the possible duplicates counted in the send ledger.

Sizes: RETRY_CHAOS_RECIPIENTS (default 2000), RETRY_CHAOS_KILLS (default 3), CHAOS_SEED.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter, defaultdict
from typing import TypedDict

import pytest

from schemas.events import EmailDeferred, EmailFailed, EmailSent
from services.smtp_sink import SinkConfig, SmtpSink
from tests.integration.sender_kit import (
    deliveries_until,
    ledger_rows,
    produce,
    recipients,
    terminal_for_all,
)
from tests.service_process import ServiceProcess

RECIPIENTS = int(os.environ.get("RETRY_CHAOS_RECIPIENTS", "2000"))
KILLS = int(os.environ.get("RETRY_CHAOS_KILLS", "3"))
SEED = int(os.environ.get("CHAOS_SEED", str(random.SystemRandom().randrange(1 << 31))))


class RetryEnv(TypedDict):
    """Environment for a sender that retries quickly (a TypedDict: it cannot fill `log_dir`)."""

    SENDER_RETRY_BASE_SECONDS: str
    SENDER_RETRY_MAX_DELAY_SECONDS: str
    SENDER_MAX_ATTEMPTS: str


FAST_RETRIES: RetryEnv = {"SENDER_RETRY_BASE_SECONDS": "0.2", "SENDER_RETRY_MAX_DELAY_SECONDS": "1.0",
                          "SENDER_MAX_ATTEMPTS": "12"}

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]


def test_sigkill_during_retries_loses_nobody_and_counts_every_possible_duplicate(settings):
    print(f"\nretry chaos: recipients={RECIPIENTS} kills={KILLS} seed={SEED}")
    rng = random.Random(SEED)
    batch = recipients(RECIPIENTS)
    campaign = batch[0].campaign_id
    faults = SinkConfig(port=0, tempfail_rate=0.20, permfail_rate=0.05, drop_rate=0.025,
                        drop_before_data_rate=0.025, latency_ms=2, seed=SEED)
    produce(settings, batch)
    with SmtpSink(faults) as sink:
        config = settings.replace(smtp_port=sink.port)
        sender = ServiceProcess("sender", config, **FAST_RETRIES).start()
        try:
            points = sorted(rng.randint(RECIPIENTS // 10, RECIPIENTS * 8 // 10)
                            for _ in range(KILLS))
            for number, point in enumerate(points, 1):
                deadline = time.monotonic() + 300
                while len(sink.messages) < point:
                    assert sender.proc is not None and sender.proc.poll() is None, sender.log_tail()
                    assert time.monotonic() < deadline, f"no progress before kill {number}"
                    time.sleep(0.05)
                time.sleep(rng.uniform(0.0, 0.3))
                sender.kill()
                print(f"retry chaos: kill {number} at {len(sink.messages)} sink records")
                sender = ServiceProcess("sender", config, **FAST_RETRIES).start()
            events = deliveries_until(settings, terminal_for_all(RECIPIENTS), timeout=600)
        finally:
            code = sender.stop()
        records = sink.messages

    outcomes: dict[str, set[str]] = defaultdict(set)
    for event in events:
        if not isinstance(event.payload, EmailDeferred):
            outcomes[event.payload.contact_id].add(type(event.payload).__name__)
    assert set(outcomes) == {r.contact_id for r in batch}, "a recipient has no terminal delivery"
    contradictions = {c: kinds for c, kinds in outcomes.items() if len(kinds) > 1}
    assert not contradictions, f"recipients with contradicting outcomes: {contradictions}"
    failed = [e.payload for e in events if isinstance(e.payload, EmailFailed)]
    assert all(f.permanent and f.smtp_code == 550 for f in failed), "a transient failure gave up"
    emails = {r.contact_id: r.email for r in batch}
    sent = {emails[c] for c, kinds in outcomes.items() if kinds == {"EmailSent"}}
    mailed = Counter(rec["rcpt_tos"][0] for rec in records)
    assert sent <= set(mailed), "a recipient reported sent is not in the sink"
    copies = sum(n - 1 for n in mailed.values())
    mailed_but_failed = len(set(mailed) - sent)
    ambiguous = sum(r["ambiguous"] for r in ledger_rows(settings, campaign))
    # Per recipient: a settled outcome may be published again after a crash (a replay), so
    # summing every EmailSent event would count a recipient's ambiguous attempts twice.
    per_recipient: dict[str, int] = {}
    for e in events:
        if isinstance(e.payload, EmailSent):
            per_recipient[e.payload.contact_id] = max(per_recipient.get(e.payload.contact_id, 0),
                                                      e.payload.ambiguous)
    reported = sum(per_recipient.values())
    print(f"retry chaos: {len(records)} mails, {len(sent)} sent, {len({f.contact_id for f in failed})} failed, "
          f"copies={copies} mailed_but_failed={mailed_but_failed} ambiguous={ambiguous}")
    assert copies + mailed_but_failed <= ambiguous
    assert reported <= ambiguous
    assert code == 0, "the last sender did not exit cleanly on SIGTERM"
