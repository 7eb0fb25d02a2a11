"""The rules for a failed transactional call, and the producer wrapper that follows them (with
a fake producer: no broker)."""

from __future__ import annotations

import threading
import time
from typing import Any, cast

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from services.common import kafka
from services.common.kafka import (
    Stopping,
    TransactionalProducer,
    TransactionFailed,
    TxnCall,
    TxnStep,
    retry_until_stopped,
    transaction_step,
)


def error(code: int = KafkaError._TIMED_OUT, *, fatal: bool = False, retriable: bool = False,
          abortable: bool = False) -> KafkaError:
    return KafkaError(code, "test", fatal=fatal, retriable=retriable, txn_requires_abort=abortable)


# --- transaction_step -----------------------------------------------------------------------


@pytest.mark.parametrize("call", list(TxnCall))
def test_a_fatal_error_recreates_the_producer_whatever_the_call(call):
    assert transaction_step(call, error(fatal=True, retriable=True), elapsed=0) is TxnStep.RECREATE


@pytest.mark.parametrize("call", [TxnCall.SEND_OFFSETS, TxnCall.COMMIT, TxnCall.BEGIN])
def test_an_abortable_error_aborts_even_when_also_marked_retriable(call):
    assert transaction_step(call, error(abortable=True), elapsed=0) is TxnStep.ABORT
    assert transaction_step(call, error(abortable=True, retriable=True), elapsed=0) is TxnStep.ABORT


@pytest.mark.parametrize("call", list(TxnCall))
def test_a_retriable_error_retries_the_same_call_within_the_budget(call):
    assert transaction_step(call, error(retriable=True), elapsed=29.9, budget=30) is TxnStep.RETRY


def test_past_the_budget_a_retriable_error_aborts_and_an_abort_recreates():
    late = error(retriable=True)
    assert transaction_step(TxnCall.COMMIT, late, elapsed=30, budget=30) is TxnStep.ABORT
    assert transaction_step(TxnCall.SEND_OFFSETS, late, elapsed=31, budget=30) is TxnStep.ABORT
    assert transaction_step(TxnCall.ABORT, late, elapsed=30, budget=30) is TxnStep.RECREATE
    assert transaction_step(TxnCall.INIT, late, elapsed=30, budget=30) is TxnStep.RECREATE


def test_an_unclassified_error_aborts_or_recreates_never_retries():
    plain = error(KafkaError._STATE)
    assert transaction_step(TxnCall.COMMIT, plain, elapsed=0) is TxnStep.ABORT
    assert transaction_step(TxnCall.ABORT, plain, elapsed=0) is TxnStep.RECREATE


# --- TransactionalProducer with a fake producer --------------------------------------------


class FakeProducer:
    """Fails its transactional calls as scripted: `script[name]` is a list of errors (or
    "hang") consumed one per call; an empty list means success."""

    made: list[FakeProducer] = []

    def __init__(self, config: dict[str, Any], script: dict[str, list[Any]]) -> None:
        self.config = config
        self.script = script
        self.calls: list[str] = []
        self.purged = False
        self.release = threading.Event()
        FakeProducer.made.append(self)

    def _do(self, name: str) -> None:
        self.calls.append(name)
        todo = self.script.get(name, [])
        if todo:
            outcome = todo.pop(0)
            if isinstance(outcome, str):  # "hang"
                self.release.wait(30)
                return
            raise KafkaException(outcome)

    def init_transactions(self, timeout: float) -> None:
        self._do("init")

    def begin_transaction(self) -> None:
        self._do("begin")

    def send_offsets_to_transaction(self, offsets: Any, metadata: Any, timeout: float) -> None:
        self._do("send_offsets")

    def commit_transaction(self, timeout: float) -> None:
        self._do("commit")

    def abort_transaction(self, timeout: float) -> None:
        self._do("abort")

    def purge(self) -> None:
        self.purged = True

    def flush(self, timeout: float) -> int:
        return 0


