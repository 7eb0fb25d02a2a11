"""Unit tests of the completion tracker's pure bookkeeping: when is a campaign complete."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from schemas.base import Record
from schemas.envelope import Message, decode, encode, wrap
from schemas.events import (
    CampaignCancelled,
    CampaignCompleted,
    CampaignCreated,
    CampaignHydrated,
    EmailDeferred,
    EmailFailed,
    EmailSent,
    MessageTemplate,
    RecipientSkipped,
)
from services.completion.tracker import AutoPause, CompletionTracker, FailureGuard

CAMPAIGN = "camp-1"
TEMPLATE = MessageTemplate(subject="Hello", from_address="news@example.com", body_text="Hi")


def msg(payload: Record, *, tenant: str = "acme", aggregate: str = CAMPAIGN,
        correlation: uuid.UUID | None = None) -> Message[Record]:
    # Through the real codec, so the test sees exactly what the service decodes.
    return decode(encode(wrap(payload, tenant_id=tenant, aggregate_id=aggregate,
                              correlation_id=correlation)))


def hydrated(total: int, **kwargs) -> Message[Record]:
    return msg(CampaignHydrated(total=total), **kwargs)


def sent(contact: str, campaign: str = CAMPAIGN, tenant: str = "acme") -> Message[Record]:
    return msg(EmailSent(campaign_id=campaign, contact_id=contact,
                         email=f"{contact}@example.com", message_id=f"<{contact}@mx>",
                         attempt=1), tenant=tenant, aggregate=campaign)


def failed(contact: str, campaign: str = CAMPAIGN) -> Message[Record]:
    return msg(EmailFailed(campaign_id=campaign, contact_id=contact,
                           email=f"{contact}@example.com", attempt=3, reason="550 no such user",
                           permanent=True, smtp_code=550), aggregate=campaign)


def run(tracker: CompletionTracker, messages: list[Message[Record]]) -> list:
    return [c for m in messages if (c := tracker.apply(m)) is not None]


def test_completes_once_when_every_recipient_is_terminal() -> None:
    tracker = CompletionTracker()
    flow = uuid.uuid4()
    hydration = hydrated(3, correlation=flow)
    last = failed("c")
    done = run(tracker, [hydration, sent("a"), sent("b"), last])
    assert len(done) == 1
    completion = done[0]
    assert completion.event == CampaignCompleted(total=3, sent=2, failed=1)
    assert (completion.tenant_id, completion.campaign_id) == ("acme", CAMPAIGN)
    # The flow of the send, caused by the delivery that completed it.
    assert completion.correlation_id == flow
    assert completion.causation_id == last.envelope.id
    assert run(tracker, [sent("a"), failed("c"), sent("d"), hydrated(3)]) == []


def test_duplicate_deliveries_never_double_count() -> None:
    tracker = CompletionTracker()
    assert run(tracker, [hydrated(3), sent("a"), sent("a"), failed("a"), sent("b"),
                         sent("b")]) == []
    progress = tracker.campaigns[CAMPAIGN]
    # The first terminal outcome of a recipient is the one that counts.
    assert (progress.sent, progress.failed, progress.outcomes) == (2, 0, {"a": "sent", "b": "sent"})
    [completion] = run(tracker, [sent("b"), failed("c")])
    assert completion.event == CampaignCompleted(total=3, sent=2, failed=1)


def test_deliveries_before_hydration_count_when_it_arrives() -> None:
    tracker = CompletionTracker()
    assert run(tracker, [sent("a"), sent("b"), sent("a")]) == []
    assert tracker.campaigns[CAMPAIGN].total is None
    hydration = hydrated(2)
    [completion] = run(tracker, [hydration])
    assert completion.event == CampaignCompleted(total=2, sent=2, failed=0)
    assert completion.causation_id == hydration.envelope.id


def test_total_zero_completes_on_hydration() -> None:
    tracker = CompletionTracker()
    [completion] = run(tracker, [hydrated(0)])
    assert completion.event == CampaignCompleted(total=0, sent=0, failed=0)
    assert run(tracker, [hydrated(0)]) == []


def test_a_cancelled_campaign_is_never_completed() -> None:
    tracker = CompletionTracker()
    assert run(tracker, [hydrated(2), sent("a"), msg(CampaignCancelled(reason="typo")),
                         sent("b"), failed("c")]) == []
    progress = tracker.campaigns[CAMPAIGN]
    assert progress.cancelled and not progress.completed
    assert progress.outcomes == {}  # nothing more to track


def test_a_completion_already_on_the_log_is_not_decided_again() -> None:
    tracker = CompletionTracker()
    # Replay: the facts and the completion an earlier transaction published.
    done = run(tracker, [hydrated(2), sent("a"),
                         msg(CampaignCompleted(total=2, sent=2, failed=0)), sent("b")])
    assert done == []
    assert tracker.campaigns[CAMPAIGN].completed
    assert run(tracker, [sent("b"), sent("c")]) == []


def test_campaigns_are_tracked_separately_and_other_facts_are_ignored() -> None:
    tracker = CompletionTracker()
    other = "camp-2"
    done = run(tracker, [
        msg(CampaignCreated(name="x", template=TEMPLATE)),
        hydrated(1), hydrated(1, aggregate=other), sent("a", campaign=other), sent("a"),
    ])
    assert sorted(c.campaign_id for c in done) == [CAMPAIGN, other]


def test_facts_of_another_tenant_are_ignored() -> None:
    tracker = CompletionTracker()
    assert run(tracker, [hydrated(1), sent("a", tenant="intruder")]) == []
    assert tracker.dropped == 1
    [completion] = run(tracker, [sent("a")])
    assert completion.tenant_id == "acme"


def deferred(contact: str) -> Message[Record]:
    return msg(EmailDeferred(campaign_id=CAMPAIGN, contact_id=contact,
                             email=f"{contact}@example.com", attempt=1, reason="451 later",
                             smtp_code=451, retry_at=datetime(2026, 1, 1, tzinfo=UTC)))


def skipped(contact: str, reason: str = "suppressed:hard_bounce") -> Message[Record]:
    return msg(RecipientSkipped(campaign_id=CAMPAIGN, contact_id=contact,
                                email=f"{contact}@example.com", reason=reason))


def test_skipped_is_terminal_and_deferred_is_not() -> None:
    tracker = CompletionTracker()
    assert run(tracker, [hydrated(3), deferred("a"), deferred("b"), sent("a"), skipped("c")]) == []
    assert tracker.campaigns[CAMPAIGN].outcomes == {"a": "sent", "c": "skipped"}
    [completion] = run(tracker, [deferred("b"), failed("b")])
    assert completion.event == CampaignCompleted(total=3, sent=1, failed=1, skipped=1)


def test_completed_v1_reads_as_nothing_skipped() -> None:
    from schemas.registry import load

    assert load("CampaignCompleted", 1, {"total": 2, "sent": 1, "failed": 1}) == CampaignCompleted(
        total=2, sent=1, failed=1, skipped=0)


def test_failure_rate_guard_asks_for_one_pause() -> None:
    tracker = CompletionTracker(FailureGuard(min_deliveries=4, failure_rate=0.5))
    flow = uuid.uuid4()
    # Two of three failed: above half, but too few deliveries to judge.
    assert run(tracker, [hydrated(10, correlation=flow), failed("a"), sent("b"), failed("c")]) == []
    trigger = failed("d")
    [pause] = run(tracker, [trigger])
    assert isinstance(pause, AutoPause) and pause.campaign_id == CAMPAIGN
    assert pause.correlation_id == flow and pause.causation_id == trigger.envelope.id
    assert "75%" in pause.reason
    assert run(tracker, [failed("e"), failed("f")]) == []  # asked once, never again


def test_failure_rate_guard_can_be_off() -> None:
    tracker = CompletionTracker(FailureGuard(min_deliveries=1, failure_rate=None))
    assert run(tracker, [hydrated(3), failed("a"), failed("b")]) == []
