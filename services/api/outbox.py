"""The command gateway's outbox: accepted commands are stored in PostgreSQL first, and a relay
publishes them to campaign.commands in acceptance order.

Guarantees:
- Never lost: a command is acknowledged to the caller only once its row is committed, and the
  row is marked published only after the Kafka transaction carrying it committed, so a Kafka
  outage or an API restart at any moment leaves it pending, to be published when Kafka returns.
- In order: one relay at a time publishes (a PostgreSQL session advisory lock elects it among
  API replicas), rows in `seq` order, one Kafka transaction per round, and a round starts only
  after the previous one committed and was marked; each campaign is one partition.
- Published once: every relay of a database uses the same transactional id, so a relay that
  starts a producer fences every earlier one (a dead leader's, or a leader that lost its
  PostgreSQL session and does not know yet): their open transactions are aborted and can never
  commit, and read_committed consumers (all of ours) never see them. The windows where a
  transaction commits but its rows are not marked (the relay dies in between, the commit's
  answer is lost) are closed by reconciliation: a new producer, once it has fenced the old
  ones, reads the topics from just before the oldest pending row's acceptance and marks the
  rows whose command ids it finds, before publishing anything.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
import structlog
from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition

from schemas.contacts import contact_key
from schemas.envelope import Envelope, encode
from services.common.kafka import make_producer, read_to_end, replay_reader
from services.common.metrics import OUTBOX_DEPTH, TRANSACTIONS, count_produced
from services.common.settings import Settings
from services.common.topics import COMMANDS, CONTACTS, topic_name

# Rows per publish round (one Kafka transaction): bounds the work redone after a failed round.
RELAY_BATCH = 200
# How long starting a producer (fencing the previous ones) or committing a round waits for the
# broker before the round counts as failed (Kafka unreachable); the producer is then dropped.
RELAY_TXN_TIMEOUT_S = 10.0
# The broker aborts a transaction left open this long: a leader that dies mid-round and has no
# successor to fence it does not hold back read_committed consumers of its topics for longer.
RELAY_TRANSACTION_TIMEOUT_MS = 60_000
# Pause after a failed round (Kafka or PostgreSQL down), so neither is hammered.
RELAY_BACKOFF_S = 1.0
# How often an idle relay looks for rows another replica's API accepted (its own wake it), and
# how often a follower tries for the leadership.
RELAY_IDLE_POLL_S = 1.0
# Reconciliation reads from this long before the oldest pending row's acceptance: a record's
# timestamp is its producer host's clock, acceptance is PostgreSQL's; this bounds the skew
# between them that reconciliation tolerates.
RECONCILE_CLOCK_SKEW = timedelta(minutes=5)
# A broker silent for this long during reconciliation fails the round (retried).
RECONCILE_IDLE_TIMEOUT_S = 30.0
# Arbitrary constant shared by every relay of this database: at most one publishes.
_RELAY_LOCK_KEY = 724_201_118


class CommandIdConflict(ValueError):
    """The command id was already accepted for a different command."""


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    command_id: uuid.UUID
    command_type: str
    aggregate_id: str
    accepted_at: datetime
    published_at: datetime | None


def accept(conn: psycopg.Connection[Any], envelope: Envelope, topic: str) -> OutboxEntry:
    """Store a command (idempotent on its id: the same command again returns the stored row;
    another command under the same id raises CommandIdConflict). Commits before returning."""
    raw = encode(envelope)
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO command_outbox (command_id, topic, tenant_id, aggregate_id,"
            " command_type, envelope) VALUES (%s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (command_id) DO NOTHING"
            " RETURNING command_id, command_type, aggregate_id, accepted_at, published_at",
            (envelope.id, topic, envelope.tenant_id, envelope.aggregate_id, envelope.type, raw),
        ).fetchone()
        if row is not None:
            return OutboxEntry(*row)
        stored = conn.execute(
            "SELECT tenant_id, topic, envelope FROM command_outbox WHERE command_id = %s",
            (envelope.id,)).fetchone()
    if stored is None or not _same_command(stored, envelope, topic):
        raise CommandIdConflict(f"command id {envelope.id} was already used for another command")
    entry = entry_of(conn, envelope.tenant_id, envelope.id)
    assert entry is not None
    return entry


def accept_many(conn: psycopg.Connection[Any], envelopes: Sequence[Envelope], topic: str) -> None:
    """Store events for `topic` in one transaction, in their order (all or none). Their ids
    are fresh, so nothing is deduplicated here. Commits before returning."""
    with conn.transaction(), conn.cursor() as cursor, cursor.copy(
            "COPY command_outbox (command_id, topic, tenant_id, aggregate_id, command_type,"
            " envelope) FROM STDIN") as copy:
        for envelope in envelopes:
            copy.write_row((envelope.id, topic, envelope.tenant_id, envelope.aggregate_id,
                            envelope.type, encode(envelope)))


def _same_command(stored: tuple[Any, ...], envelope: Envelope, topic: str) -> bool:
    tenant, stored_topic, raw = stored
    previous = Envelope.model_validate_json(bytes(raw))
    return (tenant, stored_topic, previous.type, previous.aggregate_id, previous.payload) == (
        envelope.tenant_id, topic, envelope.type, envelope.aggregate_id, envelope.payload)


def entry_of(conn: psycopg.Connection[Any], tenant_id: str, command_id: uuid.UUID
             ) -> OutboxEntry | None:
    row = conn.execute(
        "SELECT command_id, command_type, aggregate_id, accepted_at, published_at"
        " FROM command_outbox WHERE tenant_id = %s AND command_id = %s",
        (tenant_id, command_id)).fetchone()
    return OutboxEntry(*row) if row else None


class OutboxRelay:
    """Publishes pending outbox rows of its topics (campaign.commands, and contacts.events for
    one-click unsubscribes) under the settings' prefix; `start()` runs it in a daemon thread.
    Any number of relays may run against one database: one leads, the others wait."""

    def __init__(self, settings: Settings, *, logger: Any = None) -> None:
        self.settings = settings
        self.topic = topic_name(COMMANDS, settings)
        self.contacts_topic = topic_name(CONTACTS, settings)
        self.topics = [self.topic, self.contacts_topic]
        # Shared by every relay of these topics: what makes a new producer fence the old ones.
        self.transactional_id = settings.group("outbox-relay")
        self._log = logger or structlog.get_logger().bind(component="outbox-relay")
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._producer: Producer | None = None
        self._leader = False  # holds the advisory lock on self._conn
        self.published = 0
        self.reconciled = 0  # rows found already on the topic and marked without producing

    @property
    def leading(self) -> bool:
        return self._leader

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox-relay", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._drop_producer()
        self._drop_connection()

    def wake(self) -> None:
        """A command was accepted: publish now rather than at the next idle poll."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                moved = self.publish_pending() if self._leading() else 0
            except psycopg.Error as exc:
                # The session (and with it the lock) may be gone: a successor may lead already.
                self._log.warning("outbox unavailable; retrying", error=str(exc))
                self._drop_producer()
                self._drop_connection()
                self._stop.wait(RELAY_BACKOFF_S)
                continue
            except KafkaException as exc:
                self._log.warning("Kafka did not take the round; retrying", error=str(exc))
                self._drop_producer()
                self._measure_depth()  # what waits for Kafka is what an operator looks for
                self._stop.wait(RELAY_BACKOFF_S)
                continue
            except Exception:
                # A dead relay thread would leave every accepted command unpublished: log,
                # start over from a clean state, go on.
                self._log.exception("outbox relay round failed; retrying")
                self._drop_producer()
                self._drop_connection()
                self._stop.wait(RELAY_BACKOFF_S)
                continue
            if self._leader:
                self._measure_depth()
            if moved == 0:
                # Not leading, or nothing pending: sleep until woken or the next look.
                self._wake.wait(RELAY_IDLE_POLL_S)
                self._wake.clear()

    def _measure_depth(self) -> None:
        """The outbox depth gauge: pending rows (the partial index answers it)."""
        try:
            (depth,) = self._connection().execute(
                "SELECT count(*) FROM command_outbox WHERE topic = ANY(%s) AND published_at IS NULL",
                (self.topics,)).fetchone() or (0,)
        except psycopg.Error:
            return  # the next round reconnects; a gauge is not worth failing one
        OUTBOX_DEPTH.set(depth)

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._drop_connection()
            self._conn = psycopg.connect(self.settings.database_url, autocommit=True,
                                         application_name="outbox-relay")
        return self._conn

    def _drop_connection(self) -> None:
        self._leader = False
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _leading(self) -> bool:
        # Session-level lock: held while this connection lives; a relay that dies releases it.
        if not self._leader:
            self._drop_producer()  # never publish with a producer from an earlier leadership
            row = self._connection().execute(
                "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (_RELAY_LOCK_KEY, self.topic)
            ).fetchone()
            self._leader = bool(row and row[0])
        return self._leader

    def _drop_producer(self) -> None:
        # No flush and no commit: whatever transaction it has open is aborted by the broker,
        # at the latest when the next producer starts and fences it.
        self._producer = None

    def _ready_producer(self, conn: psycopg.Connection[Any]) -> Producer:
        if self._producer is None:
            # Still leading? (A session that died released the lock.) Fencing the producer of
            # a leader elected meanwhile would be safe, but would cost it a round.
            conn.execute("SELECT 1")
            producer = make_producer(self.settings, **{
                "transactional.id": self.transactional_id,
                "transaction.timeout.ms": RELAY_TRANSACTION_TIMEOUT_MS, "linger.ms": 1})
            # Fences every earlier producer of this id; returns once their open transactions
            # are aborted, so what reconciliation reads next is final.
            producer.init_transactions(RELAY_TXN_TIMEOUT_S)
            self.reconcile(conn)
            self._producer = producer
        return self._producer

    def reconcile(self, conn: psycopg.Connection[Any]) -> int:
        """Mark pending rows whose command already is on its topic (committed by an earlier
        producer whose relay did not get to mark it); returns how many."""
        oldest = conn.execute(
            "SELECT topic, min(accepted_at) FROM command_outbox"
            " WHERE topic = ANY(%s) AND published_at IS NULL GROUP BY topic ORDER BY topic",
            (self.topics,)).fetchall()
        if not oldest:
            return 0
        found: set[uuid.UUID] = set()

        def note(msg: Message) -> None:
            try:
                found.add(uuid.UUID(json.loads(msg.value() or b"{}")["id"]))
            except (ValueError, KeyError, TypeError):
                pass  # not an envelope (another producer's garbage): not one of ours

        with replay_reader(self.settings, f"{self.transactional_id}.reconcile") as reader:
            for topic, accepted_at in oldest:
                since_ms = int((accepted_at - RECONCILE_CLOCK_SKEW).timestamp() * 1000)
                partitions = reader.list_topics(topic, timeout=RELAY_TXN_TIMEOUT_S).topics[topic]
                if partitions.error is not None:
                    if partitions.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                        continue  # no such topic yet: nothing of ours can be on it
                    raise KafkaException(partitions.error)
                starts = reader.offsets_for_times(
                    [TopicPartition(topic, p, since_ms) for p in sorted(partitions.partitions)],
                    timeout=RELAY_TXN_TIMEOUT_S)
                for start in starts:
                    if start.offset >= 0:  # -1: nothing written since
                        read_to_end(reader, topic, start.partition, start.offset, note,
                                    idle_timeout=RECONCILE_IDLE_TIMEOUT_S)
        if not found:
            return 0
        marked = conn.execute(
            "UPDATE command_outbox SET published_at = now() WHERE topic = ANY(%s)"
            " AND published_at IS NULL AND command_id = ANY(%s)",
            (self.topics, list(found))).rowcount
        if marked:
            self._log.warning("outbox rows already on the topic; marked without republishing",
                              rows=marked)
        self.reconciled += marked
        return marked

    def publish_pending(self) -> int:
        """One round: the oldest pending rows in one Kafka transaction, then marked published;
        returns how many. Raises KafkaException when Kafka did not take them (nothing marked)."""
        conn = self._connection()
        producer = self._ready_producer(conn)
        rows = conn.execute(
            "SELECT seq, topic, tenant_id, aggregate_id, envelope FROM command_outbox"
            " WHERE topic = ANY(%s) AND published_at IS NULL ORDER BY seq LIMIT %s",
            (self.topics, RELAY_BATCH)).fetchall()
        if not rows:
            return 0
        producer.begin_transaction()
        for _seq, topic, tenant_id, aggregate_id, raw in rows:
            # Keys as the catalogue says: commands by campaign, contact events by tenant+contact.
            key = (contact_key(tenant_id, aggregate_id) if topic == self.contacts_topic
                   else aggregate_id.encode())
            producer.produce(topic, key=key, value=bytes(raw))
            count_produced(topic)
        producer.commit_transaction(RELAY_TXN_TIMEOUT_S)
        TRANSACTIONS.labels(result="committed").inc()
        conn.execute("UPDATE command_outbox SET published_at = now() WHERE seq = ANY(%s)",
                     ([r[0] for r in rows],))
        self.published += len(rows)
        return len(rows)