def wrapper(script: dict[str, list[Any]], stop: threading.Event | None = None,
            **options: Any) -> TransactionalProducer:
    FakeProducer.made = []
    return TransactionalProducer(
        {"transactional.id": "t-0"}, stop or threading.Event(),
        factory=lambda config: cast(Producer, FakeProducer(config, script)), call_timeout=0.05, **options)


OFFSETS = [TopicPartition("t", 0, 5)]


def test_a_retriable_commit_is_called_again_until_it_succeeds():
    txn = wrapper({"commit": [error(retriable=True), error(retriable=True)]})
    txn.init()
    txn.begin()
    txn.commit(OFFSETS, object())
    assert FakeProducer.made[0].calls == ["init", "begin", "send_offsets", "commit", "commit",
                                          "commit"]
    assert txn.aborted == txn.recreated == 0


def test_an_abortable_send_offsets_aborts_and_fails_the_transaction():
    txn = wrapper({"send_offsets": [error(abortable=True)]})
    txn.init()
    txn.begin()
    with pytest.raises(TransactionFailed):
        txn.commit(OFFSETS, object())
    assert FakeProducer.made[0].calls == ["init", "begin", "send_offsets", "abort"]
    assert txn.aborted == 1


def test_a_fatal_commit_recreates_and_reinitialises_the_producer_then_fails_the_transaction():
    txn = wrapper({"commit": [error(fatal=True)]})
    txn.init()
    txn.begin()
    with pytest.raises(TransactionFailed):
        txn.commit(OFFSETS, object())
    old, new = FakeProducer.made
    assert old.purged and txn.producer is new and txn.recreated == 1
    assert new.calls == ["init"] and new.config == {"transactional.id": "t-0"}


def test_an_abort_that_cannot_finish_recreates_the_producer():
    txn = wrapper({"send_offsets": [error(abortable=True)], "abort": [error(KafkaError._STATE)]})
    txn.init()
    txn.begin()
    with pytest.raises(TransactionFailed):
        txn.commit(OFFSETS, object())
    assert len(FakeProducer.made) == 2 and FakeProducer.made[1].calls == ["init"]


def test_a_retriable_error_past_the_budget_aborts(monkeypatch):
    script = {"commit": [error(retriable=True)] * 1000}
    txn = wrapper(script, retry_budget=0.2)
    monkeypatch.setattr(kafka, "RETRY_BACKOFF_SECONDS", (0.01,))
    txn.init()
    txn.begin()
    began = time.monotonic()
    with pytest.raises(TransactionFailed):
        txn.commit(OFFSETS, object())
    assert time.monotonic() - began < 2.0
    assert FakeProducer.made[0].calls[-1] == "abort"


def test_a_hung_call_is_left_behind_and_the_producer_recreated(monkeypatch):
    monkeypatch.setattr(kafka, "TXN_HANG_GRACE_SECONDS", 0.1)
    txn = wrapper({"send_offsets": ["hang"]})
    txn.init()
    txn.begin()
    began = time.monotonic()
    with pytest.raises(TransactionFailed, match="hung"):
        txn.commit(OFFSETS, object())
    assert time.monotonic() - began < 2.0, "the caller waited for the hung call"
    old, new = FakeProducer.made
    assert txn.hung == 1 and txn.producer is new and new.calls == ["init"]
    assert not old.purged  # busy with its hung call: dropped as it is
    old.release.set()


def test_a_stop_request_ends_the_retries_with_stopping():
    stop = threading.Event()
    txn = wrapper({"commit": [error(retriable=True)] * 1000}, stop)
    txn.init()
    txn.begin()
    threading.Timer(0.2, stop.set).start()
    began = time.monotonic()
    with pytest.raises(Stopping):
        txn.commit(OFFSETS, object())
    assert time.monotonic() - began < 2.0


def test_init_goes_on_to_a_new_producer_when_the_first_cannot_be_initialised():
    txn = wrapper({"init": [error(fatal=True)]})
    txn.init()
    old, new = FakeProducer.made
    assert old.calls == ["init"] and new.calls == ["init"] and txn.producer is new


# --- retry_until_stopped and instance ids ----------------------------------------------------


