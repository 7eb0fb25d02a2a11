"""Thin confluent-kafka adapters: the client settings every service shares, and transactions
that never hang.

All producers use the murmur2 partitioner (Java's default), so a key lands on the same
partition whichever client wrote it, and topics keyed by campaign id stay co-partitioned.

`TransactionalProducer` bounds every transactional call and handles its failures by
confluent-kafka's rules (see `transaction_step`, pure): it guarantees that a transaction
either commits, or raises `TransactionFailed` once its fate is settled (aborted, or fenced by
a fresh producer), so the caller can rewind to the committed offsets and redo the batch, or
raises `Stopping` when a stop was requested while the broker did not answer (the transaction
is then left to the broker's timeout or to the successor's init_transactions, which aborts
it). It never blocks longer than one call timeout without looking at the stop flag.

`read_until` is the one replay loop: it feeds the committed records of some partitions up to
given offsets or to their ends, finds an end that lies past a transaction marker, gives up on
a silent broker after an idle bound and on a stop request at once.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import structlog
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from services.common import metrics
from services.common.settings import Settings

T = TypeVar("T")
# Where a record lives: (topic, partition). The one name for it across the engine.
PartitionKey = tuple[str, int]

# One transactional call (init, send offsets, commit, abort) blocks at most this long before
# the stop flag is looked at again: guards against a broker that went away mid-call (librdkafka
# otherwise waits for the whole transaction timeout, or for ever with the default -1).
TXN_CALL_TIMEOUT_SECONDS = 2.0
# A call that keeps failing retriably (timeouts while the broker is away) is retried this
# long, then the transaction is aborted (and, when the abort cannot finish either, the
# producer is re-created): a client stuck on a request that never completes must not stall
# the service silently.
TXN_RETRY_BUDGET_SECONDS = 30.0
# A transactional call that has not returned this long after its own timeout is hung (it does
# happen: librdkafka's send_offsets_to_transaction ignores its timeout while the group
# coordinator is away, and may never return, confluentinc/librdkafka#5456): it is left behind
# on its thread and the producer re-created.
TXN_HANG_GRACE_SECONDS = 3.0
# Back-off between attempts of a call that failed at once (connection refused, no
# coordinator), and between attempts of a read that failed: no busy loop during an outage.
RETRY_BACKOFF_SECONDS = (0.2, 0.5, 1.0, 2.0)
# Single-instance services (command handler, completion tracker) join their group as static
# members and leave it only by this timeout: a crashed member's replacement, with the same
# instance id, takes its partitions at once, and any other one within this.
SINGLE_INSTANCE_SESSION_TIMEOUT_MS = 10_000


# librdkafka's own lines (a broker connection failed, a request timed out) go through this
# stdlib logger, so they come out as JSON lines like every other (services/common/logs.py),
# not raw on stderr. librdkafka hands them over in the client's poll(): producers and
# consumers poll all the time; a long-lived AdminClient must be polled (`serve_logs`).
CLIENT_LOG = logging.getLogger("librdkafka")

# A consumer's close() waits for its group coordinator; while the broker is away, for ever.
CLOSE_BOUND_SECONDS = 5.0

# librdkafka's longest pause between reconnect attempts to a broker that went away (default
# 10 s): after a broker restart, clients are back within about a second, not ten.
RECONNECT_BACKOFF_MAX_MS = 1_000


def client_config(bootstrap_servers: str, **overrides: Any) -> dict[str, Any]:
    """What every client of the engine shares: the brokers, quick reconnects, logs as JSON."""
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap_servers,
        "reconnect.backoff.max.ms": RECONNECT_BACKOFF_MAX_MS,
        "logger": CLIENT_LOG,
    }
    config.update(overrides)
    return config


def make_admin(bootstrap_servers: str, **overrides: Any) -> AdminClient:
    return AdminClient(client_config(bootstrap_servers, **overrides))


def serve_logs(admin: AdminClient) -> None:
    """Hand an AdminClient's queued librdkafka log lines to `CLIENT_LOG` (nothing else is
    queued for it: its calls answer through futures)."""
    admin.poll(0)


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    return client_config(settings.kafka_bootstrap_servers, **{
        "partitioner": "murmur2_random",
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
        **overrides,
    })


def consumer_config(settings: Settings, group: str, **overrides: Any) -> dict[str, Any]:
    return client_config(settings.kafka_bootstrap_servers, **{
        "group.id": settings.group(group),
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        # Never read records of aborted or still-open transactions.
        "isolation.level": "read_committed",
        **overrides,
    })


def make_producer(settings: Settings, **overrides: Any) -> Producer:
    return Producer(producer_config(settings, **overrides))


def make_consumer(settings: Settings, group: str, **overrides: Any) -> Consumer:
    return Consumer(consumer_config(settings, group, **overrides))


def partition_reader(settings: Settings, group: str, **overrides: Any) -> Consumer:
    """A consumer for `read_until`: assigned by hand (the group id only names it), committed
    records only, reporting the end of a partition."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "logger": CLIENT_LOG,
        "group.id": group,
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
        "enable.partition.eof": True,
        # The end of a partition is noticed after this long, not the default 500 ms.
        "fetch.wait.max.ms": 10,
    }
    config.update(overrides)
    return Consumer(config)


