"""The sender's routing and pre-send decisions, from plain values: no broker, no clock."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from schemas.base import Record
from schemas.envelope import SchemaViolation, decode, encode, wrap
from schemas.events import (
    CampaignPaused,
    MessageTemplate,
    RecipientExcluded,
    RecipientQueued,
    RecipientRetryScheduled,
)
from services.sender.control import Control
from services.sender.decisions import (
    Act,
    Book,
    Bounds,
    DeadLetter,
    Defer,
    Drop,
    Forward,
    Hold,
    Park,
    Recipient,
    Send,
    Skip,
    Sweeps,
    Throttle,
    WaitForRelease,
    WaitUntil,
    Wake,
    booked,
    decode_recipient,
    due_at,
    fair,
    poll_timeout,
    pre_send,
    read,
    replayed,
    route,
    skip_reason,
    swept,
    untried,
    wake,
)
from services.sender.delivery import Outcome, Status
from services.sender.ledger import Claim, ClaimState
from services.sender.retries import RetryPolicy

NOW = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
RECIPIENT = RecipientQueued(campaign_id="c1", contact_id="k1", email="k1@example.com",
                            template=MessageTemplate(subject="s", from_address="n@example.com",
                                                     body_text="hi"))
BOUNDS = Bounds(batch_deadline=120.0, max_throttle_wait=2.0, throttled_batch=5.0,
                throttled_early=1.0)


def value(payload: Record) -> bytes:
    return encode(wrap(payload, tenant_id="acme", aggregate_id="c1"))


# --- read -------------------------------------------------------------------------------------


def test_a_queued_recipient_is_its_first_attempt_starting_now() -> None:
    found = read(value(RECIPIENT), NOW)
    assert isinstance(found, Recipient)
    assert (found.recipient, found.attempt, found.first_attempt_at, found.slot) == \
        (RECIPIENT, 1, NOW, None)
    assert found.envelope.tenant_id == "acme"


def test_a_retry_carries_its_attempt_and_first_attempt_but_no_slot() -> None:
    first = NOW - timedelta(minutes=5)
    retry = RecipientRetryScheduled(recipient=RECIPIENT, attempt=3, retry_at=NOW,
                                    first_attempt_at=first)
    found = read(value(retry), NOW)
    assert isinstance(found, Recipient)
    assert (found.recipient, found.attempt, found.first_attempt_at, found.slot) == \
        (RECIPIENT, 3, first, None)
    assert found.payload == retry


def test_a_throttled_retry_carries_the_slot_it_paid_for() -> None:
    slot = NOW + timedelta(seconds=3)
    throttled = RecipientRetryScheduled(recipient=RECIPIENT, attempt=1, retry_at=slot,
                                        first_attempt_at=NOW, throttled=True)
    found = read(value(throttled), NOW)
    assert isinstance(found, Recipient) and found.slot == slot


def test_an_excluded_member_is_dropped_without_a_dead_letter() -> None:
    excluded = RecipientExcluded(campaign_id="c1", contact_id="k1", email="k1@example.com",
                                 reason="unsubscribed")
    assert read(value(excluded), NOW) == Drop()


@pytest.mark.parametrize(("raw", "reason"), [
    (None, "empty record value"),
    (b"{not json", "malformed JSON"),
    (b"{}", "invalid envelope"),
])
def test_an_unreadable_record_is_dead_lettered_with_the_reason(raw: bytes | None,
                                                                 reason: str) -> None:
    found = read(raw, NOW)
    assert isinstance(found, DeadLetter) and found.reason.startswith(reason)


def _edited(change: dict[str, object], payload: dict[str, object] | None = None) -> bytes:
    envelope = json.loads(value(RECIPIENT))
    envelope.update(change)
    envelope["payload"].update(payload or {})
    return json.dumps(envelope).encode()


@pytest.mark.parametrize("raw", [
    value(RECIPIENT),
    value(RECIPIENT.model_copy(update={"first_name": "José", "attributes": {"city": "Oslo"}})),
    value(RecipientRetryScheduled(recipient=RECIPIENT, attempt=2, retry_at=NOW,
                                  first_attempt_at=NOW)),
    _edited({}, {"email": "K1@EXAMPLE.COM"}),  # the validator normalises it either way
    _edited({}, {"email": "not an address"}),
    _edited({}, {"surprise": 1}),
    _edited({"surprise": 1}),
    _edited({"version": 2}),
    _edited({"version": "1"}),
    _edited({"type": "RecipientExcluded"}),
    _edited({"occurred_at": "2030-01-01T12:00:00"}),  # naive
    _edited({"id": "not-a-uuid"}),
    _edited({}, {"template": {"subject": "a\r\nBcc: x@example.com", "from_address": "n@example.com"}}),
    b'{"id": NaN}',
    b"\xff\xfe",
    b"[]",
    b"",
    None,
])
def test_decode_recipient_reads_exactly_what_decode_reads(raw: bytes | None) -> None:
    try:
        expected = decode(raw)
    except SchemaViolation as exc:
        with pytest.raises(SchemaViolation) as found:
            decode_recipient(raw)
        assert str(found.value) == str(exc)  # the full decode words the reason
        return
    message = decode_recipient(raw)
    assert message.payload == expected.payload
    assert message.envelope.model_dump(exclude={"payload"}) == expected.envelope.model_dump(
        exclude={"payload"})


def test_a_queued_recipient_is_read_in_one_pass_with_its_envelope() -> None:
    message = decode_recipient(value(RECIPIENT))
    # The one-pass reader holds the payload model itself (decode's envelope holds a dict).
    assert message.payload == RECIPIENT and message.envelope.payload is message.payload


def test_another_event_on_a_recipient_topic_is_dead_lettered() -> None:
    found = read(value(CampaignPaused(reason="x")), NOW)
    assert isinstance(found, DeadLetter)
    assert found.reason.startswith("not a recipient: ") and "CampaignPaused" in found.reason


def test_cancelled_wins_over_the_do_not_mail_list() -> None:
    assert skip_reason(Control.CANCELLED, "suppressed:hard_bounce") == "cancelled"
    assert skip_reason(Control.CANCELLED, None) == "cancelled"
    assert skip_reason(Control.SENDING, "unsubscribed") == "unsubscribed"
    assert skip_reason(Control.PAUSED, None) is None
    assert skip_reason(Control.SENDING, None) is None


# --- route ------------------------------------------------------------------------------------

LATER = NOW + timedelta(seconds=30)


def from_topic(control: Control, due: datetime | None = None, offset: int = 7,
               sweep_until: int = -1) -> object:
    return route(control, from_held=False, due=due, now=NOW, offset=offset,
                 sweep_until=sweep_until)


def from_held(control: Control, due: datetime | None = None, offset: int = 7,
              sweep_until: int = -1) -> object:
    return route(control, from_held=True, due=due, now=NOW, offset=offset,
                 sweep_until=sweep_until)


def test_a_due_recipient_of_a_sending_campaign_is_acted_on() -> None:
    assert from_topic(Control.SENDING) == Act()
    assert from_topic(Control.SENDING, due=NOW) == Act()  # due exactly now: not "later"
    assert from_topic(Control.SENDING, due=NOW - timedelta(seconds=1)) == Act()


def test_a_delay_record_not_due_pauses_its_partition_until_it_is() -> None:
    assert from_topic(Control.SENDING, due=LATER) == WaitUntil(LATER)


def test_a_delay_record_of_a_paused_campaign_waits_for_its_time_before_it_is_parked() -> None:
    # Parked before its time it would come back from the held topic early: its partition waits.
    assert from_topic(Control.PAUSED, due=LATER) == WaitUntil(LATER)
    assert from_topic(Control.PAUSED, due=NOW) == Park(again=False)


def test_a_recipient_of_a_paused_campaign_is_parked_and_counted() -> None:
    assert from_topic(Control.PAUSED) == Park(again=False)


def test_a_cancelled_campaigns_recipient_is_acted_on_to_be_skipped() -> None:
    # The pipeline turns it into RecipientSkipped("cancelled") through the ledger.
    assert from_topic(Control.CANCELLED) == Act()
    assert from_held(Control.CANCELLED) == Act()


def test_a_held_record_of_a_still_paused_campaign_blocks_its_partition() -> None:
    assert from_held(Control.PAUSED) == WaitForRelease()
    # At or past the end of the last sweep: a record parked by the sweep itself, blocks again.
    assert from_held(Control.PAUSED, offset=10, sweep_until=10) == WaitForRelease()


def test_a_sweep_parks_records_of_campaigns_still_paused_again_without_counting_them() -> None:
    assert from_held(Control.PAUSED, offset=9, sweep_until=10) == Park(again=True)


def test_a_released_held_recipient_is_acted_on() -> None:
    assert from_held(Control.SENDING) == Act()
    assert from_held(Control.SENDING, due=NOW) == Act()


def test_a_released_held_retry_not_due_goes_back_to_its_delay_topic() -> None:
    # A held partition never waits for a time: the delay topics do that.
    assert from_held(Control.SENDING, due=LATER) == Forward()


def test_a_first_attempt_is_due_at_once_a_retry_at_its_time_a_throttled_one_early() -> None:
    retry = RecipientRetryScheduled(recipient=RECIPIENT, attempt=2, retry_at=LATER,
                                    first_attempt_at=NOW)
    throttled = retry.model_copy(update={"attempt": 1, "throttled": True})
    assert due_at(RECIPIENT, early=1.0) is None
    assert due_at(retry, early=1.0) == LATER
    assert due_at(throttled, early=1.0) == LATER - timedelta(seconds=1)


# --- pre_send ---------------------------------------------------------------------------------

STARTED = 1000.0


def check(control: Control = Control.SENDING, skip: str | None = None, *, clock: float = STARTED,
          slot: datetime | None = None, limited: bool = False) -> object:
    return pre_send(control, skip, now=NOW, clock=clock, started=STARTED, slot=slot,
                    limited=limited, bounds=BOUNDS)


def test_a_recipient_of_a_sending_campaign_is_sent_at_once_without_a_limit() -> None:
    assert check() == Send(0.0)
    # Without a limit a slot booked earlier is not waited for.
    assert check(slot=NOW + timedelta(seconds=1)) == Send(0.0)


def test_paused_meanwhile_is_held_before_anything_else() -> None:
    assert check(Control.PAUSED, "unsubscribed", clock=STARTED + 999, limited=True) == Hold()


def test_skipped_meanwhile_says_why() -> None:
    assert check(skip="cancelled") == Skip("cancelled")
    assert check(skip="suppressed:complaint", clock=STARTED + 999) == Skip("suppressed:complaint")


def test_no_attempt_starts_after_the_batch_deadline() -> None:
    assert check(clock=STARTED + 119.9) == Send(0.0)
    assert check(clock=STARTED + 120.0) == Defer("batch deadline passed before this attempt")
    assert isinstance(check(clock=STARTED + 120.0, limited=True), Defer)


def test_under_a_limit_a_recipient_without_a_slot_books_one() -> None:
    assert check(limited=True) == Book()


def test_a_recipient_back_before_its_slot_waits_for_it() -> None:
    assert check(limited=True, slot=NOW + timedelta(seconds=0.75)) == Send(0.75)
    assert check(limited=True, slot=NOW) == Send(0.0)
    # Up to early + the longest in-thread wait ahead: still waited for.
    assert check(limited=True, slot=NOW + timedelta(seconds=3)) == Send(3.0)


def test_a_recipient_back_far_too_early_keeps_its_slot_on_a_delay_topic() -> None:
    slot = NOW + timedelta(seconds=3.5)
    assert check(limited=True, slot=slot) == Throttle(slot)


def test_a_recipient_back_after_its_slot_books_a_new_one() -> None:
    # That slot went unused: spent late, on top of the slots booked for now, it would go over.
    assert check(limited=True, slot=NOW - timedelta(seconds=0.1)) == Book()


def after_booking(wait: float, clock: float = STARTED) -> object:
    return booked(wait, clock=clock, started=STARTED, now=NOW, bounds=BOUNDS)


def test_a_short_booked_wait_is_spent_in_the_send_thread() -> None:
    assert after_booking(0.0) == Send(0.0)
    assert after_booking(1.5) == Send(1.5)
    assert after_booking(2.0) == Send(2.0)  # the longest wait itself is still waited


def test_a_long_booked_wait_goes_to_a_delay_topic_for_its_slot() -> None:
    assert after_booking(2.5) == Throttle(NOW + timedelta(seconds=2.5))


def test_a_slot_past_the_batchs_throttled_bound_goes_to_a_delay_topic() -> None:
    assert after_booking(1.0, clock=STARTED + 4.0) == Send(1.0)  # exactly at the bound
    assert after_booking(1.0, clock=STARTED + 4.5) == Throttle(NOW + timedelta(seconds=1))


# --- untried ---------------------------------------------------------------------------------

POLICY = RetryPolicy(base_seconds=10.0, max_delay_seconds=100.0, max_attempts=3,
                     max_age_seconds=3600.0)


def stopped(check: Hold | Skip | Defer | Throttle, attempt: int = 1,
            first: datetime = NOW) -> Outcome:
    return untried(check, attempt, first_attempt_at=first, now=NOW, policy=POLICY, draw=0.0)


def test_held_skipped_and_throttled_attempts_are_not_tried() -> None:
    assert stopped(Hold()) == Outcome(Status.HELD, 1)
    assert stopped(Skip("unsubscribed"), 2) == Outcome(Status.SKIPPED, 2, detail="unsubscribed")
    assert stopped(Throttle(LATER)) == Outcome(Status.THROTTLED, 1, retry_at=LATER)


def test_an_attempt_stopped_by_the_deadline_is_a_transient_failure() -> None:
    deferred = stopped(Defer("batch deadline passed"))
    assert (deferred.status, deferred.detail) == (Status.DEFERRED, "batch deadline passed")
    assert deferred.retry_at == NOW + timedelta(seconds=5)  # half the base wait at draw 0
    given_up = stopped(Defer("batch deadline passed"), attempt=3)
    assert given_up.status is Status.FAILED and not given_up.permanent
    assert given_up.detail == "gave up after 3 attempts: batch deadline passed"


# --- replayed ---------------------------------------------------------------------------------


def replay(claim: Claim, attempt: int = 2, skip: str | None = None) -> Outcome | None:
    return replayed(claim, attempt, skip, now=NOW, policy=POLICY, draw=0.0)


def test_a_settled_recipient_replays_its_outcome() -> None:
    sent = Outcome(Status.SENT, 1, 250, "ok")
    assert replay(Claim(ClaimState.SETTLED, sent)) is sent


def test_a_skipped_claim_replays_the_skip_with_its_reason() -> None:
    assert replay(Claim(ClaimState.SKIPPED), skip="deleted") == \
        Outcome(Status.SKIPPED, 2, detail="deleted")
    assert replay(Claim(ClaimState.SKIPPED)) == Outcome(Status.SKIPPED, 2, detail="cancelled")


def test_a_recorded_deferral_is_published_again_with_a_new_retry_time() -> None:
    deferral = Outcome(Status.DEFERRED, 2, 451, "try later")
    again = replay(Claim(ClaimState.DEFERRED, deferral), attempt=2)
    assert again == Outcome(Status.DEFERRED, 2, 451, "try later",
                            retry_at=NOW + timedelta(seconds=10))
    assert replay(Claim(ClaimState.DEFERRED)) is None  # nothing on record to publish


def test_a_stale_claim_publishes_nothing() -> None:
    assert replay(Claim(ClaimState.STALE)) is None


# --- fair -------------------------------------------------------------------------------------


def test_tenants_take_turns_each_in_its_own_order() -> None:
    items = [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("c", 1), ("b", 2)]
    assert fair(items, lambda item: item[0]) == \
        [("a", 1), ("b", 1), ("c", 1), ("a", 2), ("b", 2), ("a", 3)]
    one = [("a", 2), ("a", 1)]
    assert fair(one, lambda item: item[0]) == one
    assert fair([], lambda item: item) == []


# --- wake, swept, poll_timeout ----------------------------------------------------------------

DELAY_0, DELAY_1, HELD_0 = ("campaign.recipients.retry.1", 0), ("campaign.recipients.retry.1", 1), \
    ("campaign.recipients.held", 0)


def test_only_delay_partitions_whose_head_is_due_wake() -> None:
    due_at = {DELAY_0: NOW - timedelta(seconds=1), DELAY_1: LATER, HELD_0: NOW}
    woken = wake(due_at, Sweeps(seen=4), now=NOW, released=4, clock=STARTED)
    assert woken == Wake(due=(DELAY_0, HELD_0), sweep=False)


def test_a_release_since_the_last_sweep_asks_for_a_sweep() -> None:
    assert wake({}, Sweeps(seen=4), now=NOW, released=5, clock=STARTED) == Wake((), sweep=True)


def test_an_owed_second_sweep_comes_at_its_time_not_before() -> None:
    owed = Sweeps(seen=5, resweep_at=STARTED + 3.0)
    assert not wake({}, owed, now=NOW, released=5, clock=STARTED + 2.9).sweep
    assert wake({}, owed, now=NOW, released=5, clock=STARTED + 3.0).sweep


def test_a_sweep_after_a_release_owes_a_second_one_which_owes_none() -> None:
    first = swept(Sweeps(seen=4), released=5, clock=STARTED, resweep_seconds=3.0)
    assert first == Sweeps(seen=5, resweep_at=STARTED + 3.0)
    second = swept(first, released=5, clock=STARTED + 3.0, resweep_seconds=3.0)
    assert second == Sweeps(seen=5, resweep_at=None)
    assert not wake({}, second, now=NOW, released=5, clock=STARTED + 99).sweep


def test_a_fetch_waits_no_longer_than_the_first_due_head() -> None:
    assert poll_timeout([], now=NOW, longest=0.5) == 0.5
    assert poll_timeout([NOW + timedelta(seconds=9)], now=NOW, longest=0.5) == 0.5
    assert poll_timeout([LATER, NOW + timedelta(seconds=0.2)], now=NOW, longest=0.5) == \
        pytest.approx(0.2)
    # Overdue: still a short wait, never zero or negative.
    assert poll_timeout([NOW - timedelta(seconds=5)], now=NOW, longest=0.5) == 0.01
