"""The Campaign aggregate: pure `decide` and `evolve`, no I/O.

`decide(state, command)` returns the events a command causes or raises `Rejected` with the
reason; `evolve(state, event)` folds one event into the state. Replaying a campaign's events
through `evolve` always rebuilds the same state.

Life cycle: draft -> (scheduled ->) sending <-> paused; any of them -> cancelled (final).
Content and tracking change (UpdateCampaign) only before sending starts: in draft or scheduled.
A pause is refused unless the campaign is sending, a resume unless it is paused; an automatic
pause (the failure-rate guard) is refused the same way, so it never overrides a person's.
A schedule fires on the first `ScheduleDue` tick at or after its time, within its grace;
found later, it is reported missed (never fired silently late) and waits for
ForceScheduledSend. A send, a schedule (when made and when it fires) or an exclusion naming a
deleted list, or a segment testing membership of one, is refused: a deleted list sends to
nobody (schemas/lists.py). DuplicateCampaign creates a draft from any existing campaign of
the tenant (the caller passes its state as `source`). A test send (SendTestEmail) is
accepted in every status, a cancelled campaign's included (there is no deletion; reviewing
a stopped campaign's content is legitimate): it carries the current content to the given
addresses and changes no state.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum

from schemas.base import Record
from schemas.commands import (
    AutoPauseCampaign,
    CancelCampaign,
    CreateCampaign,
    DuplicateCampaign,
    ForceScheduledSend,
    PauseCampaign,
    ResumeCampaign,
    ScheduleCampaign,
    SendCampaign,
    SendTestEmail,
    UpdateCampaign,
)
from schemas.events import (
    Audience,
    AudienceSegment,
    CampaignCancelled,
    CampaignCreated,
    CampaignPaused,
    CampaignResumed,
    CampaignScheduled,
    CampaignScheduleMissed,
    CampaignSendRequested,
    CampaignUpdated,
    MessageTemplate,
    TestEmailRequested,
)
from schemas.lists import lists_in

# What a duplicate is called when the command gives no name.
COPY_SUFFIX = " (copy)"


class Status(StrEnum):
    DRAFT = "draft"
    SCHEDULED = "scheduled"
    SENDING = "sending"
    PAUSED = "paused"
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
    schedule: Schedule | None = None
    # What the sender adds to each mail (open pixel, click redirects); set at creation.
    track_opens: bool = False
    track_clicks: bool = False


@dataclass(frozen=True)
class Schedule:
    """A pending (or missed) scheduled send."""

    send_at: datetime
    grace_seconds: int
    send: SendCampaign
    missed: bool = False
    missed_reason: str | None = None


@dataclass(frozen=True)
class ScheduleDue:
    """Not a wire command: the handler's clock reading, offered to every scheduled campaign."""

    now: datetime


def send_order(state: Campaign | None, command: object) -> SendCampaign | None:
    """The send a command asks for (now or later), so the caller can look up its segments."""
    if isinstance(command, SendCampaign):
        return command
    if isinstance(command, ScheduleCampaign):
        return command.send
    if isinstance(command, ForceScheduledSend | ScheduleDue) and state and state.schedule:
        return state.schedule.send
    return None