@contextlib.contextmanager
def replay_reader(settings: Settings, group: str) -> Iterator[Consumer]:
    """A `partition_reader` for one read, closed when the block ends within
    CLOSE_BOUND_SECONDS (with the broker away its close may never return)."""
    reader = partition_reader(settings, group)
    try:
        yield reader
    finally:
        close_within(reader.close, group)


# How long one poll waits before the stop flag and the idle bound are looked at again.
READ_POLL_SECONDS = 0.2
# Records taken at once from what the reader has fetched already (never waited for).
READ_BATCH = 500


def read_until(
    reader: Consumer, ends: Mapping[PartitionKey, int], on_message: Callable[[Message], None],
    *, starts: Mapping[PartitionKey, int] | None = None, idle_timeout: float,
    stop: threading.Event | None = None, on_progress: Callable[[], None] | None = None,
) -> dict[PartitionKey, int]:
    """Feed `on_message` the records of each (topic, partition) of `ends`, in order, from its
    start (`starts`, else its beginning) up to its end offset, exclusive, or, for OFFSET_END,
    up to the partition's end (for read_committed readers the last stable offset: an open
    transaction's records are not reached). Returns each partition's next offset: past the
    last record fed, or where the broker says the partition ends when that is further (past
    a transaction marker, never delivered as a record), never past the end given.

    A partition is done at its last record before the end, at a record at or past the end
    (not fed), or at the broker's end-of-partition event: the only sign when the end lies
    past a marker. Records of a done partition are not fed. `on_progress()` runs whenever a
    poll brought something (a heartbeat: a long read is not a stuck loop). Raises
    KafkaException(_TIMED_OUT) when the broker says nothing for `idle_timeout` seconds,
    KafkaException for an error the reader reports, Stopping as soon as `stop` is set. The
    reader (see `partition_reader`) is assigned the partitions and unassigned at the end."""
    starts = starts or {}
    positions = {where: max(starts.get(where, OFFSET_BEGINNING), 0) for where in ends}
    pending = {where for where, end in ends.items() if end == OFFSET_END or end > positions[where]}
    if not pending:
        return positions
    reader.assign([TopicPartition(t, p, starts.get((t, p), OFFSET_BEGINNING))
                   for t, p in sorted(pending)])
    try:
        deadline = time.monotonic() + idle_timeout
        while pending:
            if stop is not None and stop.is_set():
                raise Stopping(f"reading {_named(pending)}")
            first = reader.poll(READ_POLL_SECONDS)
            if first is None:
                if time.monotonic() >= deadline:
                    raise KafkaException(KafkaError(KafkaError._TIMED_OUT,
                                                    f"{_named(pending)} silent"))
                continue
            deadline = time.monotonic() + idle_timeout
            if on_progress is not None:
                on_progress()
            for msg in [first, *reader.consume(READ_BATCH, 0)]:
                error = msg.error()
                if error is not None and error.code() != KafkaError._PARTITION_EOF:
                    raise KafkaException(error)
                where = (msg.topic() or "", msg.partition() or 0)
                if where not in pending:
                    continue
                end, offset = ends[where], msg.offset() or 0
                if error is not None:  # the partition's end
                    reached = offset if end == OFFSET_END else min(offset, end)
                    positions[where] = max(positions[where], reached)
                    pending.discard(where)
                elif end != OFFSET_END and offset >= end:
                    positions[where] = end
                    pending.discard(where)
                else:
                    positions[where] = offset + 1
                    on_message(msg)
                    if end != OFFSET_END and offset + 1 >= end:
                        pending.discard(where)
    finally:
        reader.unassign()
    return positions


def read_to_end(
    reader: Consumer, topic: str, partition: int, start: int, on_message: Callable[[Message], None],
    *, idle_timeout: float = 30.0, stop: threading.Event | None = None,
) -> int:
    """`read_until` for one partition, from `start` to its end; returns its next offset."""
    where = (topic, partition)
    return read_until(reader, {where: OFFSET_END}, on_message, starts={where: start},
                      idle_timeout=idle_timeout, stop=stop)[where]


