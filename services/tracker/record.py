"""The record of one tracker hit (EmailOpened / LinkClicked), written straight to JSON bytes.

Guarantee: `hit_record` returns exactly the bytes `schemas.envelope.encode` writes for
`wrap(payload, tenant_id=claim.tenant_id, aggregate_id=claim.campaign_id,
message_id=request_id, occurred_at=<the hit's moment, UTC>)` (same keys, order, spelling and
values; what the engagement projector decodes), or None when any value is not one the
schema accepts as it stands or not plainly safe to write by hand: then the caller takes that
schema path, which validates (and refuses what the schema refuses) and escapes. Ids are
written only when they match the schema's patterns (an alphabet with no quote or
backslash); a URL only when it is printable ASCII of the schema's length, with JSON's two
escapes for such text (quote and backslash); a machine reason only when plain.

Why: two pydantic models, a dict dump and a JSON dump per hit were a fifth of what the
tracker spent on a hit beyond its web stack.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

from schemas.base import ENTITY_ID_RE, TENANT_ID_RE
from schemas.engagement import MAX_TRACKED_URL_LENGTH, EmailOpened, LinkClicked
from schemas.envelope import envelope_timestamp
from schemas.registry import wire_name
from services.engagement.machine import Verdict
from services.engagement.tokens import Kind, TrackingClaim

_OPENED, _OPENED_VERSION = wire_name(EmailOpened)
_CLICKED, _CLICKED_VERSION = wire_name(LinkClicked)
# The schema's bound on a machine reason (`_Hit.machine_reason`).
_MAX_REASON_LENGTH = 200


def hit_record(claim: TrackingClaim, request_id: str, verdict: Verdict, at: float) -> bytes | None:
    """The encoded envelope of one hit at Unix time `at` with id `request_id` (a UUID's
    canonical text), or None (use the schema path)."""
    tenant, campaign, contact = claim.tenant_id, claim.campaign_id, claim.contact_id
    reason = verdict.reason
    if not (type(tenant) is str and type(campaign) is str and type(contact) is str
            and TENANT_ID_RE.fullmatch(tenant) and ENTITY_ID_RE.fullmatch(campaign)
            and ENTITY_ID_RE.fullmatch(contact) and type(verdict.machine) is bool
            and verdict.machine == (reason is not None)
            and (reason is None or (type(reason) is str and _plain(reason)
                                    and 0 < len(reason) <= _MAX_REASON_LENGTH))):
        return None
    common = (f'"campaign_id":"{campaign}","contact_id":"{contact}","request_id":"{request_id}",'
              f'"agent":"{verdict.agent.value}","machine":{"true" if verdict.machine else "false"},'
              f'"machine_reason":{"null" if reason is None else f"{chr(34)}{reason}{chr(34)}"}')
    if claim.kind is Kind.OPEN:
        wire, version, payload = _OPENED, _OPENED_VERSION, common
    else:
        index, count, url = claim.link_index, claim.links_in_mail, claim.url
        if not (type(index) is int and type(count) is int and 0 <= index < count
                and type(url) is str and 0 < len(url) <= MAX_TRACKED_URL_LENGTH
                and url.isascii() and url.isprintable()):
            return None
        link = url.replace("\\", "\\\\").replace('"', '\\"')
        wire, version = _CLICKED, _CLICKED_VERSION
        payload = f'{common},"link_index":{index},"links_in_mail":{count},"url":"{link}"'
    when = envelope_timestamp(datetime.fromtimestamp(at, UTC))
    return (
        f'{{"id":"{request_id}","type":"{wire}","version":{version},"tenant_id":"{tenant}",'
        f'"aggregate_id":"{campaign}","occurred_at":"{when}","correlation_id":"{request_id}",'
        f'"causation_id":null,"payload":{{{payload}}}}}'
    ).encode()


def new_request_id() -> str:
    """str(uuid.uuid4()), without building a UUID: 16 bytes from os.urandom with the version
    (4) and variant (RFC 4122) bits set as uuid.UUID(version=4) sets them. The bytes are
    read ID_BATCH ids at a time (one system call, not one per hit); each id takes its own
    (list.pop is atomic: no two callers get the same)."""
    try:
        raw = bytearray(_random_ids.pop())
    except IndexError:
        block = os.urandom(16 * ID_BATCH)
        _random_ids.extend(block[i:i + 16] for i in range(16, len(block), 16))
        raw = bytearray(block[:16])
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# Random ids read ahead by new_request_id; a forked child reads its own (else parent and
# child would hand out the same ids).
ID_BATCH = 256
_random_ids: list[bytes] = []
os.register_at_fork(after_in_child=_random_ids.clear)


def _plain(value: str) -> bool:
    """A str JSON writes as itself between quotes: printable ASCII, no quote or backslash."""
    return value.isascii() and value.isprintable() and '"' not in value and "\\" not in value
