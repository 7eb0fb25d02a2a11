"""The command gateway's outbox: accepted commands are stored in PostgreSQL first, and a relay
publishes them to campaign.commands in acceptance order.

Guarantees:
- Never lost: a command is acknowledged to the caller only once its row is committed, and the
  row is marked published only after the broker acknowledged it (acks=all), so a Kafka outage
  or an API restart at any moment leaves it pending, to be published when Kafka returns.
- In order: one relay at a time publishes (a PostgreSQL advisory lock elects it among API
  replicas), rows in `seq` order, and nothing new is produced while earlier rows await the
  broker's acknowledgement; the idempotent producer keeps each partition (campaign) in order.
- Not duplicated by retries: a row is handed to a producer once; that producer has no message
  timeout and retries it itself (idempotently) across an outage. The windows left (the relay
  dies after the broker's ack and before the mark, or a fatal producer error) republish the
  same envelope with the same command id, which the command handler ignores.
"""

from __future__ import annotations

import functools
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
import structlog
from confluent_kafka import KafkaError, Message, Producer

from schemas.contacts import contact_key
from schemas.envelope import Envelope, encode
from services.common.kafka import make_producer
from services.common.settings import Settings
from services.common.topics import COMMANDS, CONTACTS, topic_name

# Rows per publish round: bounds the work redone after a failed round.
RELAY_BATCH = 200
# How long a round waits for the broker's acknowledgements before calling Kafka unreachable.
RELAY_ACK_TIMEOUT_S = 5.0
# Pause after a failed round (Kafka or PostgreSQL down), so neither is hammered.
RELAY_BACKOFF_S = 1.0
# How often an idle relay looks for rows another replica's API accepted (its own wake it).
RELAY_IDLE_POLL_S = 1.0
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
    one-click unsubscribes) under the settings' prefix; `start()` runs it in a daemon thread."""

    def __init__(self, settings: Settings, *, logger: Any = None) -> None:
        self.settings = settings
        self.topic = topic_name(COMMANDS, settings)
        self.contacts_topic = topic_name(CONTACTS, settings)
        self._log = logger or structlog.get_logger().bind(component="outbox-relay")
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._producer: Producer | None = None
        self._leader = False  # holds the advisory lock on self._conn
        # Rows handed to the current producer and not yet acknowledged / acknowledged but not
        # yet marked: never produced again while this producer lives.
        self._outstanding: set[int] = set()
        self._acked: set[int] = set()
        self._fatal: str | None = None
        self.published = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox-relay", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._drop_connection()
        self._drop_producer()

    def wake(self) -> None:
        """A command was accepted: publish now rather than at the next idle poll."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                moved = self.publish_pending() if self._leading() else 0
            except psycopg.Error as exc:
                self._log.warning("outbox unavailable; retrying", error=str(exc))
                self._drop_connection()
                self._stop.wait(RELAY_BACKOFF_S)
                continue
            if moved < 0:  # Kafka did not acknowledge everything
                self._stop.wait(RELAY_BACKOFF_S)
            elif moved == 0:
                # Not leading, or nothing pending: sleep until woken or the next look.
                self._wake.wait(RELAY_IDLE_POLL_S)
                self._wake.clear()

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
            row = self._connection().execute(
                "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (_RELAY_LOCK_KEY, self.topic)
            ).fetchone()
            self._leader = bool(row and row[0])
        return self._leader

    def _producer_for_round(self) -> Producer:
        if self._producer is None:
            # No message timeout: a record handed to the producer is retried until the broker
            # takes it, across any outage, and never handed over a second time (a second
            # produce() of the same row is what would duplicate it).
            self._producer = make_producer(
                self.settings, **{"linger.ms": 1, "message.timeout.ms": 0})
            self._outstanding.clear()
            self._acked.clear()
        return self._producer

    def _drop_producer(self) -> None:
        if self._producer is not None:
            # Only at shutdown or after a fatal producer error: what it did not deliver stays
            # pending in the outbox and is produced again by the next producer.
            self._producer.flush(0)
            self._producer = None
            self._outstanding.clear()
            self._acked.clear()

    def publish_pending(self) -> int:
        """One round: returns rows marked published, or -1 while Kafka has not acknowledged
        what was handed to it (nothing new is produced until it has, so order holds)."""
        conn = self._connection()
        producer = self._producer_for_round()
        producer.flush(RELAY_ACK_TIMEOUT_S)
        if self._fatal is not None:
            self._log.warning("producer failed; starting a new one", error=self._fatal)
            self._fatal = None
            self._drop_producer()
            return -1
        marked = self._mark_acknowledged(conn)
        if self._outstanding:
            self._log.warning("Kafka has not acknowledged every command yet; waiting",
                              pending=len(self._outstanding))
            return -1
        rows = conn.execute(
            "SELECT seq, topic, tenant_id, aggregate_id, envelope FROM command_outbox"
            " WHERE topic = ANY(%s) AND published_at IS NULL ORDER BY seq LIMIT %s",
            ([self.topic, self.contacts_topic], RELAY_BATCH)).fetchall()
        fresh = [row for row in rows if row[0] not in self._acked]
        if not fresh:
            return marked

        def on_delivery(seq: int, err: KafkaError | None, _msg: Message) -> None:
            self._outstanding.discard(seq)
            if err is None:
                self._acked.add(seq)
            else:  # only fatal errors end a delivery when messages never time out
                self._fatal = str(err)

        for seq, topic, tenant_id, aggregate_id, raw in fresh:
            # Keys as the catalogue says: commands by campaign, contact events by tenant+contact.
            key = (contact_key(tenant_id, aggregate_id) if topic == self.contacts_topic
                   else aggregate_id.encode())
            self._outstanding.add(seq)
            producer.produce(topic, key=key, value=bytes(raw),
                             on_delivery=functools.partial(on_delivery, seq))
        producer.flush(RELAY_ACK_TIMEOUT_S)
        marked += self._mark_acknowledged(conn)
        if self._outstanding:
            return -1
        return marked

    def _mark_acknowledged(self, conn: psycopg.Connection[Any]) -> int:
        """Mark the acknowledged rows published."""
        if not self._acked:
            return 0
        done = sorted(self._acked)
        conn.execute("UPDATE command_outbox SET published_at = now() WHERE seq = ANY(%s)", (done,))
        self._acked.difference_update(done)
        self.published += len(done)
        return len(done)
