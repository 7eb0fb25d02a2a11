"""Registry of wire types: stable type name + version -> payload model, with upcasters.

Stored events are never rewritten: an old version is upcast on read by a small named function
registered with `upcaster`, so consumers only ever see the current model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from schemas.base import Record

Payload = dict[str, Any]
Upcaster = Callable[[Payload], Payload]
M = TypeVar("M", bound=type[Record])

_MODELS: dict[str, tuple[int, type[Record]]] = {}
_NAMES: dict[type[Record], tuple[str, int]] = {}
_UPCASTERS: dict[tuple[str, int], Upcaster] = {}


class UnknownMessageType(LookupError):
    """The type name (or a version newer than this code knows) is not registered."""


def message(type_name: str, version: int = 1) -> Callable[[M], M]:
    """Class decorator: register a payload model under a stable wire name and version."""

    def register(cls: M) -> M:
        if type_name in _MODELS:
            raise ValueError(f"wire type {type_name!r} registered twice")
        _MODELS[type_name] = (version, cls)
        _NAMES[cls] = (type_name, version)
        return cls

    return register


def upcaster(type_name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Register a function that turns a payload of `from_version` into `from_version + 1`."""

    def register(fn: Upcaster) -> Upcaster:
        _UPCASTERS[(type_name, from_version)] = fn
        return fn

    return register


def wire_name(model: type[Record]) -> tuple[str, int]:
    """The (type name, current version) a model is written with."""
    try:
        return _NAMES[model]
    except KeyError:
        raise UnknownMessageType(f"{model.__name__} is not a registered wire type") from None


def load(type_name: str, version: int, payload: Payload) -> Record:
    """Validate a payload of any known version into the current model."""
    try:
        current, model = _MODELS[type_name]
    except KeyError:
        raise UnknownMessageType(f"unknown message type {type_name!r}") from None
    if version > current:
        raise UnknownMessageType(f"{type_name} v{version} is newer than this code (v{current})")
    while version < current:
        step = _UPCASTERS.get((type_name, version))
        if step is None:
            raise UnknownMessageType(f"no upcaster for {type_name} v{version}")
        payload = step(payload)
        version += 1
    return model.model_validate(payload)


def registered() -> dict[str, tuple[int, type[Record]]]:
    """Every registered type, for schema export."""
    return dict(_MODELS)
