"""Events: facts, on campaign.events, the hydration topics, campaign.recipients and
campaign.deliveries. An event is never rejected; consumers apply it."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import AwareDatetime, Field

from schemas.base import Email, EntityId, HeaderText, Record
from schemas.commands import SampleContact, SendCampaign
from schemas.registry import message, upcaster
from schemas.segments import Criteria


def _unset(value: bool) -> bool:
    return not value


class MessageTemplate(Record):
    """The content of a campaign, rendered per recipient by the sender. `track_opens` /
    `track_clicks`: the campaign's tracking (its CampaignCreated's), carried to every
    RecipientQueued; records written before they existed decode as untracked."""

    subject: HeaderText
    from_address: Email
    body_text: str | None = None
    body_html: str | None = None
    # Written only when set: an untracked campaign's records stay byte for byte what they
    # were (readers with a closed shape of the template, like the projector's fast decode,
    # keep reading them).
    track_opens: bool = Field(False, exclude_if=_unset)
    track_clicks: bool = Field(False, exclude_if=_unset)


class AudienceSegment(Record):
    """A segment as it was defined when sending started (its criteria are snapshotted, so a
    later change of the segment does not change a send in flight)."""

    segment_id: EntityId
    criteria: Criteria


class Audience(Record):
    """Who a send targets, before resolution: contacts picked by id, members of lists and
    matches of segments (each contact once, however many of them name it), minus members of
    the exclusion lists and matches of the exclusion segments."""

    contact_ids: list[EntityId] = Field(default_factory=list)
    list_ids: list[EntityId] = Field(default_factory=list)
    segments: list[AudienceSegment] = Field(default_factory=list)
    exclude_list_ids: list[EntityId] = Field(default_factory=list)
    exclude_segments: list[AudienceSegment] = Field(default_factory=list)


# --- campaign.events -------------------------------------------------------------------


@message("CampaignCreated", 2)
class CampaignCreated(Record):
    """A draft campaign exists; `track_opens` / `track_clicks` as its CreateCampaign asked."""

    name: str
    template: MessageTemplate
    track_opens: bool = False
    track_clicks: bool = False


@upcaster("CampaignCreated", 1)
def upcast_campaign_created_v1_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 knew no tracking: opens and clicks are not tracked."""
    return {**payload, "track_opens": False, "track_clicks": False}


@message("CampaignUpdated", 1)
class CampaignUpdated(Record):
    """A campaign's content or tracking changed before it sent: its whole content as it is
    now (not a diff), so a consumer overwrites what it holds."""

    name: str
    template: MessageTemplate
    track_opens: bool = False
    track_clicks: bool = False


@message("CampaignSendRequested", 2)
class CampaignSendRequested(Record):
    """Sending starts. `contacts_snapshot` holds contacts.events end offsets per partition at
    that moment: the audience is the contacts known up to there, not those added later."""

    template: MessageTemplate
    audience: Audience
    contacts_snapshot: dict[int, int]


@upcaster("CampaignSendRequested", 1)
def upcast_send_requested_v1_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 audiences had ids and lists only; the new audience fields default to empty."""
    return payload


@message("CampaignCancelled", 1)
class CampaignCancelled(Record):
    reason: str | None = None


@message("CampaignPaused", 1)
class CampaignPaused(Record):
    """Sending stops until CampaignResumed: senders hold the campaign's recipients durably
    (none is mailed, none is lost). `automatic` when the failure-rate guard paused it."""

    reason: str | None = None
    automatic: bool = False


@message("CampaignResumed", 1)
class CampaignResumed(Record):
    """Sending continues where it stopped: held recipients are mailed, none twice."""


@message("CommandRejected", 1)
class CommandRejected(Record):
    """A command that was refused, and why. Nothing else changed."""

    command_id: uuid.UUID | None
    command_type: str | None
    reason: str = Field(min_length=1)


# Hand-picked contact ids named one by one in CampaignHydrated (and in each partition's
# report): enough to show a person which picks were wrong; the count covers the rest (a send
# may pick up to 100,000, and a record must stay far below Kafka's message size limit).
MAX_UNKNOWN_CONTACT_IDS = 1_000


@message("CampaignHydrated", 3)
class CampaignHydrated(Record):
    """The audience is resolved: `total` distinct recipients were queued, and `excluded`
    counts, by reason, those of the audience that must not be mailed (unsubscribed,
    suppressed:<reason>, deleted). total + sum(excluded) is the raw audience.

    `unknown_contact_count` hand-picked contact ids named no contact of the campaign's tenant
    when sending started (whether or not another tenant has a contact with that id: the
    answer is the same); `unknown_contact_ids` names the first MAX_UNKNOWN_CONTACT_IDS of them
    in sorted order (all of them when the count is not larger)."""

    total: int = Field(ge=0)
    excluded: dict[str, int] = Field(default_factory=dict)
    unknown_contact_ids: list[EntityId] = Field(default_factory=list, max_length=MAX_UNKNOWN_CONTACT_IDS)
    unknown_contact_count: int = Field(default=0, ge=0)


@upcaster("CampaignHydrated", 1)
def upcast_campaign_hydrated_v1_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 knew no exclusions: nobody was excluded."""
    return {**payload, "excluded": {}}


