"""The records a parsed bounce or complaint becomes: pure, no I/O.

`records_for` gives EmailBounced / EmailComplained on the bounce topic and, when the policy
says so (services.bounces.policy), ContactSuppressed on contacts.events. Every envelope id is
a name-based UUID of the report's dedup key (`schemas.bounces.bounce_event_id`), so a report
received twice (an MTA retrying after a lost 250, a provider redelivering a webhook) gives
byte-identical envelopes that readers count once.

Topic: campaign.engagement is where the design puts bounces and complaints, but it is not in
the catalogue yet; until it is, they go to campaign.deliveries (keyed by campaign id like
them: a bounce is the late outcome of a delivery, and its readers already skip types they do
not know). `BOUNCE_TOPIC` is the one place to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from schemas.base import Record
from schemas.bounces import BounceSource, ComplaintSource, EmailBounced, EmailComplained, bounce_event_id
from schemas.contacts import ContactSuppressed, contact_key
from schemas.envelope import Envelope, wrap
from services.bounces.parse import BounceReport, Parsed
from services.bounces.policy import suppression
from services.common.topics import CONTACTS, DELIVERIES, TopicSpec

BOUNCE_TOPIC = DELIVERIES


@dataclass(frozen=True, slots=True)
class Outgoing:
    spec: TopicSpec
    key: bytes
    envelope: Envelope


def records_for(parsed: Parsed, *, source: BounceSource | ComplaintSource, provider: str, now: datetime,
                trust_headers: bool = False, streak: int = 0, soft_limit: int = 0) -> list[Outgoing]:
    """The records of one parsed report (see the module's docstring)."""
    report, who = parsed.report, parsed.recipient
    at = report.occurred_at or now
    attribution = who.via
    fact: Record
    kind: Literal["hard", "soft", "complaint"]
    if isinstance(report, BounceReport):
        fact = EmailBounced(
            campaign_id=who.campaign_id, contact_id=who.contact_id, kind=report.kind,
            status=report.status, diagnostic=report.diagnostic, remote_mta=report.remote_mta,
            source="webhook" if source == "webhook" else "smtp" if source == "smtp" else "dsn",
            provider=provider, attribution=attribution, dedup_key=parsed.dedup_key,
        )
        kind = report.kind
    else:
        fact = EmailComplained(
            campaign_id=who.campaign_id, contact_id=who.contact_id,
            feedback_type=report.feedback_type, source="webhook" if source == "webhook" else "arf",
            provider=provider, attribution=attribution, dedup_key=parsed.dedup_key,
        )
        kind = "complaint"
    type_name = type(fact).__name__
    first = wrap(fact, tenant_id=who.tenant_id, aggregate_id=who.campaign_id, occurred_at=at,
                 message_id=bounce_event_id(parsed.dedup_key, type_name))
    out = [Outgoing(BOUNCE_TOPIC, who.campaign_id.encode(), first)]
    trusted = attribution != "headers" or trust_headers
    verdict = suppression(kind, trusted=trusted, streak=streak, soft_limit=soft_limit)
    if verdict is not None:
        reason, detail = verdict
        suppressed = ContactSuppressed(contact_id=who.contact_id, reason=reason,
                                       detail=f"{detail} ({parsed.dedup_key})"[:1000])
        out.append(Outgoing(CONTACTS, contact_key(who.tenant_id, who.contact_id), wrap(
            suppressed, tenant_id=who.tenant_id, aggregate_id=who.contact_id, occurred_at=at,
            correlation_id=first.correlation_id, causation_id=first.id,
            message_id=bounce_event_id(parsed.dedup_key, "ContactSuppressed"),
        )))
    return out
