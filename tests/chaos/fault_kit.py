"""Parts shared by the infrastructure-fault scenarios (broker, database, relay, service kills).

- `PrivateKafka` / `PrivatePostgres`: a broker or a PostgreSQL server of the test's own, on
  free ports picked by the kernel and a state folder under the test's tmp path, so a scenario
  can SIGKILL or stop it without touching the shared platform; stopped at the end (only what
  the fixture started).
- `Services`: the services as real OS processes (tests/service_process.py), with kill,
  restart, liveness checks and a timed SIGTERM stop.
- `EventWatch`: a read_committed reader of campaign.events on a background thread, which
  notes when each record became visible (the times the scenarios measure).
- `Campaign`: a campaign driven through the command topic; the test plays the hydrator (it
  publishes the recipients and CampaignHydrated), so a scenario depends only on the services
  under test.
- `check_delivery`: the exact checks on the sink's record and the send ledger: nobody lost,
  nobody outside the campaign, duplicates never above the ambiguous outcomes counted.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar, cast

import psycopg
from confluent_kafka import Consumer

from projections.migrate import apply_migrations
from schemas.base import Record
from schemas.commands import CreateCampaign, SendCampaign
from schemas.envelope import Envelope, Message, SchemaViolation, decode, encode, wrap
from schemas.events import CampaignHydrated, MessageTemplate, RecipientQueued
from services.common.kafka import make_producer
from services.common.settings import Settings
from services.common.topics import COMMANDS, EVENTS, RECIPIENTS, ensure_topics, topic_name
from services.platform.kafka import KafkaNode
from services.platform.postgres import PostgresServer, _as_postgres, postgres_bin
from services.smtp_sink import SmtpSink, header
from tests.service_process import ServiceProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")

# Scenario sizes: a few hundred recipients fit CI; CHAOS_RECIPIENTS raises them.
RECIPIENTS_N = int(os.environ.get("CHAOS_RECIPIENTS", "300"))
# How long a campaign should take to mail (the sink's latency is set from it), so that a
# fault injected at a third of it really lands mid-campaign.
CAMPAIGN_SECONDS = float(os.environ.get("CHAOS_CAMPAIGN_SECONDS", "12"))
SENDER_CONCURRENCY = 8
# A service asked to stop must be gone within this (SIGTERM honoured in every state).
STOP_BOUND_SECONDS = 10.0
TENANT = "chaos"
# Fast retries: a deferral after a fault is retried within a second, not after 30 s.
SERVICE_ENV = {
    "SENDER_RETRY_BASE_SECONDS": "0.2",
    "SENDER_RETRY_MAX_DELAY_SECONDS": "1.0",
    "SENDER_CONCURRENCY": str(SENDER_CONCURRENCY),
}


def free_port() -> int:
    """A port nobody listens on now (the kernel's pick for a bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sink_latency_ms(recipients: int) -> float:
    """Per-message latency that makes `recipients` mails last about CAMPAIGN_SECONDS."""
    return max(2.0, 1000.0 * CAMPAIGN_SECONDS * SENDER_CONCURRENCY / max(1, recipients))


# --- private platform parts ----------------------------------------------------------------


class PrivateKafka:
    """A single-node broker of the test's own; `kill` is a SIGKILL, `start` restarts it on the
    same ports and data."""

    def __init__(self, state_dir: Path) -> None:
        self.node = KafkaNode(state_dir, free_port(), free_port(),
                              REPO_ROOT / ".state" / "kafka-libs")

    @property
    def bootstrap(self) -> str:
        return self.node.bootstrap

    def start(self) -> float:
        """Start (or restart) and wait until it answers; returns the seconds it took."""
        began = time.monotonic()
        self.node.start()
        return time.monotonic() - began

    def kill(self) -> None:
        pid = self.node.process.pid()
        assert pid is not None, "private broker not running"
        os.kill(pid, signal.SIGKILL)
        try:
            os.waitpid(pid, 0)  # our child: reap it, so its ports are free for the restart
        except ChildProcessError:
            while self.node.process.pid() is not None:
                time.sleep(0.05)

    def stop(self) -> None:
        self.node.stop()


class PrivatePostgres:
    """A PostgreSQL server of the test's own, with the project's migrations applied;
    `stop_immediately` is `pg_ctl stop -m immediate` (every backend killed, no checkpoint)."""

    def __init__(self, state_dir: Path) -> None:
        # Durable: an immediate stop must not lose committed transactions (the throwaway
        # test clusters run with synchronous_commit off, which loses the last ones).
        self.server = PostgresServer(state_dir, free_port(), durable=True)
        self.url = ""

    def start(self) -> None:
        self.server.start()
        self.url = self.server.create_database("campaigns")
        apply_migrations(self.url)

    def restart(self) -> float:
        """Start again after a stop; returns the seconds until it took connections."""
        began = time.monotonic()
        self.server.start()
        return time.monotonic() - began

    def stop_immediately(self) -> None:
        subprocess.run(
            _as_postgres([str(postgres_bin() / "pg_ctl"), "-D", str(self.server.data),
                          "-m", "immediate", "-w", "stop"]),
            check=True, stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        self.server.stop()


def isolated(settings: Settings, **changes: object) -> Settings:
    """`settings` with a fresh topic prefix (and `changes`), its topics created."""
    fresh = settings.replace(topic_prefix=f"c{uuid.uuid4().hex[:10]}.", **changes)
    ensure_topics(fresh)
    return fresh


# --- services as processes -----------------------------------------------------------------


@dataclass
class Stopped:
    code: int | None
    seconds: float


class Services:
    """The services of a scenario as OS processes, by module name under services/."""

    def __init__(self, settings: Settings, log_dir: Path, names: Iterable[str],
                 **env: str) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.env = {**SERVICE_ENV, **env}
        self.procs: dict[str, ServiceProcess] = {}
        self.generation: Counter[str] = Counter()
        for name in names:
            self.start(name)

    def start(self, name: str) -> ServiceProcess:
        self.generation[name] += 1
        proc = ServiceProcess(name, self.settings, self.log_dir / f"gen{self.generation[name]}",
                              **self.env)
        self.procs[name] = proc.start()
        return proc

    def kill(self, name: str) -> None:
        self.procs[name].kill()

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            assert proc.proc is not None
            code = proc.proc.poll()
            assert code is None, f"{name} died (exit {code}):\n{proc.log_tail(80)}"

    def stop_all(self) -> dict[str, Stopped]:
        """SIGTERM every service at once; how each ended and how long it took."""
        began = time.monotonic()
        for proc in self.procs.values():
            if proc.proc is not None and proc.proc.poll() is None:
                proc.proc.send_signal(signal.SIGTERM)
        out: dict[str, Stopped] = {}
        for name, proc in self.procs.items():
            assert proc.proc is not None
            try:
                proc.proc.wait(STOP_BOUND_SECONDS * 3)
            except subprocess.TimeoutExpired:
                proc.proc.send_signal(signal.SIGUSR1)  # faulthandler: every thread's stack
                time.sleep(1.0)
                proc.proc.kill()
                proc.proc.wait(10)
                out[name] = Stopped(None, time.monotonic() - began)
                continue
            out[name] = Stopped(proc.proc.returncode, time.monotonic() - began)
        return out

    def logs(self, name: str, lines: int = 60) -> str:
        return self.procs[name].log_tail(lines)

    def stacks(self, name: str, lines: int = 120) -> str:
        """The log's tail after asking a running service for every thread's stack."""
        proc = self.procs[name].proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGUSR1)
            time.sleep(1.0)
        return self.logs(name, lines)


def wait_for(condition: Callable[[], T | None], timeout: float, what: str,
             services: Services | None = None, poll: float = 0.1) -> T:
    """`condition()` once truthy; fails after `timeout` (or as soon as a service died)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if services is not None:
            services.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


# --- campaign.events, as read_committed readers see it -------------------------------------


@dataclass
class Seen:
    message: Message[Record]
    at: float  # time.monotonic() when the reader received it


class EventWatch:
    """Every committed record of campaign.events, with the moment it became visible here."""

    def __init__(self, settings: Settings) -> None:
        self._consumer = Consumer({
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": f"watch-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "fetch.wait.max.ms": 50,
            "log_level": 0,  # connection noise while a broker is down is expected
        })
        self._consumer.subscribe([topic_name(EVENTS, settings)])
        self._lock = threading.Lock()
        self._seen: list[Seen] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="event-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for record in self._consumer.consume(500, 0.1):
                    error = record.error()
                    if error is not None:
                        if error.fatal():
                            raise RuntimeError(error)
                        continue
                    try:
                        message = decode(record.value())
                    except SchemaViolation:
                        continue
                    with self._lock:
                        self._seen.append(Seen(message, time.monotonic()))
        finally:
            self._consumer.close()

    def where(self, predicate: Callable[[Message[Record]], bool]) -> list[Seen]:
        with self._lock:
            return [s for s in self._seen if predicate(s.message)]

    def of_type(self, kind: type[Record], campaign_id: str | None = None) -> list[Seen]:
        return self.where(lambda m: isinstance(m.payload, kind)
                          and (campaign_id is None or m.envelope.aggregate_id == campaign_id))

    def caused_by(self, command_id: uuid.UUID) -> list[Seen]:
        return self.where(lambda m: m.envelope.causation_id == command_id)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


# --- commands and the campaign -------------------------------------------------------------


def command(payload: Record, campaign_id: str) -> Envelope:
    return wrap(payload, tenant_id=TENANT, aggregate_id=campaign_id)


class CommandStream:
    """Publishes a CreateCampaign for a new campaign every `interval` seconds on a background
    thread, through a producer that keeps records while the broker is away; remembers every
    command id, so each can be checked for exactly-once acceptance."""

    def __init__(self, settings: Settings, interval: float = 0.1) -> None:
        # Never given up locally: a command produced during an outage goes out after it.
        self._producer = make_producer(settings, **{"message.timeout.ms": 600_000,
                                                    "log_level": 0})
        self._topic = topic_name(COMMANDS, settings)
        self._interval = interval
        self._lock = threading.Lock()
        self.sent: list[tuple[uuid.UUID, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="commands", daemon=True)

    def start(self) -> CommandStream:
        self._thread.start()
        return self

    def publish_one(self) -> uuid.UUID:
        campaign = f"cmd-{uuid.uuid4().hex[:12]}"
        envelope = command(CreateCampaign(name="stream", subject="s", from_address="a@example.com",
                                          body_text="b"), campaign)
        self._producer.produce(self._topic, key=campaign.encode(), value=encode(envelope))
        self._producer.poll(0)
        with self._lock:
            self.sent.append((envelope.id, time.monotonic()))
        return envelope.id

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.publish_one()

    def stop(self, *, check: bool = True) -> list[tuple[uuid.UUID, float]]:
        """Stop publishing; with `check`, wait until the broker acknowledged every command."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        left = self._producer.flush(120 if check else 1)
        assert left == 0 or not check, "commands left unacknowledged by the broker"
        with self._lock:
            return list(self.sent)


TEMPLATE = MessageTemplate(subject="Hello {{ first_name }}", from_address="news@example.com",
                           body_text="Hi {{ first_name }}")


@dataclass
class Campaign:
    """A campaign of `size` recipients, sent through the command topic; the test plays the
    hydrator (recipients + CampaignHydrated), as it would fan out a list of `size` contacts."""

    size: int
    id: str = field(default_factory=lambda: f"cmp-{uuid.uuid4().hex[:12]}")

    @property
    def emails(self) -> set[str]:
        return {f"p{i}.{self.id}@example.org" for i in range(self.size)}

    def send(self, settings: Settings) -> None:
        """CreateCampaign + SendCampaign on the command topic."""
        producer = make_producer(settings)
        topic = topic_name(COMMANDS, settings)
        create = CreateCampaign(name="Chaos", subject=TEMPLATE.subject,
                                from_address=TEMPLATE.from_address, body_text=TEMPLATE.body_text)
        for payload in (create, SendCampaign(list_ids=["all"])):
            producer.produce(topic, key=self.id.encode(), value=encode(command(payload, self.id)))
        assert producer.flush(30) == 0

    def hydrate(self, settings: Settings) -> None:
        """The recipients on campaign.recipients and CampaignHydrated on campaign.events."""
        producer = make_producer(settings)
        recipients = topic_name(RECIPIENTS, settings)
        for i in range(self.size):
            contact = f"ct-{i}"
            queued = RecipientQueued(campaign_id=self.id, contact_id=contact,
                                     email=f"p{i}.{self.id}@example.org", first_name=f"P{i}",
                                     template=TEMPLATE)
            producer.produce(recipients, key=f"{TENANT}:{contact}".encode(),
                             value=encode(wrap(queued, tenant_id=TENANT, aggregate_id=self.id)))
            producer.poll(0)
        hydrated = wrap(CampaignHydrated(total=self.size), tenant_id=TENANT, aggregate_id=self.id)
        producer.produce(topic_name(EVENTS, settings), key=self.id.encode(), value=encode(hydrated))
        assert producer.flush(30) == 0

    def mails(self, sink: SmtpSink) -> list[dict[str, object]]:
        return [m for m in sink.messages if header(m, "X-Campaign-ID") == self.id]

    def mailed(self, sink: SmtpSink) -> int:
        return len({r for m in self.mails(sink) for r in m["rcpt_tos"]})  # type: ignore[attr-defined]


@dataclass
class Delivery:
    recipients: int
    duplicates: int
    ambiguous: int
    unsettled: int


def check_delivery(campaign: Campaign, sinks: Iterable[SmtpSink], database_url: str) -> Delivery:
    """Nobody lost, nobody foreign, every ledger row settled, duplicates <= ambiguous."""
    by_rcpt: Counter[str] = Counter()
    for sink in sinks:
        for mail in campaign.mails(sink):
            by_rcpt.update(cast(list[str], mail["rcpt_tos"]))
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*), coalesce(sum(ambiguous), 0), count(*) FILTER (WHERE status <> 'sent')"
            " FROM send_ledger WHERE campaign_id = %s", (campaign.id,)).fetchone()
    assert row is not None
    rows, ambiguous, unsettled = int(row[0]), int(row[1]), int(row[2])
    duplicates = sum(c - 1 for c in by_rcpt.values())
    lost = campaign.emails - set(by_rcpt)
    assert not lost, f"{len(lost)} recipients never mailed, e.g. {sorted(lost)[:3]}"
    assert set(by_rcpt) == campaign.emails, "mail to an address outside the campaign"
    assert rows == campaign.size and unsettled == 0, f"ledger: {rows} rows, {unsettled} not sent"
    assert duplicates <= ambiguous, f"{duplicates} duplicates but {ambiguous} ambiguous counted"
    return Delivery(len(by_rcpt), duplicates, ambiguous, unsettled)


def ledger_ambiguous(database_url: str, campaign_id: str) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute("SELECT coalesce(sum(ambiguous), 0) FROM send_ledger"
                           " WHERE campaign_id = %s", (campaign_id,)).fetchone()
    return int(row[0]) if row else 0

