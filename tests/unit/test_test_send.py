"""Test sends, pure parts: the command's rules, the aggregate's decision, the test mail."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from email import policy
from email.parser import BytesParser
from typing import Any, TypedDict

import pytest
from pydantic import TypeAdapter, ValidationError

from schemas import events
from schemas.base import EntityId
from schemas.commands import MAX_TEST_ADDRESSES, CreateCampaign, SampleContact, SendCampaign, SendTestEmail
from schemas.envelope import decode, encode, wrap
from services.command_handler.campaign import Campaign, Rejected, Status, decide, evolve
from services.sender import proof_mail
from services.sender.delivery import Outcome
from services.sender.delivery import Status as DeliveryStatus
from services.sender.mime import message_id_for
from services.sender.replies import Attempt, Verdict

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


class Ids(TypedDict):
    campaign_id: str
    tenant_id: str


IDS: Ids = {"campaign_id": "cmp-1", "tenant_id": "acme"}
CREATE = CreateCampaign(name="Spring", subject='Hello {{ first_name | "you" }} in {{ attr.city }}',
                        from_address="news@example.com", body_text="Hi {{ first_name }}",
                        body_html="<p>Hi {{ first_name }}</p>")


def draft() -> Campaign:
    [created] = decide(None, CREATE, **IDS)
    state = evolve(None, created, **IDS)
    assert state is not None
    return state


# --- the command -----------------------------------------------------------------------------


def test_addresses_are_normalised_and_each_kept_once():
    command = SendTestEmail(addresses=["Ann@Example.COM", "ann@example.com", "Ann@example.com"])
    assert command.addresses == ["Ann@example.com", "ann@example.com"]


@pytest.mark.parametrize(("addresses", "message"), [
    ([], "at least 1 item"),
    ([f"u{i}@example.com" for i in range(MAX_TEST_ADDRESSES + 1)], f"at most {MAX_TEST_ADDRESSES} items"),
    (["not-an-address"], "not a valid e-mail address"),
    (["ok@example.com", "two@@example.com"], "not a valid e-mail address"),
])
def test_bad_addresses_are_refused_with_a_clear_error(addresses, message):
    with pytest.raises(ValidationError, match=message):
        SendTestEmail(addresses=addresses)


def test_the_command_survives_the_wire_with_its_test_id():
    command = SendTestEmail(addresses=["a@example.com"], sample=SampleContact(first_name="Ann"))
    again = decode(encode(wrap(command, tenant_id="acme", aggregate_id="cmp-1"))).payload
    assert again == command and isinstance(again.test_id, uuid.UUID)


# --- the aggregate ---------------------------------------------------------------------------


def test_a_draft_campaign_accepts_a_test_send_and_stays_a_draft():
    state = draft()
    command = SendTestEmail(addresses=["a@example.com", "b@example.org"],
                            sample=SampleContact(first_name="Ann", attributes={"city": "Oslo"}))
    [event] = decide(state, command, **IDS)
    assert isinstance(event, events.TestEmailRequested)
    assert event.test_id == command.test_id
    assert event.addresses == ["a@example.com", "b@example.org"]
    assert event.template == state.template and event.sample == command.sample
    assert evolve(state, event, **IDS) == state


@pytest.mark.parametrize("prior", [SendCampaign(list_ids=["l1"]), events.CampaignCancelled()])
def test_any_existing_campaign_accepts_a_test_send(prior: SendCampaign | events.CampaignCancelled):
    state: Campaign | None = draft()
    if isinstance(prior, SendCampaign):
        [sent] = decide(state, prior, **IDS, contacts_snapshot={0: 0})
        state = evolve(state, sent, **IDS)
        assert state is not None and state.status is Status.SENDING
    else:
        state = evolve(state, prior, **IDS)
        assert state is not None and state.status is Status.CANCELLED
    [event] = decide(state, SendTestEmail(addresses=["a@example.com"]), **IDS)
    assert isinstance(event, events.TestEmailRequested)


def test_an_unknown_campaign_or_another_tenants_is_rejected():
    with pytest.raises(Rejected, match="unknown campaign 'cmp-1' for tenant 'acme'"):
        decide(None, SendTestEmail(addresses=["a@example.com"]), **IDS)
    with pytest.raises(Rejected, match="unknown campaign"):
        decide(draft(), SendTestEmail(addresses=["a@example.com"]), campaign_id="cmp-1", tenant_id="other")


# --- the test mail ---------------------------------------------------------------------------


def request(**sample: Any) -> events.TestEmailRequested:
    [event] = decide(draft(), SendTestEmail(addresses=["a@example.com"], sample=SampleContact(**sample)),
                     **IDS)
    assert isinstance(event, events.TestEmailRequested)
    return event


def test_the_test_mail_is_personalised_prefixed_and_has_its_own_message_id():
    event = request(first_name="Ann", attributes={"city": "Oslo"})
    mail = proof_mail.build_test_mail(event, "cmp-1", "a@example.com", NOW)
    parsed = BytesParser(policy=policy.default).parsebytes(mail.content)
    assert parsed["Subject"] == "[TEST] Hello Ann in Oslo"
    assert parsed["Message-ID"] == mail.message_id
    assert re.fullmatch(rf"<test\+{event.test_id.hex}\.[0-9a-f]{{12}}@example\.com>", mail.message_id)
    assert mail.message_id != message_id_for("cmp-1", "test", "news@example.com")
    assert parsed["X-Test-Send"] == str(event.test_id)
    assert parsed["X-Campaign-ID"] == "cmp-1"
    assert mail.recipient == "a@example.com" and mail.sender == "news@example.com"
    body = parsed.get_body(("plain",))
    assert body is not None and "Hi Ann" in body.get_content()
    assert mail.content.count(b"Message-ID:") == 1


def test_message_ids_are_deterministic_per_test_and_address():
    event = request()
    one = proof_mail.build_test_mail(event, "cmp-1", "a@example.com", NOW).message_id
    assert one == proof_mail.build_test_mail(event, "cmp-1", "a@example.com", NOW).message_id
    assert one != proof_mail.build_test_mail(event, "cmp-1", "b@example.com", NOW).message_id
    other = request()
    assert one != proof_mail.build_test_mail(other, "cmp-1", "a@example.com", NOW).message_id


def test_fallbacks_apply_without_sample_fields():
    mail = proof_mail.build_test_mail(request(), "cmp-1", "a@example.com", NOW)
    subject = BytesParser(policy=policy.default).parsebytes(mail.content)["Subject"]
    assert subject == "[TEST] Hello you in"


def test_attempts_become_outcome_events():
    event = request()
    sent = proof_mail.judge(Attempt(Verdict.SENT, 250, "2.0.0 OK"))
    assert sent.status is DeliveryStatus.SENT
    payload = proof_mail.outcome_event(event, "a@example.com", sent, "<m@x>")
    assert isinstance(payload, events.TestEmailSent) and payload.smtp_reply == "250 2.0.0 OK"
    refused = proof_mail.judge(Attempt(Verdict.PERMANENT, 550, "5.1.1 unknown"))
    failed = proof_mail.outcome_event(event, "a@example.com", refused, "<m@x>")
    assert isinstance(failed, events.TestEmailFailed)
    assert failed.permanent and failed.smtp_code == 550 and not failed.ambiguous
    lost = proof_mail.judge(Attempt(Verdict.TRANSIENT, None, "final reply: lost", ambiguous=True))
    lost_event = proof_mail.outcome_event(event, "a@example.com", lost, "<m@x>")
    assert isinstance(lost_event, events.TestEmailFailed) and lost_event.ambiguous
    unknown = Outcome(DeliveryStatus.FAILED, 1, None, "outcome unknown").with_ambiguous(1)
    unknown_event = proof_mail.outcome_event(event, "a@example.com", unknown, "<m@x>")
    assert isinstance(unknown_event, events.TestEmailFailed) and unknown_event.ambiguous


def test_ledger_keys_of_test_sends_cannot_be_campaign_ids():
    key = proof_mail.ledger_campaign(uuid.uuid4())
    with pytest.raises(ValidationError):
        TypeAdapter(EntityId).validate_python(key)
