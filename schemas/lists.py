"""Contact lists as entities: commands (CreateList, RenameList, DeleteList), their events
(ListCreated, ListRenamed, ListDeleted) and the pure aggregate (`decide_list`, `evolve_list`).

A list's members are its memberships on contacts.events (ContactListMembershipAdded, a CSV
import's `--list`); a list id that only memberships name is an implicit list: it can be sent
to, and CreateList adopts it (it gets a name, its members stay). List events travel on
segments.events (keyed by list id) beside the segment definitions: the command handler reads
that topic whole, so a send, whichever instance decides it, knows every deleted list.

Deletion is final: a deleted list sends to nobody (the handler rejects a send, a schedule or
an exclusion naming it, and a send whose segments test membership of it), and its id is
never reused, since its memberships stay on contacts.events as history and a new list under
the same id would silently bring them back.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from pydantic import StringConstraints

from schemas.base import EntityId, Record
from schemas.registry import message
from schemas.segments import All, AnyOf, Criteria, InList, Not

# A display name: one line, no control characters.
ListName = Annotated[str, StringConstraints(min_length=1, max_length=200,
                                            pattern=r"^[^\x00-\x1f\x7f]*$")]


@message("CreateList", 1)
class CreateList(Record):
    """Create a list (or name an implicit one, keeping its members). The envelope's
    aggregate id is the list id."""

    list_id: EntityId
    name: ListName


@message("RenameList", 1)
class RenameList(Record):
    """Give a list a new name."""

    list_id: EntityId
    name: ListName


@message("DeleteList", 1)
class DeleteList(Record):
    """Delete a list for good: nothing is sent to it any more; campaigns already sending
    keep the audience fixed when they started."""

    list_id: EntityId


@message("ListCreated", 1)
class ListCreated(Record):
    list_id: EntityId
    name: ListName


@message("ListRenamed", 1)
class ListRenamed(Record):
    list_id: EntityId
    name: ListName


@message("ListDeleted", 1)
class ListDeleted(Record):
    list_id: EntityId


ListCommand = CreateList | RenameList | DeleteList
ListEvent = ListCreated | ListRenamed | ListDeleted


@dataclass(frozen=True, slots=True)
class ContactList:
    list_id: str
    name: str
    deleted: bool = False


class ListRejected(Exception):
    """A list command refused, with the reason."""


def decide_list(state: ContactList | None, command: ListCommand) -> list[ListEvent]:
    """Events for a command on the list in `state`; raises ListRejected."""
    if isinstance(command, CreateList):
        if state is not None and state.deleted:
            raise ListRejected(f"list {command.list_id!r} was deleted; a deleted list's id is "
                               "not reused (its old memberships would come back)")
        if state is not None:
            raise ListRejected(f"list {command.list_id!r} already exists")
        return [ListCreated(list_id=command.list_id, name=command.name)]
    if state is None or state.deleted:
        raise ListRejected(f"unknown list {command.list_id!r}")
    if isinstance(command, RenameList):
        if command.name == state.name:
            return []
        return [ListRenamed(list_id=command.list_id, name=command.name)]
    return [ListDeleted(list_id=command.list_id)]


def evolve_list(state: ContactList | None, event: ListEvent) -> ContactList | None:
    """The list after an event."""
    if isinstance(event, ListCreated):
        return ContactList(event.list_id, event.name)
    if state is None:
        return None
    if isinstance(event, ListRenamed):
        return ContactList(state.list_id, event.name, state.deleted)
    return ContactList(state.list_id, state.name, deleted=True)


def lists_in(criteria: Criteria) -> Iterator[str]:
    """The list ids a segment's criteria test membership of (`in_list`), anywhere in the tree."""
    if isinstance(criteria, InList):
        yield criteria.list_id
    elif isinstance(criteria, All | AnyOf):
        for condition in criteria.conditions:
            yield from lists_in(condition)
    elif isinstance(criteria, Not):
        yield from lists_in(criteria.condition)