def decide(
    state: Campaign | None,
    command: Record | ScheduleDue,
    *,
    campaign_id: str,
    tenant_id: str,
    contacts_snapshot: dict[int, int] | None = None,
    segments: Mapping[str, AudienceSegment] | None = None,
    deleted_lists: Collection[str] = (),
    source: Campaign | None = None,
) -> list[Record]:
    """The events `command` causes on `state`; raises Rejected when it must not happen.

    `contacts_snapshot` (contacts.events end offsets) is taken by the caller when a send
    starts: it fixes the audience to the contacts known at that moment. `segments` holds the
    current criteria of the segments a send names (the caller looks them up): they are
    snapshotted into the audience, so later changes of a segment do not change this send.
    `deleted_lists`: those of the lists the send names (directly or in its segments) that
    were deleted. `source`: for DuplicateCampaign, the campaign it copies (None: unknown).
    """
    if state is not None and state.tenant_id != tenant_id:
        if isinstance(command, CreateCampaign | DuplicateCampaign):
            # Campaign ids are one namespace for all tenants. The refusal itself tells the id
            # is taken; it names no owner and nothing else of the campaign.
            raise Rejected(f"campaign id {campaign_id!r} is not available; choose another id")
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
                track_opens=command.track_opens,
                track_clicks=command.track_clicks,
            )
            return [CampaignCreated(name=command.name, template=template,
                                    track_opens=command.track_opens,
                                    track_clicks=command.track_clicks)]
        case DuplicateCampaign():
            if state is not None:
                raise Rejected(f"campaign {campaign_id!r} already exists")
            original = _existing(source, command.source_campaign_id, tenant_id)
            if original.tenant_id != tenant_id:
                raise Rejected(f"unknown campaign {command.source_campaign_id!r} for tenant "
                               f"{tenant_id!r}")
            name = command.name or (original.name[:200 - len(COPY_SUFFIX)] + COPY_SUFFIX)
            return [CampaignCreated(name=name, template=original.template,
                                    track_opens=original.track_opens,
                                    track_clicks=original.track_clicks)]
        case UpdateCampaign():
            current = _existing(state, campaign_id, tenant_id)
            if current.status not in (Status.DRAFT, Status.SCHEDULED):
                raise Rejected(f"campaign {campaign_id!r} is {current.status}: its content is "
                               "fixed once sending starts")
            return [_updated(current, command)]
        case SendCampaign():
            current = _existing(state, campaign_id, tenant_id)
            if current.status is not Status.DRAFT:
                raise Rejected(_not_draft(current))
            return [_send_requested(current, command, contacts_snapshot, segments, deleted_lists)]
        case ScheduleCampaign():
            current = _existing(state, campaign_id, tenant_id)
            if current.status is not Status.DRAFT:
                raise Rejected(_not_draft(current))
            _send_requested(current, command.send, contacts_snapshot, segments, deleted_lists)  # valid now?
            return [CampaignScheduled(send_at=command.send_at, grace_seconds=command.grace_seconds,
                                      send=command.send)]
        case ForceScheduledSend():
            current = _existing(state, campaign_id, tenant_id)
            if current.status is not Status.SCHEDULED or current.schedule is None:
                raise Rejected(f"campaign {campaign_id!r} is {current.status}, not scheduled")
            return [_send_requested(current, current.schedule.send, contacts_snapshot, segments,
                                   deleted_lists)]
        case ScheduleDue():
            return _due(state, command.now, contacts_snapshot, segments, deleted_lists)
        case CancelCampaign():
            current = _existing(state, campaign_id, tenant_id)
            if current.status is Status.CANCELLED:
                raise Rejected(f"campaign {campaign_id!r} is already cancelled")
            return [CampaignCancelled(reason=command.reason)]
        case PauseCampaign() | AutoPauseCampaign():
            current = _existing(state, campaign_id, tenant_id)
            if current.status is not Status.SENDING:
                raise Rejected(f"campaign {campaign_id!r} is {current.status}, not sending")
            automatic = isinstance(command, AutoPauseCampaign)
            return [CampaignPaused(reason=command.reason, automatic=automatic)]
        case ResumeCampaign():
            current = _existing(state, campaign_id, tenant_id)
            if current.status is not Status.PAUSED:
                raise Rejected(f"campaign {campaign_id!r} is {current.status}, not paused")
            return [CampaignResumed()]
        case SendTestEmail():
            current = _existing(state, campaign_id, tenant_id)
            return [TestEmailRequested(test_id=command.test_id, template=current.template,
                                       addresses=command.addresses, sample=command.sample)]
    raise Rejected(f"{type(command).__name__} is not a campaign command")


def evolve(state: Campaign | None, event: Record, *, campaign_id: str, tenant_id: str) -> Campaign | None:
    """Fold one event into the state; events this aggregate does not own leave it unchanged."""
    match event:
        case CampaignCreated():
            # The template carries the flags to every RecipientQueued (via the send request
            # and the hydrator); a CampaignCreated written before it did has them beside it.
            template = event.template.model_copy(
                update={"track_opens": event.track_opens, "track_clicks": event.track_clicks})
            return Campaign(campaign_id, tenant_id, event.name, Status.DRAFT, template,
                            track_opens=event.track_opens, track_clicks=event.track_clicks)
        case CampaignUpdated() if state is not None:
            template = event.template.model_copy(
                update={"track_opens": event.track_opens, "track_clicks": event.track_clicks})
            return replace(state, name=event.name, template=template,
                           track_opens=event.track_opens, track_clicks=event.track_clicks)
        case CampaignSendRequested() if state is not None:
            return replace(state, status=Status.SENDING, schedule=None)
        case CampaignScheduled() if state is not None and state.status is Status.DRAFT:
            schedule = Schedule(event.send_at, event.grace_seconds, event.send)
            return replace(state, status=Status.SCHEDULED, schedule=schedule)
        case CampaignScheduleMissed() if state is not None and state.schedule is not None:
            return replace(state, schedule=replace(state.schedule, missed=True,
                                                   missed_reason=event.reason))
        case CampaignCancelled() if state is not None:
            return replace(state, status=Status.CANCELLED)
        case CampaignPaused() if state is not None and state.status is Status.SENDING:
            return replace(state, status=Status.PAUSED)
        case CampaignResumed() if state is not None and state.status is Status.PAUSED:
            return replace(state, status=Status.SENDING)
    return state


