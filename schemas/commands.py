"""Commands: orders from upstream services, published on campaign.commands.

A command may be rejected; its handler answers with events, or with CommandRejected.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import AwareDatetime, Field, field_validator, model_validator

from schemas.base import EntityId, HeaderText, InputEmail, Record
from schemas.registry import message, upcaster


@message("CreateCampaign", 2)
class CreateCampaign(Record):
    """Create a draft campaign with its content. The envelope's aggregate id is its id.

    Tracking is opt-in: `track_opens` adds an open pixel to the HTML body, `track_clicks`
    turns its links into signed redirects (services/engagement/rewrite.py)."""

    name: str = Field(min_length=1, max_length=200)
    subject: HeaderText
    from_address: InputEmail
    body_text: str | None = Field(default=None, max_length=1_000_000)
    body_html: str | None = Field(default=None, max_length=1_000_000)
    track_opens: bool = False
    track_clicks: bool = False

    @model_validator(mode="after")
    def _has_a_body(self) -> CreateCampaign:
        if not (self.body_text or self.body_html):
            raise ValueError("a campaign needs body_text, body_html or both")
        return self


@upcaster("CreateCampaign", 1)
def upcast_create_campaign_v1_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 knew no tracking: opens and clicks are not tracked."""
    return {**payload, "track_opens": False, "track_clicks": False}


@message("UpdateCampaign", 1)
class UpdateCampaign(Record):
    """Change a campaign's content or tracking before it sends (a draft, or a scheduled one:
    the content is fixed when sending starts). Only the fields given change; an empty
    body_text or body_html removes that body (one must remain)."""

    name: str | None = Field(default=None, min_length=1, max_length=200)
    subject: HeaderText | None = None
    from_address: InputEmail | None = None
    body_text: str | None = Field(default=None, max_length=1_000_000)
    body_html: str | None = Field(default=None, max_length=1_000_000)
    track_opens: bool | None = None
    track_clicks: bool | None = None

    @model_validator(mode="after")
    def _changes_something(self) -> UpdateCampaign:
        if all(value is None for _, value in self):
            raise ValueError("nothing to change: give at least one field")
        return self


@message("SendCampaign", 2)
class SendCampaign(Record):
    """Start sending to an audience: any mix of hand-picked contacts, lists and segments,
    minus the members of exclusion lists and the matches of exclusion segments. Segments
    are named by id; the handler snapshots their criteria into CampaignSendRequested and
    rejects the command when one does not exist."""

    contact_ids: list[EntityId] = Field(default_factory=list, max_length=100_000)
    list_ids: list[EntityId] = Field(default_factory=list, max_length=1_000)
    segment_ids: list[EntityId] = Field(default_factory=list, max_length=1_000)
    exclude_list_ids: list[EntityId] = Field(default_factory=list, max_length=1_000)
    exclude_segment_ids: list[EntityId] = Field(default_factory=list, max_length=1_000)


@upcaster("SendCampaign", 1)
def upcast_send_campaign_v1_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 named contacts and lists only; segments and exclusions default to none."""
    return payload


@message("CancelCampaign", 1)
class CancelCampaign(Record):
    """Stop a campaign; recipients not yet mailed are not mailed."""

    reason: str | None = Field(default=None, max_length=1_000)


@message("PauseCampaign", 1)
class PauseCampaign(Record):
    """Hold a sending campaign: nothing more is mailed until ResumeCampaign."""

    reason: str | None = Field(default=None, max_length=1_000)


@message("ResumeCampaign", 1)
class ResumeCampaign(Record):
    """Continue a paused campaign where it stopped."""


@message("AutoPauseCampaign", 1)
class AutoPauseCampaign(Record):
    """Hold a sending campaign because its failure rate crossed the configured threshold
    (sent by the completion tracker's failure-rate guard, not by people)."""

    reason: str = Field(min_length=1, max_length=1_000)


@message("ScheduleCampaign", 1)
class ScheduleCampaign(Record):
    """Send a draft campaign at `send_at` to the audience of `send`. A schedule found more
    than `grace_seconds` late (the handler was down) is not fired but reported
    (CampaignScheduleMissed); ForceScheduledSend fires it anyway."""

    send_at: AwareDatetime
    send: SendCampaign
    # Default: a quarter of an hour late is still "on time" for a newsletter.
    grace_seconds: int = Field(default=900, ge=0, le=7 * 24 * 3600)


@message("ForceScheduledSend", 1)
class ForceScheduledSend(Record):
    """Fire a scheduled campaign now, whether its schedule is pending or was missed."""


# Test sends go to people checking a campaign (its authors, a review team), never to an
# audience: a small cap keeps the command from being misused as a bulk channel.
MAX_TEST_ADDRESSES = 25


class SampleContact(Record):
    """Made-up contact fields a test mail is personalised with (placeholders such as
    `{{ first_name }}` and `{{ attr.city }}` render from these, or their fallbacks)."""

    first_name: str = Field(default="", max_length=200)
    last_name: str = Field(default="", max_length=200)
    attributes: dict[str, str] = Field(default_factory=dict, max_length=100)


@message("SendTestEmail", 1)
class SendTestEmail(Record):
    """Mail the campaign's current content, subject prefixed "[TEST] ", to the given
    addresses, without touching its audience, counters or completion. Any existing campaign
    may be test-sent, whatever its status (a draft especially). Addresses are normalised and
    each is mailed once (a repeated address is dropped); `test_id` names this test send in
    the events it causes."""

    addresses: list[InputEmail] = Field(min_length=1, max_length=MAX_TEST_ADDRESSES)
    sample: SampleContact = Field(default_factory=SampleContact)
    test_id: uuid.UUID = Field(default_factory=uuid.uuid4)

    @field_validator("addresses")
    @classmethod
    def _once_each(cls, addresses: list[str]) -> list[str]:
        return list(dict.fromkeys(addresses))


@message("DuplicateCampaign", 1)
class DuplicateCampaign(Record):
    """Create a new draft (the envelope's aggregate id) with the content and tracking flags
    of `source_campaign_id`, whatever the source's status; `name` defaults to the source's
    name with " (copy)". The audience is not copied: a draft has none until it is sent."""

    source_campaign_id: EntityId
    name: str | None = Field(default=None, min_length=1, max_length=200)