def test_retry_until_stopped_waits_out_failures_but_not_fatal_ones(monkeypatch):
    monkeypatch.setattr(kafka, "RETRY_BACKOFF_SECONDS", (0.01,))
    failures = [KafkaException(error(retriable=True))] * 3

    def flaky() -> str:
        if failures:
            raise failures.pop()
        return "done"

    assert retry_until_stopped(threading.Event(), "flaky", flaky) == "done"

    def fenced() -> None:
        raise KafkaException(error(KafkaError.FENCED_INSTANCE_ID, fatal=True))

    with pytest.raises(KafkaException):
        retry_until_stopped(threading.Event(), "fenced", fenced)
    stopped = threading.Event()
    stopped.set()
    with pytest.raises(Stopping):
        retry_until_stopped(stopped, "never", flaky)


def transactions_ended(result: str) -> float:
    return kafka.metrics.TRANSACTIONS.labels(result=result)._value.get()


def test_commits_and_aborts_are_counted_once_each_by_result():
    committed, aborted = transactions_ended("committed"), transactions_ended("aborted")
    txn = wrapper({"commit": [error(retriable=True)], "send_offsets": [error(abortable=True)]})
    txn.init()
    txn.begin()
    with pytest.raises(TransactionFailed):
        txn.commit(OFFSETS, object())  # send_offsets abortable: aborted, nothing committed
    txn.begin()
    txn.commit(OFFSETS, object())  # one retried commit: committed once
    assert (transactions_ended("committed") - committed, transactions_ended("aborted") - aborted) == (1, 1)


def test_a_consumer_fatal_record_error_is_fatal_though_its_flag_is_not_set():
    fenced = KafkaError(KafkaError._FATAL, "Fatal error: Broker: Static consumer fenced")
    assert not fenced.fatal() and kafka.is_fatal(fenced)
    assert kafka.is_fatal(KafkaError(KafkaError._TIMED_OUT, fatal=True))
    assert not kafka.is_fatal(KafkaError(KafkaError._TIMED_OUT, retriable=True))
    assert transaction_step(TxnCall.COMMIT, fenced, elapsed=0) is TxnStep.RECREATE


def test_fatal_error_finds_the_fatal_error_an_exception_carries_and_nothing_else():
    fenced = KafkaError(KafkaError._FATAL, "Fatal error: Broker: Static consumer fenced")
    assert kafka.fatal_error(KafkaException(fenced)) is fenced
    assert kafka.fatal_error(KafkaException(KafkaError(KafkaError._TIMED_OUT))) is None
    assert kafka.fatal_error(KafkaException("no KafkaError")) is None
    assert kafka.fatal_error(KafkaException()) is None


def test_init_is_done_once_per_producer_and_again_only_after_a_re_creation():
    # The hydrator's gather loop calls init() at every restart: a second init_transactions
    # on a ready producer is a state error, which used to re-create a healthy producer.
    txn = wrapper({"send_offsets": ["hang"]})
    txn.init()
    txn.init()
    assert FakeProducer.made[0].calls == ["init"]
    txn.begin()
    with pytest.raises(TransactionFailed):
        txn.send_offsets(OFFSETS, object())  # hangs: a new producer, initialised at once
    FakeProducer.made[0].release.set()
    txn.init()  # the restart after the failure
    assert len(FakeProducer.made) == 2 and FakeProducer.made[1].calls == ["init"]


class SlowToDestroy:
    """Stands in for a librdkafka handle whose destroy blocks."""

    def __init__(self, release: threading.Event, seen: list[str]) -> None:
        self.release = release
        self.seen = seen

    def __del__(self) -> None:
        self.release.wait(10)
        self.seen.append(threading.current_thread().name)


def test_a_client_is_destroyed_on_a_thread_of_its_own_not_the_callers():
    release, seen = threading.Event(), list[str]()
    client = SlowToDestroy(release, seen)
    began = time.monotonic()
    kafka.dispose(client)
    del client
    assert time.monotonic() - began < 1.0  # the caller went on
    release.set()
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen == ["kafka-dispose"]
