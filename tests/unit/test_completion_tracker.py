"""Unit tests of the completion tracker's pure bookkeeping: when is a campaign complete."""

from __future__ import annotations

import uuid

from schemas.base import Record
from schemas.envelope import Message, decode, encode, wrap
from schemas.events import (
    CampaignCancelled,
    CampaignCompleted,
    CampaignCreated,
    CampaignHydrated,
    EmailFailed,
    EmailSent,
    MessageTemplate,
)
from services.completion.tracker import CompletionTracker

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