def _named(partitions: Iterable[PartitionKey]) -> str:
    return ", ".join(f"{t}[{p}]" for t, p in sorted(partitions))


# --- single-instance services ----------------------------------------------------------------


def static_member_config(settings: Settings, group: str, instance: str) -> dict[str, Any]:
    """Consumer settings of a static group member named `instance`, with a short session."""
    return {
        "group.instance.id": f"{settings.group(group)}-{instance}",
        "session.timeout.ms": SINGLE_INSTANCE_SESSION_TIMEOUT_MS,
        "heartbeat.interval.ms": SINGLE_INSTANCE_SESSION_TIMEOUT_MS // 4,
    }


# --- transactions ------------------------------------------------------------------------------


class TxnCall(enum.Enum):
    """The transactional calls of a producer."""

    INIT = "init_transactions"
    BEGIN = "begin_transaction"
    SEND_OFFSETS = "send_offsets_to_transaction"
    COMMIT = "commit_transaction"
    ABORT = "abort_transaction"


class TxnStep(enum.Enum):
    """What to do after a transactional call failed."""

    RETRY = "retry"  # call it again (the operation may go on in the background)
    ABORT = "abort"  # abort the transaction, rewind to the committed offsets, redo the batch
    RECREATE = "recreate"  # the producer is unusable: a new one (init_transactions fences the old)


def is_fatal(error: KafkaError) -> bool:
    """The client instance is unusable and must be replaced. A consumer's fatal error (a static
    member fenced, say) reaches consume() as a record error of code _FATAL whose fatal() is
    False: confluent-kafka sets that flag only on errors it builds from rd_kafka_fatal_error."""
    return bool(error.fatal()) or error.code() == KafkaError._FATAL


def fatal_error(exc: KafkaException) -> KafkaError | None:
    """The fatal error `exc` carries (see `is_fatal`), else None."""
    error = exc.args[0] if exc.args else None
    return error if isinstance(error, KafkaError) and is_fatal(error) else None


def replace_consumer(old: Consumer, make: Callable[[], Consumer], error: KafkaError, *,
                     logger: Any) -> Consumer:
    """A new consumer from `make()` for `old`, which failed for good with `error` (a static
    member fenced after its session timed out during a broker outage). `old` is closed within
    CLOSE_BOUND_SECONDS and dropped: a failed consumer may hang or refuse even its close. The
    caller drops the state of its partitions and subscribes the new one."""
    logger.error("consumer failed for good; re-creating it", error=str(error))
    new = make()
    close_within(old.close, "failed consumer")
    return new


def transaction_step(call: TxnCall, error: KafkaError, *, elapsed: float,
                     budget: float = TXN_RETRY_BUDGET_SECONDS) -> TxnStep:
    """confluent-kafka's rules for a failed transactional call, `elapsed` seconds after its
    first attempt: fatal -> re-create the producer; txn_requires_abort -> abort; retriable ->
    the same call again, for up to `budget` seconds. Past the budget, and for an error the
    client does not classify, the transaction is aborted; an abort or init that cannot
    succeed leaves only a new producer. Pure."""
    if is_fatal(error):
        return TxnStep.RECREATE
    if error.retriable() and not error.txn_requires_abort() and elapsed < budget:
        return TxnStep.RETRY
    if call in (TxnCall.ABORT, TxnCall.INIT):
        return TxnStep.RECREATE
    return TxnStep.ABORT


class Stopping(Exception):
    """A stop was requested while a call waited for the broker or the database."""


class TransactionFailed(Exception):
    """The transaction did not commit and its fate is settled (aborted, or its producer was
    fenced by a new one): nothing of it is visible to read_committed readers; rewind to the
    committed offsets and redo the batch."""


class CallHung(Exception):
    """A blocking client call did not return within its bound (it goes on on its thread)."""


