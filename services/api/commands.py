"""The command gateway's input: which commands upstream services may send over HTTP, and how
a request becomes the exact envelope published on campaign.commands.

Guarantee: `build_envelope` returns an envelope only for a registered command whose payload
validates against its schema; otherwise it raises `CommandInvalid` carrying every fault with
its path in the request body (`["body", "payload", "subject"]`), in FastAPI's 422 format.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.base import EntityId, Record
from schemas.envelope import Envelope, wrap
from schemas.registry import registered

# The commands an upstream service may send (the segment commands travel on campaign.commands
# too). Named, not derived from schemas.commands: internal commands (the failure-rate guard's
# automatic pause) must not be accepted from outside. Names not registered are left out.
_PUBLIC_COMMANDS = (
    "CreateCampaign", "UpdateCampaign", "SendCampaign", "ScheduleCampaign", "ForceScheduledSend",
    "CancelCampaign", "PauseCampaign", "ResumeCampaign",
    "DefineSegment", "ChangeSegment", "DeleteSegment", "SendTestEmail",
    "CreateList", "RenameList", "DeleteList", "DuplicateCampaign",
)
COMMAND_TYPES: dict[str, type[Record]] = {
    name: registered()[name][1] for name in _PUBLIC_COMMANDS if name in registered()
}
CommandType = Literal[tuple(COMMAND_TYPES)]  # type: ignore[valid-type]


class CommandRequest(BaseModel):
    """A command for the gateway. `aggregate_id` is the campaign (or segment, or list) it
    addresses (for DuplicateCampaign: the new campaign);
    `command_id` makes a retried request idempotent (a new one is drawn when absent)."""

    model_config = ConfigDict(extra="forbid")

    type: CommandType  # type: ignore[valid-type]
    aggregate_id: EntityId
    command_id: uuid.UUID | None = None
    payload: dict[str, Any] = Field(default_factory=dict)


class CommandInvalid(ValueError):
    """The payload does not validate; `errors` are FastAPI-style with body paths."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        super().__init__("; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors))


def build_envelope(request: CommandRequest, tenant_id: str) -> Envelope:
    """The envelope to publish: the tenant comes from the caller's API key, never the body."""
    model = COMMAND_TYPES[request.type]
    try:
        payload = model.model_validate(request.payload)
    except ValidationError as exc:
        raise CommandInvalid([
            {"loc": ["body", "payload", *err["loc"]], "msg": err["msg"], "type": err["type"]}
            for err in exc.errors(include_url=False, include_input=False)
        ]) from None
    return wrap(payload, tenant_id=tenant_id, aggregate_id=request.aggregate_id,
                message_id=request.command_id)
