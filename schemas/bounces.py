"""Asynchronous bounces and complaints: what a remote system said about a mail after it left.

`EmailBounced` and `EmailComplained` are facts about one recipient of one campaign (the
envelope's tenant id names the tenant, its aggregate id the campaign, its occurred_at the
moment the remote side reported it). Each carries a `dedup_key` derived from the report itself
(the DSN's Message-ID, a provider's event id...): the same report received twice gives the
same key and so the same envelope id (`bounce_event_id`), which is how readers count once.

A hard bounce or a complaint is followed by `schemas.contacts.ContactSuppressed`
(hard_bounce / complaint) on contacts.events; these two events never suppress by themselves.
"""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import Field

from schemas.base import EntityId, Record
from schemas.registry import message

# Namespace of the envelope ids of bounce and complaint events (name-based on the dedup key).
_BOUNCE_NAMESPACE = uuid.UUID("3c7f2e0a-5b1d-4e8a-9f63-0d2c4b6a8e17")

BounceKind = Literal["hard", "soft"]
# dsn: an RFC 3464 report (or a non-standard bounce) mailed to the bounce domain; webhook: a
# provider's notification; smtp: the relay's own reply during the sender's transaction.
BounceSource = Literal["dsn", "webhook", "smtp"]
ComplaintSource = Literal["arf", "webhook"]
# How the recipient was found: a signed VERP token (in the envelope or in the report), a
# provider's signed notification, or our unsigned headers of the returned original.
Attribution = Literal["verp", "provider", "headers"]
# RFC 3463 enhanced status code (class.subject.detail), or empty when the report gave none.
_STATUS = r"^$|^[245]\.[0-9]{1,3}\.[0-9]{1,3}$"


def bounce_event_id(dedup_key: str, type_name: str) -> uuid.UUID:
    """Envelope id of the event a report gives: one id per report and event type."""
    return uuid.uuid5(_BOUNCE_NAMESPACE, f"{type_name}\x00{dedup_key}")


@message("EmailBounced", 1)
class EmailBounced(Record):
    """A mail of the campaign to the contact bounced: hard (permanent, 5.x.x) or soft
    (transient, 4.x.x or a delay warning)."""

    campaign_id: EntityId
    contact_id: EntityId
    kind: BounceKind
    status: str = Field(default="", pattern=_STATUS)
    diagnostic: str = Field(default="", max_length=1000)
    remote_mta: str = Field(default="", max_length=255)
    source: BounceSource
    provider: str = Field(default="", max_length=64)
    attribution: Attribution
    dedup_key: str = Field(min_length=1, max_length=200)


@message("EmailComplained", 1)
class EmailComplained(Record):
    """The contact reported the campaign's mail (an ARF report of a feedback loop, or a
    provider's complaint notification)."""

    campaign_id: EntityId
    contact_id: EntityId
    feedback_type: str = Field(default="abuse", min_length=1, max_length=64)
    source: ComplaintSource
    provider: str = Field(default="", max_length=64)
    attribution: Attribution
    dedup_key: str = Field(min_length=1, max_length=200)
