"""The opaque cursor of GET /campaigns: where the next page starts, and for which filters.

Guarantee: `decode_cursor(encode_cursor(p, f), f) == p`; anything else a caller sends (not
base64, not our JSON, a made-up position, a cursor of other filters) raises CursorInvalid
with the reason, so the route answers 422 instead of a wrong or empty page.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime

from schemas.base import ENTITY_ID_RE
from services.api.queries import PagePosition

# A cursor is a few dozen bytes; anything much longer is not one of ours.
MAX_CURSOR_LENGTH = 1_000


class CursorInvalid(ValueError):
    """Not a cursor this API handed out for these filters."""


def encode_cursor(position: PagePosition, filters: list[str | None]) -> str:
    at, campaign_id = position
    raw = json.dumps({"at": at.isoformat() if at else None, "id": campaign_id, "f": filters},
                     separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, filters: list[str | None]) -> PagePosition:
    if len(cursor) > MAX_CURSOR_LENGTH:
        raise CursorInvalid("not a cursor of this API (too long)")
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        at = None if data["at"] is None else datetime.fromisoformat(data["at"])
        campaign_id, made_for = data["id"], data["f"]
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise CursorInvalid("not a cursor of this API: pass `next_cursor` as it was "
                            "returned") from None
    if not isinstance(campaign_id, str) or not ENTITY_ID_RE.fullmatch(campaign_id) or (
            at is not None and at.tzinfo is None):
        raise CursorInvalid("not a cursor of this API: pass `next_cursor` as it was returned")
    if made_for != filters:
        raise CursorInvalid("the cursor belongs to other filters: repeat the query that "
                            "returned it, or start without a cursor")
    return at, campaign_id
