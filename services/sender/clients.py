"""The sender's two Kafka clients: the consumer of the recipient topics (group `sender`) and
the producer of everything the sender publishes.

Guarantees: the consumer's prefetch is bounded (a few batches, whatever the backlog), the
broker evicts a member only when it is really stuck, and every member gets its share of
campaign.recipients; the producer is idempotent (a retry cannot double a delivery event) and
never gives a record up for time, so a delivery event waits out a broker outage of any length
and the flush before each commit waits for it (publisher.py).
"""

from __future__ import annotations

from confluent_kafka import Consumer, Producer

from services.common.kafka import consumer_config, producer_config
from services.common.settings import Settings

# Big enough that ledger round trips and the producer flush are paid once per hundreds of
# mails; small enough that a crash redelivers little.
BATCH_SIZE = 500
# Above the batch deadline plus one attempt's SMTP timeouts (see mailer.py, smtp_pool.py):
# the broker only evicts a sender that is really stuck.
MAX_POLL_INTERVAL_MS = 300_000
# The consumer's local prefetch queue: records per partition and an overall size cap. Bounds
# memory whatever the backlog; ~4 MiB is several batches of recipients, so a fetch round trip
# never leaves the SMTP threads without work.
PREFETCH_RECORDS_PER_PARTITION = BATCH_SIZE
PREFETCH_KBYTES = 4096
# Per fetch response: per partition and overall (librdkafka wants the overall size at least
# its message.max.bytes, 1 MB by default).
FETCH_PARTITION_BYTES = 256 * 1024
FETCH_MAX_BYTES = 2 * 1024 * 1024
# A fetch is answered once this much is ready, or after FETCH_WAIT_MS: otherwise, while the
# hydrator streams recipients in, the broker answers each fetch as soon as a single record
# arrives; ~64 KiB is a few hundred recipients, and 100 ms is nothing next to a batch.
FETCH_MIN_BYTES = 64 * 1024
FETCH_WAIT_MS = 100
# A crashed sender's partitions wait this long before another sender takes them over: short,
# so a SIGKILLed instance stalls its recipients for seconds, not the broker's default 45 s.
SESSION_TIMEOUT_MS = 10_000


def recipients_consumer(settings: Settings) -> Consumer:
    """The consumer of campaign.recipients, its delay topics and its held topic."""
    return Consumer(consumer_config(
        settings,
        "sender",
        # Round-robin deals the partitions of each topic in turn, so every member gets its
        # share of campaign.recipients (cooperative-sticky balances only the total count over
        # all five topics: one member could own every recipients partition, and two senders
        # would mail no faster than one). The price is an eager rebalance, which the send
        # ledger makes safe.
        **{
            "partition.assignment.strategy": "roundrobin",
            "max.poll.interval.ms": MAX_POLL_INTERVAL_MS,
            "session.timeout.ms": SESSION_TIMEOUT_MS,
            "heartbeat.interval.ms": SESSION_TIMEOUT_MS // 3,
            # Prefetch a few batches, not librdkafka's default of 100,000 records per
            # partition up to 64 MiB: behind a large backlog that queue alone would make the
            # sender's memory grow with the campaign.
            "queued.min.messages": PREFETCH_RECORDS_PER_PARTITION,
            "queued.max.messages.kbytes": PREFETCH_KBYTES,
            # One fetch response is up to 1 MiB of compressed records per partition, which the
            # queue cap above does not bound: keep responses small too.
            "max.partition.fetch.bytes": FETCH_PARTITION_BYTES,
            "fetch.max.bytes": FETCH_MAX_BYTES,
            "fetch.min.bytes": FETCH_MIN_BYTES,
            "fetch.wait.max.ms": FETCH_WAIT_MS,
        },
    ))


def delivery_producer(settings: Settings) -> Producer:
    """The producer of delivery events, retry and throttle slots, parked, dead-lettered and
    suppression records."""
    # Shared settings: idempotent, acks=all, and the murmur2 partitioner that keeps
    # campaign-keyed topics co-partitioned; 0: no local timeout (see the module docstring).
    return Producer(producer_config(settings, **{"message.timeout.ms": 0}))
