"""A topic every sender instance reads whole, on a background thread: the base of the control
and do-not-mail feeds.

Guarantees:
- Reads every partition of the topic from the beginning (assigned, not a group member,
  nothing committed; committed records only), so each instance sees every fact, whichever
  recipients partitions it owns.
- `caught_up` is set once every partition was read up to its end as of start: a sender that
  waits for it acts on everything published before it started.
- Facts published later arrive within tens of milliseconds of their commit: the broker
  answers a waiting fetch as soon as a commit makes records readable, whatever FEED_WAIT_MS
  (measured: ~50 ms after commit_transaction() returned, with a 100 ms and a 500 ms wait
  alike), which keeps a pause well within one second.
- A failure stops the feed and is kept in `error`: the sender then stops, never mails blind.
- `stop()` returns within STOP_SECONDS, the broker away included: the consumer's close is
  bounded and left behind when it does not return.
"""

from __future__ import annotations

import threading

import structlog
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from services.common.kafka import CLIENT_LOG, CLOSE_BOUND_SECONDS, close_within, is_fatal
from services.common.settings import Settings
from services.common.topics import TopicSpec, topic_name

log = structlog.get_logger("sender.feed")

# How long the broker holds a fetch while nothing arrives: only the idle polling rate (a
# commit answers a waiting fetch at once). 100 ms made each idle feed ask ten times a second
# across all its partitions, a steady load on the broker for nothing.
FEED_WAIT_MS = 500
# Metadata and poll timeouts of a feed: guards against a broker that does not answer.
METADATA_TIMEOUT_SECONDS = 30.0
POLL_SECONDS = 0.2
# One poll, then the consumer's bounded close.
STOP_SECONDS = POLL_SECONDS + CLOSE_BOUND_SECONDS + 0.5


class TopicFeed:
    """Reads all of one topic and hands each committed record to `apply` (subclasses)."""

    def __init__(self, settings: Settings, spec: TopicSpec, name: str) -> None:
        self.caught_up = threading.Event()
        self._topic = topic_name(spec, settings)
        self._name = name
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._pending: set[int] = set()
        self._consumer = Consumer({
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "logger": CLIENT_LOG,
            # Required by the client, never used: the feed assigns and never commits.
            "group.id": f"{settings.group('sender')}-{name}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "fetch.wait.max.ms": FEED_WAIT_MS,
        })
        self._thread = threading.Thread(target=self._run, name=f"sender-{name}", daemon=True)

    @property
    def error(self) -> BaseException | None:
        """Why the feed stopped, if it failed (the sender must then stop too)."""
        return self._error

    def start(self) -> None:
        metadata = self._consumer.list_topics(self._topic, timeout=METADATA_TIMEOUT_SECONDS)
        partitions = sorted(metadata.topics[self._topic].partitions)
        self._pending = set(partitions)
        self._consumer.assign([TopicPartition(self._topic, p, OFFSET_BEGINNING) for p in partitions])
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the feed to stop; `stop()` waits for it."""
        self._stop.set()

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def apply(self, record: Message) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for record in self._consumer.consume(500, POLL_SECONDS):
                    self._read(record)
        except BaseException as exc:  # reported through `error`; the sender stops on it
            self._error = exc
            log.exception("feed failed", feed=self._name)
        finally:
            close_within(self._consumer.close, f"sender {self._name} feed")

    def _read(self, record: Message) -> None:
        error = record.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                self._pending.discard(record.partition() or 0)
                if not self._pending:
                    self.caught_up.set()
                return
            if is_fatal(error):
                raise KafkaException(error)
            log.warning("feed error", feed=self._name, error=str(error))
            return
        self.apply(record)