@upcaster("CampaignHydrated", 2)
def upcast_campaign_hydrated_v2_v3(payload: dict[str, Any]) -> dict[str, Any]:
    """v2 did not report hand-picked ids that named no contact: none are listed."""
    return {**payload, "unknown_contact_ids": [], "unknown_contact_count": 0}


@message("CampaignCompleted", 2)
class CampaignCompleted(Record):
    """Every one of the `total` hydrated recipients reached a terminal delivery: `sent` of
    them were sent, `failed` failed and `skipped` were skipped (suppressed or unsubscribed
    after hydration); sent + failed + skipped == total. Published once per campaign by the
    completion tracker."""

    total: int = Field(ge=0)
    sent: int = Field(ge=0)
    failed: int = Field(ge=0)
    skipped: int = Field(default=0, ge=0)


@upcaster("CampaignCompleted", 1)
def upcast_campaign_completed_v1_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 knew no skipped recipients."""
    return {**payload, "skipped": 0}


# --- hydration (internal scatter/gather) -----------------------------------------------


@message("HydrationRequested", 2)
class HydrationRequested(Record):
    """One copy per contacts partition: resolve the audience among that partition's contacts."""

    campaign_id: EntityId
    partition: int = Field(ge=0)
    partitions: int = Field(ge=1)
    snapshot_offset: int = Field(ge=0)
    template: MessageTemplate
    audience: Audience
    # When sending was requested: segments' relative dates are read against it, the same
    # in every partition and in a redone fan-out.
    requested_at: datetime | None = None


@upcaster("HydrationRequested", 1)
def upcast_hydration_requested_v1_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 audiences had ids and lists only; the new audience fields default to empty."""
    return payload


@message("HydrationPartitionReported", 3)
class HydrationPartitionReported(Record):
    """A partition's share of the audience has been queued (and its exclusions counted).

    `unknown_contact_ids` / `unknown_contact_count`: the hand-picked contact ids that belong
    to this partition (by their record key, tenant + id) and name no contact of the tenant
    known before the send's snapshot; at most MAX_UNKNOWN_CONTACT_IDS are named, sorted."""

    campaign_id: EntityId
    partition: int = Field(ge=0)
    partitions: int = Field(ge=1)
    queued: int = Field(ge=0)
    excluded: dict[str, int] = Field(default_factory=dict)
    unknown_contact_ids: list[EntityId] = Field(default_factory=list, max_length=MAX_UNKNOWN_CONTACT_IDS)
    unknown_contact_count: int = Field(default=0, ge=0)


@upcaster("HydrationPartitionReported", 1)
def upcast_partition_reported_v1_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 knew no exclusions: nobody was excluded."""
    return {**payload, "excluded": {}}


@upcaster("HydrationPartitionReported", 2)
def upcast_partition_reported_v2_v3(payload: dict[str, Any]) -> dict[str, Any]:
    """v2 did not report hand-picked ids that named no contact: none are listed."""
    return {**payload, "unknown_contact_ids": [], "unknown_contact_count": 0}


# --- campaign.recipients -----------------------------------------------------------------


@message("RecipientQueued", 1)
class RecipientQueued(Record):
    """Everything a sender needs to mail one recipient, so senders never query a database."""

    campaign_id: EntityId
    contact_id: EntityId
    email: Email
    first_name: str = ""
    last_name: str = ""
    attributes: dict[str, str] = Field(default_factory=dict)
    template: MessageTemplate


@message("RecipientExcluded", 1)
class RecipientExcluded(Record):
    """A contact of the audience that is not mailed, and why (unsubscribed,
    suppressed:<reason>, deleted). Senders pass over it; it is terminal for that contact."""

    campaign_id: EntityId
    contact_id: EntityId
    email: str
    reason: str = Field(min_length=1)


# --- campaign.deliveries -----------------------------------------------------------------


@message("EmailSent", 2)
class EmailSent(Record):
    """Terminal: the relay accepted the mail. Terminal events are published at least once;
    every copy of a recipient's terminal event has the same envelope id (see the README).
    `ambiguous` counts earlier attempts for this recipient whose outcome was unknown (a crash
    between claim and settle, or a connection lost after the final "."): each is a possible
    duplicate in the recipient's inbox."""

    campaign_id: EntityId
    contact_id: EntityId
    email: Email
    message_id: str
    attempt: int = Field(ge=1)
    smtp_reply: str = ""
    ambiguous: int = Field(default=0, ge=0)


