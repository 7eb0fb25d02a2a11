"""Chaos on a private single broker: SIGKILLed and restarted ~5 s later, or SIGSTOPped for
30 s then SIGCONT, mid-campaign; every service rides it out and the campaign completes exactly.

Same harness as test_cluster_failover.py (PostgreSQL is the test platform's; the broker is
private, on free ports, in its own folder). Checks: nobody lost, duplicates no more than the
ambiguous outcomes, the read model exact, exactly one CampaignCompleted, every service alive
afterwards and exiting 0 on SIGTERM, and every line each service logged through it a JSON
object (librdkafka's own connection errors included).
"""


from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from projections.queries import campaign_progress
from schemas.base import normalise_email
from schemas.commands import CreateCampaign, SendCampaign
from schemas.contacts import ContactUpserted, contact_id_for, contact_key
from schemas.envelope import wrap
from schemas.events import CampaignCompleted
from services.common.topics import COMMANDS, CONTACTS, EVENTS, ensure_topics
from services.platform.kafka import KafkaCluster
from services.platform.stack import REPO_ROOT
from services.smtp_sink import SinkConfig, SmtpSink, header
from tests.kafka_io import publish, read_topic
from tests.ports import free_ports
from tests.service_process import ServiceProcess

RECIPIENTS = int(os.environ.get("CHAOS_RECIPIENTS", "600"))
SERVICES = ("command_handler", "hydrator", "projector", "completion", "sender")
DOWN_SECONDS = 5.0
STOPPED_SECONDS = 30.0
TIMEOUT = 300 + RECIPIENTS // 20

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(TIMEOUT + 300)]


@pytest.fixture
def broker() -> Iterator[KafkaCluster]:
    state = Path(tempfile.mkdtemp(prefix="broker-"))
    ports = free_ports(2)
    nodes = KafkaCluster(state, [(ports[0], ports[1])],
                         REPO_ROOT / ".state" / "kafka-libs")
    nodes.start()
    try:
        yield nodes
    finally:
        nodes.stop()
        shutil.rmtree(state, ignore_errors=True)


def wait_for(predicate, timeout, what, services):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for p in services:
            assert p.proc.poll() is None, f"{p.service} died:\n{p.log_tail(60)}"
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def broker_pid(cluster: KafkaCluster) -> int:
    pid = cluster.node(1).process.pid()
    assert pid is not None
    return pid


@pytest.mark.parametrize("fault", ["sigkill", "sigstop"])
def test_broker_outage_mid_campaign(platform_settings, broker, fault) -> None:
    cluster = broker
    settings = platform_settings.replace(kafka_bootstrap_servers=cluster.bootstrap,
                       topic_prefix=f"k{uuid.uuid4().hex[:8]}.")
    ensure_topics(settings)
    tenant = "cluster"
    expected = {normalise_email(f"person{i}@example.org") for i in range(RECIPIENTS)}
    contacts = []
    for email in sorted(expected):
        cid = contact_id_for(tenant, email)
        contacts.append((contact_key(tenant, cid), wrap(
            ContactUpserted(contact_id=cid, email=email, lists=["all"]), tenant_id=tenant, aggregate_id=cid)))
    publish(settings, CONTACTS, contacts)
    campaign = f"cmp-{uuid.uuid4().hex[:12]}"

    def completes(e) -> bool:
        return isinstance(e.payload, CampaignCompleted) and e.envelope.aggregate_id == campaign
    create = CreateCampaign(name="Cluster", subject="Hello", from_address="news@example.com", body_text="Hi")

    # 150 ms a mail over 8 connections: mailing outlasts two node restarts (~10 s each).
    with SmtpSink(SinkConfig(port=0, latency_ms=150)) as sink:
        run = settings.replace(smtp_port=sink.port)
        services = [ServiceProcess(name, run).start() for name in SERVICES]
        try:
            started = time.monotonic()
            publish(settings, COMMANDS, [
                (campaign.encode(), wrap(create, tenant_id=tenant, aggregate_id=campaign)),
                (campaign.encode(), wrap(SendCampaign(list_ids=["all"]), tenant_id=tenant,
                                         aggregate_id=campaign)),
            ])
            wait_for(lambda: sink.wait_for_messages(int(RECIPIENTS * 0.2), timeout=0.2),
                     TIMEOUT, "20% mailed", services)
            pid = broker_pid(cluster)
            print(f"\n{fault}: at {len(sink.messages)} mails (t={time.monotonic() - started:.1f}s)")
            if fault == "sigkill":
                os.kill(pid, signal.SIGKILL)
                time.sleep(DOWN_SECONDS)
                cluster.restart(1)
            else:
                os.kill(pid, signal.SIGSTOP)
                time.sleep(STOPPED_SECONDS)
                os.kill(pid, signal.SIGCONT)
            fault_ended = time.monotonic()
            with psycopg.connect(settings.database_url, autocommit=True) as conn:
                done = wait_for(
                    lambda: (p := campaign_progress(conn, campaign)) and p.status == "completed" and p,
                    TIMEOUT, "campaign completed", services)
                completed_after = time.monotonic() - fault_ended
                row = conn.execute("SELECT coalesce(sum(ambiguous), 0) FROM send_ledger"
                                   " WHERE campaign_id = %s", (campaign,)).fetchone()
                assert row is not None
                ambiguous = row[0]
            # The read model counts deliveries; CampaignCompleted follows from the tracker.
            completions = [e for e in read_topic(settings, EVENTS, until=1, timeout=TIMEOUT, counting=completes)
                           if completes(e)]
            for p in services:
                assert p.proc is not None and p.proc.poll() is None, f"{p.service} died:\n{p.log_tail(60)}"
        finally:
            codes = {p.service: p.stop() for p in services}
        mails = [m for m in sink.messages if header(m, "X-Campaign-ID") == campaign]

    by_rcpt = Counter(r for m in mails for r in m["rcpt_tos"])
    duplicates = sum(c - 1 for c in by_rcpt.values())
    print(f"{fault}: completed {completed_after:.1f}s after the fault; lost={len(expected - set(by_rcpt))} "
          f"dup={duplicates} ambiguous={ambiguous}")
    assert set(by_rcpt) == expected
    assert duplicates <= ambiguous
    assert done.total == RECIPIENTS and done.sent == RECIPIENTS and done.failed == 0
    assert len(completions) == 1
    assert set(codes.values()) == {0}, codes
    client_lines = 0
    for p in services:
        records, other = p.log_records()
        assert not other, f"{p.service} logged {len(other)} non-JSON lines, first: {other[:5]}"
        client_lines += sum(r.get("logger") == "librdkafka" for r in records)
    print(f"{fault}: every service log line JSON; {client_lines} from librdkafka")
    if fault == "sigkill":  # connections refused while the broker was away
        assert client_lines > 0
