"""The engine's Prometheus metrics after a real campaign: each service's /metrics, scraped over
HTTP from the real processes, agrees with what the read model and the topics say happened.

Values, not presence: the sender's sent and failed counters equal the campaign's counts, its
SMTP latency histogram counts every attempt, its retries equal the deferred events on
campaign.deliveries, and every consumer's lag is 0 once the campaign is complete."""

from __future__ import annotations

import time
import urllib.request
import uuid
from typing import TypedDict

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from projections.queries import campaign_progress
from schemas.commands import CreateCampaign, SendCampaign
from schemas.contacts import ContactUpserted, contact_id_for, contact_key
from schemas.envelope import wrap
from schemas.events import EmailDeferred
from services.common.observability import ask_readiness
from services.common.topics import COMMANDS, CONTACTS, DELIVERIES
from services.smtp_sink import SinkConfig, SmtpSink
from tests.kafka_io import publish, read_topic
from tests.ports import free_ports
from tests.service_process import ServiceProcess

pytestmark = pytest.mark.e2e
SERVICES = ("command_handler", "hydrator", "sender", "projector", "completion")
RECIPIENTS = 400


class RetryEnv(TypedDict):
    """Environment for a sender that retries quickly (a TypedDict: it cannot fill `log_dir`)."""

    SENDER_RETRY_BASE_SECONDS: str
    SENDER_RETRY_MAX_DELAY_SECONDS: str


FAST_RETRIES: RetryEnv = {"SENDER_RETRY_BASE_SECONDS": "0.2", "SENDER_RETRY_MAX_DELAY_SECONDS": "0.5"}


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(value for (sample, have), value in samples.items()
               if sample == name and set(labels.items()) <= set(have))


def test_metrics_agree_with_the_campaign(settings):
    tenant = "acme"
    contacts = []
    for i in range(RECIPIENTS):
        email = f"m{i}@example.org"
        cid = contact_id_for(tenant, email)
        contacts.append((contact_key(tenant, cid), wrap(
            ContactUpserted(contact_id=cid, email=email, lists=["all"]), tenant_id=tenant, aggregate_id=cid)))
    publish(settings, CONTACTS, contacts)
    campaign = f"cmp-{uuid.uuid4().hex[:12]}"
    ports = dict(zip(SERVICES, free_ports(len(SERVICES)), strict=True))
    sink_config = SinkConfig(port=0, permfail_rate=0.1, tempfail_rate=0.1, seed=7)
    with SmtpSink(sink_config) as sink:
        run = settings.replace(smtp_port=sink.port)
        procs = [ServiceProcess(name, run, METRICS_PORT=str(ports[name]), **FAST_RETRIES).start()
                 for name in SERVICES]
        try:
            publish(settings, COMMANDS, [
                (campaign.encode(), wrap(CreateCampaign(name="M", subject="s", from_address="n@example.com",
                                                        body_text="hi"), tenant_id=tenant, aggregate_id=campaign)),
                (campaign.encode(), wrap(SendCampaign(list_ids=["all"]), tenant_id=tenant,
                                         aggregate_id=campaign)),
            ])
            deadline = time.monotonic() + 240
            with psycopg.connect(settings.database_url, autocommit=True) as conn:
                while not ((p := campaign_progress(conn, campaign)) and p.status == "completed"):
                    assert time.monotonic() < deadline, "campaign not completed"
                    for proc in procs:
                        assert proc.proc is not None and proc.proc.poll() is None, proc.log_tail()
                    time.sleep(0.5)
            deferred = [m for m in read_topic(settings, DELIVERIES, timeout=60)
                        if isinstance(m.payload, EmailDeferred) and m.envelope.aggregate_id == campaign]
            time.sleep(3)  # lag gauges and commit counters follow the last batch's commit
            scraped = {name: scrape(port) for name, port in ports.items()}
            ready = {name: ask_readiness(f"http://127.0.0.1:{port}") for name, port in ports.items()}
        finally:
            for proc in procs:
                proc.stop()

    assert p.total == RECIPIENTS and p.sent + p.failed == RECIPIENTS and p.failed > 0
    sender = scraped["sender"]
    assert total(sender, "campaign_deliveries_total", outcome="sent") == p.sent
    assert total(sender, "campaign_deliveries_total", outcome="failed") == p.failed
    assert total(sender, "campaign_deliveries_total", outcome="deferred") == len(deferred) > 0
    assert total(sender, "campaign_retries_scheduled_total") == len(deferred)
    assert total(sender, "campaign_ambiguous_deliveries_total") == 0
    attempts = p.sent + p.failed + len(deferred)
    assert total(sender, "campaign_smtp_transaction_seconds_count") == attempts
    assert total(sender, "campaign_records_consumed_total") >= RECIPIENTS
    # Batches count the records they mailed from; routed ones (retries not due) are not in one.
    assert 0 < total(sender, "campaign_batch_size_records_sum") <= total(sender, "campaign_records_consumed_total")
    # One duration per batch, each batch timed.
    assert total(sender, "campaign_batch_duration_seconds_count") == total(sender, "campaign_batch_size_records_count") > 0
    assert total(sender, "campaign_batch_duration_seconds_sum") > 0
    projector = scraped["projector"]
    assert total(projector, "campaign_projection_lag_seconds_count") > 0
    assert total(projector, "campaign_records_consumed_total", topic=settings.topic_prefix + "campaign.deliveries") \
        >= RECIPIENTS + len(deferred)
    deliveries_topic = settings.topic_prefix + "campaign.deliveries"
    events_topic = settings.topic_prefix + "campaign.events"
    assert total(sender, "campaign_records_produced_total", topic=deliveries_topic) >= attempts
    handler = scraped["command_handler"]
    assert total(handler, "campaign_records_produced_total", topic=events_topic) >= 2  # created, requested
    assert total(handler, "campaign_kafka_transactions_total", result="committed") >= 1
    hydrator = scraped["hydrator"]
    assert total(hydrator, "campaign_records_produced_total",
                 topic=settings.topic_prefix + "campaign.recipients") >= RECIPIENTS
    completion = scraped["completion"]
    assert total(completion, "campaign_records_produced_total", topic=events_topic) == 1  # CampaignCompleted
    assert total(completion, "campaign_kafka_transactions_total", result="committed") >= 1
    for name in ("sender", "projector"):
        lags = [v for (sample, _), v in scraped[name].items() if sample == "campaign_consumer_lag_records"]
        assert lags and max(lags) == 0, f"{name} lag after completion: {lags}"
    for name, answer in ready.items():
        assert answer["ready"] is True, (name, answer)
    # The hydrator's faust agents consume campaign.events; its gather loop does not.
    hydrator_holds = ready["hydrator"]["assignment"]
    assert isinstance(hydrator_holds, list)
    assert any(str(p).startswith(events_topic + "[") for p in hydrator_holds), hydrator_holds
    for name in SERVICES:
        assert total(scraped[name], "process_resident_memory_bytes") > 0
        # The dashboard's join key: one info series per process, naming its service.
        info = [dict(labels) for (sample, labels) in scraped[name] if sample == "campaign_service_info"]
        assert [i["service"] for i in info] == [{"completion": "completion-tracker"}.get(name, name)], info
        assert not any("@" in value for (_, labels) in scraped[name] for _, value in labels), \
            "an e-mail address in a metric label"