@upcaster("EmailSent", 1)
def upcast_email_sent_v1_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 did not count ambiguous attempts."""
    return {**payload, "ambiguous": 0}


@message("EmailFailed", 2)
class EmailFailed(Record):
    """Terminal: permanent reply (5xx), or transient failures past the attempt/age limit."""

    campaign_id: EntityId
    contact_id: EntityId
    email: Email
    attempt: int = Field(ge=1)
    reason: str
    permanent: bool
    smtp_code: int | None = None
    ambiguous: int = Field(default=0, ge=0)


@upcaster("EmailFailed", 1)
def upcast_email_failed_v1_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 did not count ambiguous attempts."""
    return {**payload, "ambiguous": 0}


@message("EmailDeferred", 1)
class EmailDeferred(Record):
    """Not terminal: a transient failure (4xx, timeout, connection lost before the end of
    DATA); the recipient is retried through the delay topics at `retry_at`."""

    campaign_id: EntityId
    contact_id: EntityId
    email: Email
    attempt: int = Field(ge=1)
    reason: str
    smtp_code: int | None = None
    retry_at: datetime


@message("RecipientSkipped", 1)
class RecipientSkipped(Record):
    """Terminal: the recipient was not mailed and will not be, and why ("cancelled",
    "suppressed:<reason>", "unsubscribed" when that became known after hydration)."""

    campaign_id: EntityId
    contact_id: EntityId
    email: str
    reason: str = Field(min_length=1)


# --- campaign.recipients.retry.* ---------------------------------------------------------


@message("RecipientRetryScheduled", 1)
class RecipientRetryScheduled(Record):
    """A recipient queued on a delay topic: the sender makes attempt `attempt` once `retry_at`
    has come. Either attempt `attempt - 1` failed transiently, or (`throttled`) a rate limit
    booked this recipient's slot at `retry_at`, which is then already paid for (attempt
    unchanged; the sender takes it back a little early and waits for the slot).
    `first_attempt_at` bounds the total age of the delivery."""

    recipient: RecipientQueued
    attempt: int = Field(ge=1)
    retry_at: AwareDatetime
    first_attempt_at: AwareDatetime
    throttled: bool = False


# --- scheduling (campaign.events) ----------------------------------------------------------


@message("CampaignScheduled", 1)
class CampaignScheduled(Record):
    """The campaign will be sent at `send_at` to the audience of `send` (decided then, with
    the contacts and segments of that moment), unless it is found more than `grace_seconds`
    late."""

    send_at: AwareDatetime
    grace_seconds: int = Field(ge=0)
    send: SendCampaign


@message("CampaignScheduleMissed", 1)
class CampaignScheduleMissed(Record):
    """The schedule did not fire, and why (found too late, or its audience no longer valid):
    reported instead of sending silently late. ForceScheduledSend still fires it."""

    send_at: AwareDatetime
    noticed_at: AwareDatetime
    reason: str = Field(min_length=1)


# --- test sends (campaign.events) ------------------------------------------------------------
# Campaign-level facts, not deliveries: they never appear on campaign.recipients or
# campaign.deliveries, so no audience, counter or completion can mistake them for the real
# send. `__test__ = False` only tells pytest these "Test..." classes are not test cases.


@message("TestEmailRequested", 1)
class TestEmailRequested(Record):
    """A test send was accepted: mail `template` (the campaign's content at that moment),
    personalised with `sample`, to each of `addresses` once."""

    __test__ = False

    test_id: uuid.UUID
    template: MessageTemplate
    addresses: list[Email] = Field(min_length=1)
    sample: SampleContact = Field(default_factory=SampleContact)


@message("TestEmailSent", 1)
class TestEmailSent(Record):
    """A test mail was accepted by the relay."""

    __test__ = False

    test_id: uuid.UUID
    email: Email
    message_id: str
    smtp_reply: str = ""


@message("TestEmailFailed", 1)
class TestEmailFailed(Record):
    """A test mail was not delivered: refused (`permanent` for a 5xx), or a transient failure
    (test mails are tried once; send the test again). `ambiguous`: the outcome is unknown (a
    connection lost after the message, or a sender that stopped mid-send), so it may have
    arrived all the same; it is not mailed again."""

    __test__ = False

    test_id: uuid.UUID
    email: Email
    reason: str = Field(min_length=1)
    permanent: bool = False
    smtp_code: int | None = None
    ambiguous: bool = False
