"""The send ledger waits out a lost database connection instead of failing the sender, and a
stop request ends the wait (real PostgreSQL; the connection is cut from the server side with
pg_terminate_backend, as a restart of the server would)."""

from __future__ import annotations

import threading
import time
import uuid

import psycopg
import pytest

from services.common.kafka import Stopping
from services.sender.delivery import Outcome, Status
from services.sender.ledger import ClaimState, LedgerEntry, SendLedger
from tests.chaos.fault_kit import free_port

pytestmark = pytest.mark.integration


def entries(campaign: str, n: int) -> list[LedgerEntry]:
    return [LedgerEntry(campaign, f"ct-{i}", "acme", f"<m{i}@x>") for i in range(n)]


def cut(database_url: str, ledger: SendLedger) -> None:
    """The server ends the ledger's session (what a restart or an immediate stop does)."""
    conn = ledger._conn
    assert conn is not None
    pid = conn.info.backend_pid
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_claims_and_settlements_survive_a_cut_connection(settings):
    campaign = f"cmp-{uuid.uuid4().hex[:10]}"
    ledger = SendLedger(settings.database_url)
    try:
        cut(settings.database_url, ledger)
        claims = ledger.claim(entries(campaign, 5))
        assert {c.state for c in claims.values()} == {ClaimState.FRESH}
        cut(settings.database_url, ledger)
        ledger.settle({key: Outcome(Status.SENT, 1, 250, "250 ok") for key in claims})
        assert ledger.reconnects == 2
    finally:
        ledger.close()
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute("SELECT status, ambiguous FROM send_ledger WHERE campaign_id = %s",
                            (campaign,)).fetchall()
    assert rows == [("sent", 0)] * 5  # waited out: nothing counted twice, nothing lost


def test_a_stop_request_ends_the_wait_for_an_absent_database():
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    began = time.monotonic()
    with pytest.raises(Stopping):
        SendLedger(f"postgresql://campaigns@127.0.0.1:{free_port()}/campaigns", stop=stop)
    assert time.monotonic() - began < 5.0
