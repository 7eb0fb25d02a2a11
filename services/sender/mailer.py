"""One attempt for one recipient, on a send thread: the check right before it, the rate-limit
slot, the message, one SMTP transaction and what it comes to.

Guarantees (decisions.pre_send, booked and untried decide; this carries them out): a
recipient is mailed only while its campaign is sending and it is not skipped, never once the
batch deadline has passed, and under a rate limit never before the slot it booked; at most one
SMTP transaction per recipient and call; a recipient whose message cannot be built fails for
good without stopping the batch; `mail` and `mail_many` never raise for SMTP or network
trouble.

`mail_many` checks and builds its recipients one after the other and hands the mails that
passed to the transport together (one session, one transaction after the other,
services/sender/smtp_pool.py); right before each transaction, the transport asks
the check again (`go`), so a recipient is mailed only if its campaign is still sending and the
batch deadline has not passed at its own turn, not only when its group was built: a pause or
the deadline holds back the rest of a group (their outcomes are the check's). A recipient that
must wait for its slot sends the ones before it first (groups are not used under a rate limit).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime

import structlog

from services.sender.control import ControlBoard
from services.sender.decisions import Book, Bounds, Send, booked, pre_send, skip_reason, untried
from services.sender.delivery import Outcome, judge_attempt
from services.sender.do_not_mail import DoNotMailList
from services.sender.list_unsubscribe import ListUnsubscribe
from services.sender.marks import MailMarks
from services.sender.mime import OutgoingMail, build_mail
from services.sender.render import render
from services.sender.retries import RetryPolicy
from services.sender.smtp_pool import NOT_TRIED
from services.sender.throttle import RateLimiter
from services.sender.transport import MailTransport, transmit_all
from services.sender.work import Work

log = structlog.get_logger("sender")

# No SMTP attempt starts later than this into a batch: guards against a relay that hangs or
# crawls, which would otherwise keep the batch going past max.poll.interval.ms, get this
# sender evicted from the group and its recipients handed to another sender mid-send.
BATCH_DEADLINE_SECONDS = 120.0
# Longest a send thread waits for its rate-limit slot, and latest (into the batch) a slot may
# be: beyond either, the recipient goes to a delay topic for that slot instead, so a tight
# limit neither stretches a batch (and the partitions it holds) towards max.poll.interval.ms
# nor runs into the batch deadline, which would count as a failed attempt.
MAX_THROTTLE_WAIT_SECONDS = 2.0
THROTTLED_BATCH_SECONDS = 5.0
# A throttled recipient is taken back from its delay topic this long before its slot and its
# send thread waits for the slot there: the way back (pause, resume, fetch) takes some tenths
# of a second, and a paid slot is only good at its time (one back later books a new slot).
THROTTLED_EARLY_SECONDS = 1.0
SEND_BOUNDS = Bounds(BATCH_DEADLINE_SECONDS, MAX_THROTTLE_WAIT_SECONDS, THROTTLED_BATCH_SECONDS,
                     THROTTLED_EARLY_SECONDS)


class Mailer:
    """Mails work items over `transport`; thread-safe (every send thread calls `mail`)."""

    def __init__(self, transport: MailTransport, *, board: ControlBoard,
                 do_not_mail: DoNotMailList, limiter: RateLimiter, policy: RetryPolicy,
                 list_unsubscribe: ListUnsubscribe | None, bounds: Bounds = SEND_BOUNDS,
                 marks: MailMarks | None = None) -> None:
        self._transport = transport
        self._board = board
        self._do_not_mail = do_not_mail
        self._limiter = limiter
        self._policy = policy
        self._list_unsubscribe = list_unsubscribe
        self._bounds = bounds
        self._marks = marks
        self._rng = random.Random()  # noqa: S311 - backoff jitter, not security

    def mail(self, item: Work, started: float) -> Outcome:
        """One attempt for `item` (`started`: monotonic time its batch started)."""
        return self.mail_many([item], started)[0]

    def mail_many(self, items: Sequence[Work], started: float) -> list[Outcome]:
        """One attempt for each of `items`, in order, `mail` for each: the mails that pass
        their check go to the transport together (one session), except that a mail that has
        to wait for its rate-limit slot sends those before it first, then waits."""
        outcomes: list[Outcome | None] = [None] * len(items)
        ready: list[tuple[int, OutgoingMail]] = []
        for index, item in enumerate(items):
            check = self._check(item, started)
            if not isinstance(check, Send):
                outcomes[index] = check
                continue
            if check.wait > 0:
                self._transmit(items, ready, outcomes, started)
                ready = []
                time.sleep(check.wait)  # a send thread pacing itself; the consumer loop is free
            built = self._build(item)
            if isinstance(built, Outcome):
                outcomes[index] = built
            else:
                ready.append((index, built))
        self._transmit(items, ready, outcomes, started)
        assert all(outcome is not None for outcome in outcomes)
        return outcomes  # type: ignore[return-value]

    def _check(self, item: Work, started: float) -> Send | Outcome:
        """The check right before the attempt: Send, or what the untried attempt comes to."""
        recipient = item.recipient
        tenant = item.envelope.tenant_id
        control = self._board.state(recipient.campaign_id)
        now = datetime.now(UTC)
        skip = skip_reason(control, self._do_not_mail.reason(tenant, recipient.contact_id))
        check = pre_send(control, skip, now=now, clock=time.monotonic(), started=started,
                         slot=item.slot, limited=self._limiter.active, bounds=self._bounds)
        if isinstance(check, Book):
            clock = time.monotonic()
            server = self._transport.server_for(recipient.template.from_address)
            wait = self._limiter.book(tenant, server, clock)
            check = booked(wait, clock=clock, started=started, now=now, bounds=self._bounds)
        if isinstance(check, Send):
            return check
        return untried(check, item.attempt, first_attempt_at=item.first_attempt_at, now=now,
                       policy=self._policy, draw=self._rng.random())

    def _build(self, item: Work) -> OutgoingMail | Outcome:
        """The message of `item`, or its permanent failure when it cannot be built."""
        recipient = item.recipient
        tenant = item.envelope.tenant_id
        now = datetime.now(UTC)
        try:
            extra = (self._list_unsubscribe.headers(tenant, recipient.contact_id,
                                                    recipient.campaign_id)
                     if self._list_unsubscribe else None)
            content = render(recipient)
            marks = self._marks
            if marks is None:
                return build_mail(recipient, content, now, extra)
            mail = build_mail(recipient, marks.content(tenant, recipient, content, now), now,
                              extra)
            sender = marks.envelope_sender(tenant, recipient)
            return mail if sender is None else replace(mail, sender=sender)
        except Exception as exc:  # a recipient that cannot be built must not stop the batch
            log.exception("message not built", campaign_id=recipient.campaign_id,
                          contact_id=recipient.contact_id)
            return Outcome.unbuildable(item.attempt, exc)

    def _still_go(self, items: Sequence[Work], ready: list[tuple[int, OutgoingMail]],
                  outcomes: list[Outcome | None], started: float) -> Callable[[int], bool]:
        """The check again, right before ready mail j's transaction: a mail of a group is
        mailed only if its campaign is still sending and the batch deadline has not passed
        then, not only when its group was built. Not under a rate limit (the check would book
        another slot): groups are not used there."""
        def go(j: int) -> bool:
            index = ready[j][0]
            check = self._check(items[index], started)
            if isinstance(check, Send):
                return True
            outcomes[index] = check
            return False
        return go

    def _transmit(self, items: Sequence[Work], ready: list[tuple[int, OutgoingMail]],
                  outcomes: list[Outcome | None], started: float) -> None:
        """Send the `ready` mails (at most one SMTP transaction each) and judge each attempt."""
        if not ready:
            return
        go = None if len(ready) == 1 or self._limiter.active else self._still_go(
            items, ready, outcomes, started)
        attempts = transmit_all(self._transport, [mail for _, mail in ready], go)
        now = datetime.now(UTC)
        for (index, _), result in zip(ready, attempts, strict=True):
            if result is NOT_TRIED.attempt:
                continue  # held back by its check: the outcome is the check's
            item = items[index]
            outcome = judge_attempt(result, item.attempt, first_attempt_at=item.first_attempt_at,
                                    now=now, policy=self._policy, draw=self._rng.random())
            if outcome.ambiguous:
                log.warning("possible duplicate: connection lost after DATA",
                            campaign_id=item.recipient.campaign_id,
                            contact_id=item.recipient.contact_id, attempt=item.attempt)
            outcomes[index] = outcome
