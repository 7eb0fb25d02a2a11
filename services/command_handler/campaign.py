"""The Campaign aggregate: pure `decide` and `evolve`, no I/O.

`decide(state, command)` returns the events a command causes or raises `Rejected` with the
reason; `evolve(state, event)` folds one event into the state. Replaying a campaign's events
through `evolve` always rebuilds the same state.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from schemas.base import Record
from schemas.commands import CancelCampaign, CreateCampaign, SendCampaign
from schemas.events import (
    Audience,
    CampaignCancelled,
    CampaignCreated,
    CampaignSendRequested,
    MessageTemplate,
)


class Status(StrEnum):
    DRAFT = "draft"
    SENDING = "sending"
    CANCELLED = "cancelled"


class Rejected(Exception):
    """A command the aggregate refuses; the message is the reason given to the caller."""


@dataclass(frozen=True)
class Campaign:
    campaign_id: str
    tenant_id: str
    name: str
    status: Status
    template: MessageTemplate


def decide(
    state: Campaign | None,
    command: Record,
    *,
    campaign_id: str,
    tenant_id: str,
    contacts_snapshot: dict[int, int] | None = None,
) -> list[Record]:
    """The events `command` causes on `state`; raises Rejected when it must not happen.

    `contacts_snapshot` (contacts.events end offsets) is taken by the caller when a send
    starts: it fixes the audience to the contacts known at that moment.
    """
    if state is not None and state.tenant_id != tenant_id:
        # Same answer as for a missing campaign: a tenant must not learn another's ids.
        raise Rejected(f"unknown campaign {campaign_id!r} for tenant {tenant_id!r}")
    match command:
        case CreateCampaign():
            if state is not None:
                raise Rejected(f"campaign {campaign_id!r} already exists")
            template = MessageTemplate(
                subject=command.subject,
                from_address=command.from_address,
                body_text=command.body_text,
                body_html=command.body_html,
            )
            return [CampaignCreated(name=command.name, template=template)]
        case SendCampaign():
            current = _existing(state, campaign_id, tenant_id)
            if current.status is not Status.DRAFT:
                raise Rejected(f"campaign {campaign_id!r} is {current.status}, not draft")
            if not (command.contact_ids or command.list_ids):
                raise Rejected("empty audience: give contact_ids, list_ids or both")
            audience = Audience(
                contact_ids=sorted(set(command.contact_ids)), list_ids=sorted(set(command.list_ids))
            )
            return [
                CampaignSendRequested(
                    template=current.template,
                    audience=audience,
                    contacts_snapshot=dict(contacts_snapshot or {}),
                )
            ]
        case CancelCampaign():
            current = _existing(state, campaign_id, tenant_id)
            if current.status is Status.CANCELLED:
                raise Rejected(f"campaign {campaign_id!r} is already cancelled")
            return [CampaignCancelled(reason=command.reason)]
    raise Rejected(f"{type(command).__name__} is not a campaign command")


def evolve(state: Campaign | None, event: Record, *, campaign_id: str, tenant_id: str) -> Campaign | None:
    """Fold one event into the state; events this aggregate does not own leave it unchanged."""
    match event:
        case CampaignCreated():
            return Campaign(campaign_id, tenant_id, event.name, Status.DRAFT, event.template)
        case CampaignSendRequested() if state is not None:
            return replace(state, status=Status.SENDING)
        case CampaignCancelled() if state is not None:
            return replace(state, status=Status.CANCELLED)
    return state


def _existing(state: Campaign | None, campaign_id: str, tenant_id: str) -> Campaign:
    if state is None:
        raise Rejected(f"unknown campaign {campaign_id!r} for tenant {tenant_id!r}")
    return state
