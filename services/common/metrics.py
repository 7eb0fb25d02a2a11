"""The engine's Prometheus metrics, one definition each, shared by every service.

Each process has one registry (prometheus_client's default), served by
services/common/observability.py; which service a sample came from is the scrape target's
label, not a metric label. Names follow Prometheus conventions (base units in the name,
`_total` on counters). Labels carry only bounded values (topics, partitions, outcomes, reply
classes, relay names, results): never a tenant's contact id or e-mail address.

CAMPAIGN_METRICS=off makes every metric a no-op (`make bench` measures what metrics cost
against it); anything but on or off is refused at start.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from prometheus_client import Counter, Gauge, Histogram

from services.common.settings import Settings, load

M = TypeVar("M")


class _Off:
    """A metric under CAMPAIGN_METRICS=off: takes every call and records nothing."""

    def labels(self, *_: Any, **__: Any) -> _Off:
        return self

    def inc(self, *_: Any, **__: Any) -> None:
        return None

    dec = set = observe = set_function = inc

    def time(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()


ENABLED = load(Settings).campaign_metrics == "on"


def _metric(kind: Callable[..., M], *args: Any, **kwargs: Any) -> M:
    return kind(*args, **kwargs) if ENABLED else cast(M, _Off())


RECORDS_CONSUMED = _metric(
    Counter, "campaign_records_consumed", "Records this process consumed, by topic.", ["topic"])
RECORDS_PRODUCED = _metric(
    Counter, "campaign_records_produced", "Records this process produced (committed or not), by topic.",
    ["topic"])

DELIVERIES = _metric(
    Counter, "campaign_deliveries", "Delivery outcomes settled by the sender, by outcome and SMTP reply "
    "class (2xx, 4xx, 5xx, none).", ["outcome", "reply_class"])
AMBIGUOUS = _metric(
    Counter, "campaign_ambiguous_deliveries", "Transactions whose fate at the relay is unknown (the "
    "connection was lost after DATA): the only possible duplicates.")
RETRIES_SCHEDULED = _metric(
    Counter, "campaign_retries_scheduled", "Transient failures parked for a later attempt.")
THROTTLES = _metric(
    Counter, "campaign_throttles", "Times a rate limit made the sender wait, by scope (tenant, relay).",
    ["scope"])
HELD_RECIPIENTS = _metric(
    Gauge, "campaign_held_recipients", "Recipients held back by the sender right now (paused "
    "campaigns, parked retries not yet due).")
SMTP_TRANSACTION_SECONDS = _metric(
    Histogram, "campaign_smtp_transaction_seconds", "Duration of one SMTP transaction (MAIL to the reply "
    "after DATA), by relay.", ["relay"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

BATCH_SIZE = _metric(
    Histogram, "campaign_batch_size_records", "Records handled per batch.",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000))
BATCH_SECONDS = _metric(
    Histogram, "campaign_batch_duration_seconds", "Time to handle one batch, fetch to commit.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
TRANSACTIONS = _metric(
    Counter, "campaign_kafka_transactions", "Kafka transactions ended, by result (committed, aborted).",
    ["result"])

PROJECTION_LAG_SECONDS = _metric(
    Histogram, "campaign_projection_lag_seconds", "Per committed batch, from its oldest record's time "
    "(the producer's timestamp) to the commit of the read model that includes it.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
CONSUMER_LAG = _metric(
    Gauge, "campaign_consumer_lag_records", "Records between this consumer's position and the log "
    "end, per assigned partition, as the consumer last saw it.", ["topic", "partition"])
SERVICE_RESTARTS = _metric(
    Gauge, "campaign_service_restarts", "Times the supervisor restarted this service (crashes and "
    "watchdog kills) since the platform started; 0 when not supervised (Kubernetes counts "
    "its own: kube_pod_container_status_restarts_total).")
SERVICE_INFO = _metric(
    Gauge, "campaign_service_info", "1, labelled with the engine service this process runs and "
    "its version: dashboards join on it (`* on (instance) group_left (service)`), whatever "
    "job or pod labels the scrape configuration gives.", ["service", "version"])
OUTBOX_DEPTH = _metric(
    Gauge, "campaign_outbox_depth_records", "Accepted commands not yet relayed to Kafka.")

TRACKER_HITS = _metric(
    Counter, "campaign_tracker_hits", "Opens and clicks the tracker answered and Kafka "
    "acknowledged, by kind (open, click) and machine (true, false).", ["kind", "machine"])
TRACKER_HITS_LOST = _metric(
    Counter, "campaign_tracker_hits_lost", "Hits answered (pixel served, person redirected) "
    "whose event Kafka did not acknowledge in time, by kind: never on campaign.engagement.",
    ["kind"])
TRACKER_REFUSED = _metric(
    Counter, "campaign_tracker_refused_tokens", "Tracking requests refused, by reason "
    "(malformed, unknown key, bad signature, unsupported version, wrong kind).", ["reason"])


@functools.cache
def _produced(topic: str) -> Any:
    return RECORDS_PRODUCED.labels(topic=topic)


def count_produced(topic: str, records: int = 1) -> None:
    """Add to RECORDS_PRODUCED; the labelled child is looked up once per topic (this runs per
    record, on the fan-out's and the sender's hot paths)."""
    _produced(topic).inc(records)


class LagSampler:
    """Sets CONSUMER_LAG for a consumer's assigned partitions, at most once per `interval`:
    the log end as last fetched (cached: no broker round trip) minus the consumer's position.
    Call `sample` from the consumer's own loop (a confluent-kafka consumer is not shared across
    threads); partitions no longer assigned keep their last value until reassigned."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._last = float("-inf")

    def sample(self, consumer: Any) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        try:
            for tp in consumer.position(consumer.assignment()):
                if tp.offset < 0:
                    continue  # no position yet (nothing fetched on this partition)
                _low, high = consumer.get_watermark_offsets(tp, cached=True)
                if high < 0:
                    continue
                CONSUMER_LAG.labels(topic=tp.topic, partition=str(tp.partition)).set(
                    max(0, high - tp.offset))
        except Exception:  # noqa: BLE001 - a gauge must never break the loop that feeds it
            return
