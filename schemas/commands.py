"""Commands: orders from upstream services, published on campaign.commands.

A command may be rejected; its handler answers with events, or with CommandRejected.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from schemas.base import Email, EntityId, HeaderText, Record
from schemas.registry import message


@message("CreateCampaign", 1)
class CreateCampaign(Record):
    """Create a draft campaign with its content. The envelope's aggregate id is its id."""

    name: str = Field(min_length=1, max_length=200)
    subject: HeaderText
    from_address: Email
    body_text: str | None = Field(default=None, max_length=1_000_000)
    body_html: str | None = Field(default=None, max_length=1_000_000)

    @model_validator(mode="after")
    def _has_a_body(self) -> CreateCampaign:
        if not (self.body_text or self.body_html):
            raise ValueError("a campaign needs body_text, body_html or both")
        return self


@message("SendCampaign", 1)
class SendCampaign(Record):
    """Start sending to an audience: any mix of hand-picked contacts and lists."""

    contact_ids: list[EntityId] = Field(default_factory=list, max_length=100_000)
    list_ids: list[EntityId] = Field(default_factory=list, max_length=1_000)


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
