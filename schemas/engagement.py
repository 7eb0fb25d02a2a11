"""Engagement events: opens and clicks of campaign mail, on campaign.engagement.

Published by the tracker (services/tracker) once per hit it answered, keyed by tenant +
contact (`schemas.contacts.contact_key`), so one recipient's hits stay in order. The
envelope carries the tenant, the campaign as aggregate id and the moment of the hit
(`occurred_at`); its id is the hit's `request_id`, so a reader counts a record seen twice
once. `machine` hits (image proxies, link scanners, see services/engagement/machine.py)
are facts too: read models count them apart, never drop them.
"""

from __future__ import annotations

import uuid
from enum import StrEnum

from pydantic import Field, model_validator

from schemas.base import EntityId, Record
from schemas.registry import message

# Longest link the tracker redirects to (and the sender rewrites): longer links stay as
# written, so a token always fits in a URL every mail client and proxy accepts.
MAX_TRACKED_URL_LENGTH = 2048


class AgentClass(StrEnum):
    """What kind of client made a hit, judged from its user agent and address."""

    BROWSER = "browser"
    MAIL_CLIENT = "mail_client"
    IMAGE_PROXY = "image_proxy"
    SCANNER = "scanner"
    NONE = "none"  # no user agent at all
    OTHER = "other"


class _Hit(Record):
    campaign_id: EntityId
    contact_id: EntityId
    request_id: uuid.UUID
    agent: AgentClass
    machine: bool
    # Why a hit is taken as machine traffic (e.g. "apple_mpp", "head_request"); None for people.
    machine_reason: str | None = Field(default=None, min_length=1, max_length=200)

    @model_validator(mode="after")
    def _reason_iff_machine(self) -> _Hit:
        if self.machine != (self.machine_reason is not None):
            raise ValueError("machine hits carry a machine_reason, human hits none")
        return self


@message("EmailOpened", 1)
class EmailOpened(_Hit):
    """The open pixel of a recipient's mail was fetched."""


@message("LinkClicked", 1)
class LinkClicked(_Hit):
    """A tracked link of a recipient's mail was followed: `link_index` is the link's place
    among the mail's tracked links (0 first), `links_in_mail` how many it had (so a reader
    can tell "every link clicked at once"), `url` where the tracker redirected."""

    link_index: int = Field(ge=0)
    links_in_mail: int = Field(ge=1)
    url: str = Field(min_length=1, max_length=MAX_TRACKED_URL_LENGTH)

    @model_validator(mode="after")
    def _index_in_mail(self) -> LinkClicked:
        if self.link_index >= self.links_in_mail:
            raise ValueError("link_index must be below links_in_mail")
        return self
