"""Suppression rules and the records a parsed report becomes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas.bounces import EmailBounced, EmailComplained
from schemas.contacts import ContactSuppressed, contact_key
from schemas.envelope import decode, encode
from services.bounces.events import BOUNCE_TOPIC, records_for
from services.bounces.parse import BounceReport, ComplaintReport, Parsed, Recipient
from services.bounces.policy import ContactOutcome, soft_bounce_streak, suppression
from services.common.topics import CONTACTS

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def _at(day: int, campaign: str, outcome: str) -> ContactOutcome:
    return ContactOutcome(T0 + timedelta(days=day), campaign, outcome)  # type: ignore[arg-type]


def test_a_streak_counts_campaigns_not_reports_and_ends_at_a_good_one():
    history = [_at(0, "c0", "delivered"), _at(1, "c1", "soft_bounce"), _at(1, "c1", "soft_bounce"),
               _at(2, "c2", "delivered"), _at(2, "c2", "soft_bounce"), _at(3, "c3", "soft_bounce")]
    assert soft_bounce_streak(history) == 3
    assert soft_bounce_streak([*history, _at(4, "c4", "delivered")]) == 0
    assert soft_bounce_streak([_at(1, "c1", "soft_bounce"), _at(2, "c2", "engaged"),
                               _at(3, "c3", "soft_bounce")]) == 1
    assert soft_bounce_streak([]) == 0


def test_what_suppresses():
    assert suppression("hard", trusted=True) == ("hard_bounce", "hard bounce")
    assert suppression("complaint", trusted=True) == ("complaint", "complaint")
    assert suppression("hard", trusted=False) is None
    assert suppression("soft", trusted=True, streak=2, soft_limit=3) is None
    assert suppression("soft", trusted=True, streak=3, soft_limit=3) == ("hard_bounce", "3 soft bounces in a row")
    assert suppression("soft", trusted=True, streak=9, soft_limit=0) is None


WHO = Recipient("acme", "cmp-1", "p1", "verp")


def test_a_hard_bounce_is_a_bounce_and_a_suppression_with_stable_ids():
    parsed = Parsed(BounceReport("hard", "5.1.1", "smtp; 550", "mx.example.net", occurred_at=T0), WHO, "dsn:abc")
    records = records_for(parsed, source="dsn", provider="", now=T0 + timedelta(hours=1))
    assert [(r.spec, r.key) for r in records] == [(BOUNCE_TOPIC, b"cmp-1"), (CONTACTS, contact_key("acme", "p1"))]
    bounced, suppressed = (decode(encode(r.envelope)) for r in records)
    assert isinstance(bounced.payload, EmailBounced) and bounced.payload.kind == "hard"
    assert bounced.envelope.occurred_at == T0 and bounced.envelope.tenant_id == "acme"
    assert isinstance(suppressed.payload, ContactSuppressed) and suppressed.payload.reason == "hard_bounce"
    assert suppressed.envelope.causation_id == bounced.envelope.id
    again = records_for(parsed, source="dsn", provider="", now=T0 + timedelta(days=2))
    assert [encode(r.envelope) for r in again] == [encode(r.envelope) for r in records]


def test_soft_bounces_and_unsigned_attributions_do_not_suppress():
    soft = Parsed(BounceReport("soft", "4.2.2"), WHO, "dsn:soft")
    assert len(records_for(soft, source="dsn", provider="", now=T0)) == 1
    assert len(records_for(soft, source="dsn", provider="", now=T0, streak=3, soft_limit=3)) == 2
    unsigned = Parsed(BounceReport("hard", "5.1.1"), Recipient("acme", "cmp-1", "p1", "headers"), "dsn:h")
    assert len(records_for(unsigned, source="dsn", provider="", now=T0)) == 1
    assert len(records_for(unsigned, source="dsn", provider="", now=T0, trust_headers=True)) == 2


def test_a_complaint_suppresses_for_complaint():
    parsed = Parsed(ComplaintReport("abuse"), Recipient("acme", "cmp-1", "p1", "provider"), "webhook:ses:1")
    bounced, suppressed = records_for(parsed, source="webhook", provider="ses", now=T0)
    assert isinstance(bounced.envelope, object)
    complaint = decode(encode(bounced.envelope)).payload
    assert isinstance(complaint, EmailComplained) and complaint.source == "webhook" and complaint.provider == "ses"
    assert decode(encode(suppressed.envelope)).payload == ContactSuppressed(
        contact_id="p1", reason="complaint", detail="complaint (webhook:ses:1)")