def _not_draft(current: Campaign) -> str:
    """Why a send or schedule is refused; a missed schedule says what became of it and what
    can be done, since the read models show such a campaign as a draft again."""
    reason = f"campaign {current.campaign_id!r} is {current.status}, not draft"
    schedule = current.schedule
    if schedule is None or not schedule.missed:
        return reason
    return (f"{reason}: its schedule for {schedule.send_at.isoformat()} was missed"
            f" ({schedule.missed_reason or 'no reason given'}); ForceScheduledSend sends it now,"
            " CancelCampaign drops it")


def _updated(current: Campaign, command: UpdateCampaign) -> CampaignUpdated:
    """The campaign's content after `command`: given fields replace, an empty body removes."""
    old = current.template

    def body(given: str | None, kept: str | None) -> str | None:
        return kept if given is None else (given or None)

    body_text, body_html = body(command.body_text, old.body_text), body(command.body_html, old.body_html)
    if not (body_text or body_html):
        raise Rejected("a campaign needs body_text, body_html or both")
    track_opens = current.track_opens if command.track_opens is None else command.track_opens
    track_clicks = current.track_clicks if command.track_clicks is None else command.track_clicks
    template = MessageTemplate(
        subject=old.subject if command.subject is None else command.subject,
        from_address=old.from_address if command.from_address is None else command.from_address,
        body_text=body_text,
        body_html=body_html,
        track_opens=track_opens,
        track_clicks=track_clicks,
    )
    return CampaignUpdated(name=current.name if command.name is None else command.name,
                           template=template, track_opens=track_opens, track_clicks=track_clicks)


def _existing(state: Campaign | None, campaign_id: str, tenant_id: str) -> Campaign:
    if state is None:
        raise Rejected(f"unknown campaign {campaign_id!r} for tenant {tenant_id!r}")
    return state


def _send_requested(
    current: Campaign,
    command: SendCampaign,
    contacts_snapshot: dict[int, int] | None,
    segments: Mapping[str, AudienceSegment] | None,
    deleted_lists: Collection[str] = (),
) -> CampaignSendRequested:
    """The send `command` asks for, with its audience fixed now; Rejected when invalid."""
    if not (command.contact_ids or command.list_ids or command.segment_ids):
        raise Rejected("empty audience: give contact_ids, list_ids, segment_ids or a mix")
    known = segments or {}
    missing = sorted({*command.segment_ids, *command.exclude_segment_ids} - set(known))
    if missing:
        raise Rejected(f"unknown segment(s): {', '.join(missing)}")
    gone = sorted(set(deleted_lists) & named_lists(command, known))
    if gone:
        raise Rejected(f"deleted list(s): {', '.join(gone)}; a deleted list sends to nobody")
    audience = Audience(
        contact_ids=sorted(set(command.contact_ids)),
        list_ids=sorted(set(command.list_ids)),
        segments=[known[s] for s in sorted(set(command.segment_ids))],
        exclude_list_ids=sorted(set(command.exclude_list_ids)),
        exclude_segments=[known[s] for s in sorted(set(command.exclude_segment_ids))],
    )
    return CampaignSendRequested(
        template=current.template,
        audience=audience,
        contacts_snapshot=dict(contacts_snapshot or {}),
    )


def _due(
    state: Campaign | None,
    now: datetime,
    contacts_snapshot: dict[int, int] | None,
    segments: Mapping[str, AudienceSegment] | None,
    deleted_lists: Collection[str] = (),
) -> list[Record]:
    """A clock tick: fire a due schedule within its grace, report it missed beyond."""
    if state is None or state.status is not Status.SCHEDULED or state.schedule is None:
        return []
    schedule = state.schedule
    if schedule.missed or now < schedule.send_at:
        return []
    late = (now - schedule.send_at).total_seconds()
    if late > schedule.grace_seconds:
        reason = f"found {late:.0f} s late, grace {schedule.grace_seconds} s"
        return [CampaignScheduleMissed(send_at=schedule.send_at, noticed_at=now, reason=reason)]
    try:
        return [_send_requested(state, schedule.send, contacts_snapshot, segments, deleted_lists)]
    except Rejected as exc:
        return [CampaignScheduleMissed(send_at=schedule.send_at, noticed_at=now, reason=str(exc))]


def named_lists(command: SendCampaign, segments: Mapping[str, AudienceSegment]) -> set[str]:
    """Every list a send depends on: included, excluded, or tested by its segments' criteria."""
    named = {*command.list_ids, *command.exclude_list_ids}
    for segment_id in {*command.segment_ids, *command.exclude_segment_ids}:
        if segment_id in segments:
            named.update(lists_in(segments[segment_id].criteria))
    return named