class CallThread:
    """Runs blocking client calls on a daemon thread of their own, so that the caller can stop
    waiting for one that never returns; a hung call is left behind with its thread (daemon:
    it never holds up the process's exit)."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], None], threading.Event,
                                            list[BaseException]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call(self, function: Callable[[], None], bound: float) -> None:
        """`function()` on the thread; its exception is raised here. CallHung after `bound`."""
        done = threading.Event()
        raised: list[BaseException] = []
        self._jobs.put((function, done, raised))
        if not done.wait(bound):
            raise CallHung(f"no return after {bound:.1f}s")
        if raised:
            raise raised[0]

    def close(self) -> None:
        self._jobs.put(None)  # the thread ends after the call in hand, if any ever returns

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            function, done, raised = job
            try:
                function()
            except BaseException as exc:  # handed to the caller
                raised.append(exc)
            finally:
                done.set()


def close_within(close: Callable[[], None], what: str, bound: float = CLOSE_BOUND_SECONDS) -> bool:
    """`close()` (a consumer's: it leaves its group and waits for its commits) on a daemon
    thread, waited for at most `bound` seconds: with the broker away it may never return, and
    a stopping service must not wait for it. False (and a warning) when it was left behind."""
    return begin_close(close, what).wait(bound)


class Closing:
    """A close running on a daemon thread (see `begin_close`)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.done = threading.Event()

    def wait(self, bound: float) -> bool:
        """True once the close returned within `bound` seconds, else False (and a warning)."""
        if self.done.wait(max(0.0, bound)):
            return True
        structlog.get_logger().warning("close did not return; left behind", client=self.what,
                                       waited_seconds=round(bound, 1))
        return False


def begin_close(close: Callable[[], None], what: str) -> Closing:
    """Start `close()` on a daemon thread and return at once: the caller closes its other
    clients meanwhile, then waits for this one with `Closing.wait`."""
    closing = Closing(what)

    def run() -> None:
        try:
            close()
        except (KafkaException, RuntimeError) as exc:
            structlog.get_logger().warning("close failed", client=what, error=str(exc))
        finally:
            closing.done.set()

    threading.Thread(target=run, name=f"close-{what}", daemon=True).start()
    return closing


class TransactionalProducer:
    """A transactional producer whose calls are bounded and whose failures are handled (see
    the module docstring). `producer` is the current confluent-kafka producer: produce through
    it, inside `begin()` .. `commit()`. One thread uses it. The transactional calls run on a
    `CallThread`: one that hangs past its own timeout re-creates the producer."""

    def __init__(self, config: Mapping[str, Any], stop: threading.Event, *, logger: Any = None,
                 call_timeout: float = TXN_CALL_TIMEOUT_SECONDS,
                 retry_budget: float = TXN_RETRY_BUDGET_SECONDS,
                 factory: Callable[[dict[str, Any]], Producer] = Producer,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._config = dict(config)
        self.stop = stop
        self._log = logger or structlog.get_logger("kafka.transactions")
        self._timeout = call_timeout
        self._budget = retry_budget
        self._factory = factory
        self._clock = clock
        self.producer: Producer = factory(self._config)
        self._initialised = False
        self._calls = CallThread(f"txn-{self.transactional_id}")
        self.recreated = 0
        self.aborted = 0
        self.hung = 0

    @property
    def transactional_id(self) -> str:
        return str(self._config["transactional.id"])

    def init(self) -> None:
        """init_transactions, retried (and the producer re-created) until it succeeds: fences
        any older producer with this transactional id and settles its open transaction. A
        no-op on a producer already initialised (a second init_transactions is a state error,
        which would re-create a healthy producer)."""
        while not self._initialised:
            try:
                self._call(TxnCall.INIT, lambda: self.producer.init_transactions(self._timeout))
                self._initialised = True
                return
            except TransactionFailed:
                continue  # a new producer was made: initialise that one

    def begin(self) -> None:
        self._call(TxnCall.BEGIN, self.producer.begin_transaction)

    def commit(self, offsets: list[TopicPartition], group_metadata: object) -> None:
        """Send the consumed offsets into the transaction and commit it; raises
        TransactionFailed (nothing committed, fate settled) or Stopping."""
        self.send_offsets(offsets, group_metadata)
        self.commit_transaction()

    def send_offsets(self, offsets: list[TopicPartition], group_metadata: object) -> None:
        """The consumed offsets into the open transaction (fenced by the group's generation)."""
        if offsets:
            self._call(TxnCall.SEND_OFFSETS, lambda: self.producer.send_offsets_to_transaction(
                offsets, group_metadata, self._timeout))

    def commit_transaction(self) -> None:
        self._call(TxnCall.COMMIT, lambda: self.producer.commit_transaction(self._timeout))
        metrics.TRANSACTIONS.labels(result="committed").inc()

    def abort(self) -> None:
        """Abort the open transaction (or re-create the producer when that cannot be done)."""
        try:
            self._call(TxnCall.ABORT, lambda: self.producer.abort_transaction(self._timeout))
        except TransactionFailed:
            pass  # re-created: the new producer's init settled the old transaction
        self.aborted += 1
        metrics.TRANSACTIONS.labels(result="aborted").inc()

    def close(self, timeout: float = 5.0) -> None:
        self._calls.close()
        self.producer.flush(timeout)

    def _call(self, call: TxnCall, attempt: Callable[[], None]) -> None:
        started = self._clock()
        tries = 0
        while True:
            began = self._clock()
            try:
                self._calls.call(attempt, self._timeout + TXN_HANG_GRACE_SECONDS)
                if tries:
                    self._log.info("transactional call succeeded after retries", call=call.value,
                                   tries=tries + 1, seconds=round(self._clock() - started, 1))
                return
            except KafkaException as exc:
                error = exc.args[0]
                tries += 1
                step = transaction_step(call, error, elapsed=self._clock() - started,
                                        budget=self._budget)
                self._log.warning("transactional call failed", call=call.value, error=str(error),
                                  step=step.value, tries=tries,
                                  transactional_id=self.transactional_id)
                if step is TxnStep.RETRY:
                    if self.stop.is_set():
                        raise Stopping(f"{call.value} unfinished: {error}") from exc
                    if self._clock() - began < self._timeout / 2:
                        # Failed at once (no coordinator yet): do not spin.
                        self.stop.wait(_backoff(tries))
                    continue
                if step is TxnStep.ABORT:
                    self.abort()
                    raise TransactionFailed(f"{call.value}: {error}") from exc
                self._recreate()
                if call is not TxnCall.INIT:
                    self.init()  # (init itself loops on to the new producer: no recursion)
                raise TransactionFailed(f"{call.value}: {error}") from exc
            except CallHung as exc:
                self.hung += 1
                self._log.error("transactional call hung; re-creating the producer",
                                call=call.value, error=str(exc),
                                transactional_id=self.transactional_id)
                self._recreate(hung=True)
                if self.stop.is_set():
                    raise Stopping(f"{call.value} hung") from exc
                if call is not TxnCall.INIT:
                    self.init()
                raise TransactionFailed(f"{call.value} hung") from exc

    def _recreate(self, *, hung: bool = False) -> None:
        """Drop the producer for a new one with the same transactional id; its
        init_transactions fences the old one and aborts (or completes) its transaction."""
        old = self.producer
        if hung:
            # The old producer stays with its hung call; the new one gets a thread of its own.
            self._calls.close()
            self._calls = CallThread(f"txn-{self.transactional_id}")
        else:
            try:
                old.purge()
            except (KafkaException, RuntimeError):
                pass  # a broken producer may refuse even that; it is dropped either way
        self.producer = self._factory(self._config)
        self._initialised = False
        self.recreated += 1
        self._log.warning("transactional producer re-created",
                          transactional_id=self.transactional_id, times=self.recreated)
        dispose(old)
        del old


# How long `dispose` waits for the caller to let go of a client before dropping it anyway.
DISPOSE_HANDOVER_SECONDS = 10.0


def dispose(client: object) -> None:
    """Drop a client on a thread of its own. librdkafka's destroy runs when the last reference
    goes and may block for minutes on a producer whose broker vanished mid-request (seen: the
    hydrator's gather loop silent for 5.5 min after a broker SIGSTOP, inside `del old`). The
    caller deletes its own reference right after; the thread lets go once it holds the last."""
    held = [client]
    del client

    def drop() -> None:
        deadline = time.monotonic() + DISPOSE_HANDOVER_SECONDS
        # Referrers: `held`, and getrefcount's argument.
        while sys.getrefcount(held[0]) > 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        held.clear()

    threading.Thread(target=drop, name="kafka-dispose", daemon=True).start()


def _backoff(tries: int) -> float:
    return RETRY_BACKOFF_SECONDS[min(tries, len(RETRY_BACKOFF_SECONDS)) - 1]


def retry_until_stopped(stop: threading.Event, what: str, action: Callable[[], T], *,
                        logger: Any = None,
                        retry_on: tuple[type[BaseException], ...] = (KafkaException,)) -> T:
    """`action()` until it returns, retrying what raised one of `retry_on` with back-off;
    raises Stopping once `stop` is set. A fatal Kafka error is not retried. For reads (replays,
    committed offsets, seeks) that a broker outage interrupts: waited out, never crashed on."""
    log = logger or structlog.get_logger("kafka.retry")
    tries = 0
    while True:
        if stop.is_set():
            raise Stopping(what)
        try:
            result = action()
            if tries:
                log.info("succeeded after retries", what=what, tries=tries + 1)
            return result
        except retry_on as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and is_fatal(error):
                raise
            tries += 1
            log.warning("failed; retrying", what=what, error=str(exc), tries=tries)
            stop.wait(_backoff(tries))
