"""Pure rules of the sender's outage handling: which database errors are waited out, and what
a pooled SMTP session needs before it carries a mail."""

from __future__ import annotations

import pytest

from services.sender.ledger import database_away
from services.sender.smtp_pool import Checkout, checkout


@pytest.mark.parametrize("sqlstate", [
    None,  # the connection broke or never came up
    "08006",  # connection failure
    "57P01",  # admin shutdown (pg_ctl stop)
    "57P03",  # the database system is starting up
    "57014",  # statement timeout
    "40P01",  # deadlock
    "53300",  # too many connections
])
def test_outages_are_waited_out(sqlstate):
    assert database_away(sqlstate)


@pytest.mark.parametrize("sqlstate", ["42P01", "28P01", "3D000", "23505", "22P02"])
def test_real_errors_are_raised(sqlstate):
    assert not database_away(sqlstate)


def test_a_busy_session_is_used_as_it_is():
    assert checkout(0.01, relay_spoke=False) is Checkout.USE


def test_a_session_the_relay_closed_or_spoke_on_is_replaced_at_once():
    assert checkout(0.01, relay_spoke=True) is Checkout.REOPEN


def test_an_idle_session_is_probed_then_after_longer_replaced():
    assert checkout(14.9, False, noop_after=15, max_idle=120) is Checkout.USE
    assert checkout(15.0, False, noop_after=15, max_idle=120) is Checkout.PROBE
    assert checkout(120.0, False, noop_after=15, max_idle=120) is Checkout.REOPEN
