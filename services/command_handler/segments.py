"""Segment definitions and contact lists as the command handler sees them: every tenant's,
from segments.events (which carries both: schemas/lists.py).

Guarantee: within a handler transaction, the first decision that needs segments reads
segments.events (read_committed) up to its last stable offset, so it sees every segment
event committed before, including this handler's own earlier transactions; the events of
the open transaction are kept apart (`pending`) until it ends, then dropped and read back
from the log once committed. Segment commands are keyed by segment id on campaign.commands,
so one handler instance decides all commands of a segment, in order; a send, whichever
instance handles it, sees every segment defined before it was accepted.
"""

from __future__ import annotations

import threading

from confluent_kafka import Consumer

from schemas.envelope import SchemaViolation, decode
from schemas.events import AudienceSegment
from schemas.lists import ContactList, ListCommand, ListEvent, decide_list, evolve_list
from schemas.segments import Segment, SegmentCommand, SegmentEvent, decide_segment, evolve_segment
from services.common.kafka import partition_reader, read_to_end
from services.common.settings import Settings
from services.common.topics import SEGMENTS, topic_name

# Bounds a refresh that sees nothing at all from the broker.
REFRESH_TIMEOUT_SECONDS = 30.0


class UnknownSegments(LookupError):
    """A send named segments the tenant does not have (never defined, or deleted)."""


class SegmentDirectory:
    """Every tenant's segments and lists, folded from segments.events."""

    def __init__(self, settings: Settings, *, stop: threading.Event | None = None) -> None:
        self.settings = settings
        # A refresh waiting on an absent broker gives up (Stopping) once this is set.
        self.stop = stop or threading.Event()
        self.topic = topic_name(SEGMENTS, settings)
        self.segments: dict[tuple[str, str], Segment] = {}
        self.pending: dict[tuple[str, str], Segment] = {}
        self.lists: dict[tuple[str, str], ContactList] = {}
        self.pending_lists: dict[tuple[str, str], ContactList] = {}
        self.position = 0
        self._fresh = False
        self._reader: Consumer | None = None

    def refresh(self) -> None:
        if self._reader is None:
            self._reader = partition_reader(self.settings, self.settings.group("command-handler-segments"))
        self.position = read_to_end(self._reader, self.topic, 0, self.position,
                                    lambda msg: self._apply(msg.value()),
                                    idle_timeout=REFRESH_TIMEOUT_SECONDS, stop=self.stop)

    def _apply(self, raw: bytes | None) -> None:
        try:
            message = decode(raw)
        except SchemaViolation:
            return
        event = message.payload
        key = (message.envelope.tenant_id, message.envelope.aggregate_id)
        if isinstance(event, ListEvent):
            listed = evolve_list(self.lists.get(key), event)
            if listed is not None:
                self.lists[key] = listed
            return
        state = evolve_segment(self.segments.get(key), event)  # type: ignore[arg-type]
        if state is not None:
            self.segments[key] = state

    def _current(self, key: tuple[str, str]) -> Segment | None:
        if not self._fresh:
            self.refresh()
            self._fresh = True
        return self.pending.get(key) or self.segments.get(key)

    def end_transaction(self) -> None:
        """The open transaction committed or aborted: its events are read back from the log
        (when committed) at the next refresh."""
        self.pending.clear()
        self.pending_lists.clear()
        self._fresh = False

    def apply(self, tenant_id: str, event: SegmentEvent) -> None:
        """Record an event written in the open transaction, for its later decisions."""
        key = (tenant_id, event.segment_id)
        state = evolve_segment(self._current(key), event)
        if state is not None:
            self.pending[key] = state

    def _current_list(self, key: tuple[str, str]) -> ContactList | None:
        self._current(key)  # refreshes once per transaction
        return self.pending_lists.get(key) or self.lists.get(key)

    def apply_list(self, tenant_id: str, event: ListEvent) -> None:
        """Record a list event written in the open transaction, for its later decisions."""
        key = (tenant_id, event.list_id)
        state = evolve_list(self._current_list(key), event)
        if state is not None:
            self.pending_lists[key] = state

    def decide_list(self, tenant_id: str, command: ListCommand) -> list[ListEvent]:
        """decide_list on the list as it stands; raises ListRejected."""
        return decide_list(self._current_list((tenant_id, command.list_id)), command)

    def deleted_lists(self, tenant_id: str) -> frozenset[str]:
        """The tenant's deleted lists, this transaction's deletions included."""
        self._current((tenant_id, ""))
        known = {**self.lists, **self.pending_lists}
        return frozenset(list_id for (tenant, list_id), state in known.items()
                         if tenant == tenant_id and state.deleted)

    def decide(self, tenant_id: str, command: SegmentCommand) -> list[SegmentEvent]:
        """decide_segment on the current definition; raises SegmentRejected."""
        return decide_segment(self._current((tenant_id, command.segment_id)), command)

    def snapshot(self, tenant_id: str, segment_ids: list[str]) -> list[AudienceSegment]:
        """The current criteria of the named segments, for a send's audience."""
        found: list[AudienceSegment] = []
        missing: list[str] = []
        for segment_id in sorted(set(segment_ids)):
            segment = self._current((tenant_id, segment_id))
            if segment is None or segment.deleted:
                missing.append(segment_id)
            else:
                found.append(AudienceSegment(segment_id=segment_id, criteria=segment.criteria))
        if missing:
            raise UnknownSegments(", ".join(repr(s) for s in missing))
        return found

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
