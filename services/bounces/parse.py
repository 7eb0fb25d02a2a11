"""Bounce messages to facts: which mail (tenant, campaign, contact) bounced how, or who
complained, read from one raw message mailed to the bounce domain.

Guarantees:
- `parse_message` never raises on any input (bytes of any shape or size): it returns a
  `Parsed` (a classification and the recipient it belongs to) or an `Unparseable` with the
  reason (and the classification when one was found but no recipient). The one exception is
  `DirectoryUnavailable` from the campaign directory: an outage, not the input's fault, so
  the receiver answers 451 and the remote MTA tries again.
- Classification: an RFC 3464 report (multipart/report; report-type=delivery-status) is read
  per recipient: Action failed with a 5.x.x (or no) Status is hard, failed with 4.x.x (given
  up after retries) and delayed are soft, delivered / relayed / expanded are not bounces; the
  worst recipient block wins. An RFC 5965 report (report-type=feedback-report) is a complaint
  unless its Feedback-Type says otherwise (not-spam, auth-failure). Anything else goes
  through flufl.bounce's detectors (permanent = hard, temporary = soft).
- Attribution, first found wins: a valid VERP token in the envelope recipients (RCPT TO) of
  the report; a valid VERP token anywhere in the report (ARF Original-Mail-From, the returned
  original's Return-Path, a non-standard bounce quoting the original's headers): signed, so
  as trustworthy as the first (`via="verp"`); else the returned original's X-Campaign-ID and
  Message-ID (`<campaign.contact@domain>`, what services/sender/mime.py writes), the tenant
  found from the campaign, or, without that Message-ID, the contact id of the address the
  report names (Original-Rcpt-To, Final-Recipient) in that tenant (`via="headers"`:
  unsigned, anyone can write them).
- The dedup key is a pure function of the report (its Message-ID, else its bytes) and the
  recipient: the same report received twice gives the same key.
"""

from __future__ import annotations

import email
import email.utils
import hashlib
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import Message
from typing import Literal

from flufl.bounce import all_failures

from schemas.base import ENTITY_ID_RE
from schemas.contacts import contact_id_for
from services.bounces.verp import (
    CampaignDirectory,
    DirectoryUnavailable,
    VerpClaim,
    VerpKeys,
    VerpRefusal,
    read_token,
    token_of,
)

# flufl.bounce logs every detector it runs, and a detector's exception with its traceback;
# we report the exception as the reason instead.
logging.getLogger("flufl.bounce").setLevel(logging.CRITICAL)

# Reports are small; a huge body is scanned for tokens only this far (bounds the CPU a hostile
# message can cost).
SCAN_LIMIT = 1_000_000
_STATUS = re.compile(r"(?<![0-9.])([245])\.([0-9]{1,3})\.([0-9]{1,3})(?![0-9])")
# A reported recipient that can be a contact's address (schemas.base's stored shape, loosely).
_ADDRESS = re.compile(r"[^@\s<>,;]{1,64}@[A-Za-z0-9.-]{1,253}")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# A report dated more than this far ahead of our clock is taken as dated now (a wrong clock).
_FUTURE_SLACK = timedelta(days=1)
# Feedback types that are reports but not complaints about the mail (RFC 6591, 6650).
_NOT_COMPLAINTS = frozenset({"not-spam", "auth-failure"})

TenantOfCampaign = Callable[[str], str | None]


@dataclass(frozen=True, slots=True)
class Recipient(VerpClaim):
    """The mail a report is about, and how we know."""

    # verp: a signed token; provider: a provider's signed notification; headers: unsigned.
    via: Literal["verp", "provider", "headers"]


@dataclass(frozen=True, slots=True)
class BounceReport:
    kind: Literal["hard", "soft"]
    status: str = ""
    diagnostic: str = ""
    remote_mta: str = ""
    detector: str = "rfc3464"
    occurred_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ComplaintReport:
    feedback_type: str = "abuse"
    user_agent: str = ""
    occurred_at: datetime | None = None


Report = BounceReport | ComplaintReport


@dataclass(frozen=True, slots=True)
class Parsed:
    """A report with the mail it is about; the dedup key names the report itself."""

    report: Report
    recipient: Recipient
    dedup_key: str


@dataclass(frozen=True, slots=True)
class Unparseable:
    """Nothing to record, and why; `report` is the classification when one was found."""

    reason: str
    report: Report | None = None


@dataclass(frozen=True)
class BounceContext:
    """What attribution needs: the bounce domain, the VERP keys, the campaign directory of
    "r" tokens, and the tenant of a campaign (for header attribution)."""

    domain: str
    keys: VerpKeys
    directory: CampaignDirectory | None = None
    tenant_of_campaign: TenantOfCampaign | None = None


def parse_message(raw: bytes, rcpt_tos: Sequence[str], context: BounceContext) -> Parsed | Unparseable:
    """The fact one raw message states, or why none (see the module's guarantees)."""
    try:
        return _parse(raw, rcpt_tos, context)
    except DirectoryUnavailable:
        raise
    except Exception as exc:  # never raise on input: a hostile message is only unparseable
        return Unparseable(f"unreadable message: {type(exc).__name__}")


def _parse(raw: bytes, rcpt_tos: Sequence[str], context: BounceContext) -> Parsed | Unparseable:
    message = email.message_from_bytes(raw)
    report = classify(message)
    if isinstance(report, Unparseable):
        return report
    recipient, why = _attribute(message, raw, rcpt_tos, context)
    if recipient is None:
        return Unparseable(why, report)
    source = "arf" if isinstance(report, ComplaintReport) else "dsn"
    return Parsed(report, recipient, dedup_key(source, message, raw, recipient))


def dedup_key(source: str, message: Message, raw: bytes, recipient: Recipient) -> str:
    """`source:<digest>` of the report's Message-ID (else its bytes) and the recipient."""
    message_id = _text(message.get("Message-ID", "")).strip()
    identity = f"id:{message_id}".encode() if message_id else b"raw:" + hashlib.sha256(raw).digest()
    digest = hashlib.sha256(b"\x00".join((
        identity, recipient.tenant_id.encode(), recipient.campaign_id.encode(),
        recipient.contact_id.encode(),
    ))).hexdigest()
    return f"{source}:{digest[:40]}"


# --- classification ---------------------------------------------------------------------------


def classify(message: Message) -> Report | Unparseable:
    """What a message reports (a bounce or a complaint), or why it reports neither."""
    feedback = _part(message, "message/feedback-report")
    if feedback is not None:
        return _complaint(message, feedback)
    status = _part(message, "message/delivery-status")
    if status is not None:
        found = _delivery_status(message, status)
        if found is not None:
            return found
    return _heuristic(message)


def _complaint(message: Message, part: Message) -> ComplaintReport | Unparseable:
    fields = _fields(part)
    feedback_type = _text(fields.get("feedback-type", "abuse")).strip().lower()[:64] or "abuse"
    if feedback_type in _NOT_COMPLAINTS:
        return Unparseable(f"not a complaint (feedback type {feedback_type})")
    return ComplaintReport(
        feedback_type=feedback_type,
        user_agent=_clean(fields.get("user-agent", ""), 255),
        occurred_at=_date(fields.get("arrival-date") or message.get("Date")),
    )


def _delivery_status(message: Message, part: Message) -> BounceReport | Unparseable | None:
    blocks = _blocks(part)
    if not blocks:
        return None
    per_message, recipients = blocks[0], blocks[1:] or blocks[:1]
    arrival = _date(per_message.get("arrival-date") or message.get("Date"))
    worst: BounceReport | None = None
    actions: list[str] = []
    for block in recipients:
        action = _text(block.get("action", "")).strip().lower()
        actions.append(action or "none")
        found = _STATUS.search(_text(block.get("status", "")))
        status = ".".join(found.groups()) if found else ""
        if action in ("delivered", "relayed", "expanded") or status.startswith("2"):
            continue
        if action == "failed":
            kind: Literal["hard", "soft"] = "soft" if status.startswith("4") else "hard"
        elif action == "delayed" or status.startswith("4"):
            kind = "soft"
        elif status.startswith("5"):
            kind = "hard"
        else:
            continue
        remote = _text(block.get("remote-mta", "")).partition(";")
        report = BounceReport(
            kind=kind, status=status,
            diagnostic=_clean(block.get("diagnostic-code", ""), 1000),
            remote_mta=_clean(remote[2] or remote[0], 255),
            occurred_at=arrival,
        )
        if worst is None or (report.kind == "hard" and worst.kind == "soft"):
            worst = report
    if worst is None:
        if any(a in ("delivered", "relayed", "expanded") for a in actions):
            return Unparseable(f"not a failure (action {', '.join(sorted(set(actions)))})")
        return None  # a report that says nothing usable: the heuristics may
    return worst


def _heuristic(message: Message) -> BounceReport | Unparseable:
    try:
        temporary, permanent = all_failures(message)
    except Exception as exc:  # a detector tripped over the input
        return Unparseable(f"no bounce detected (detector failed: {type(exc).__name__})")
    if not temporary and not permanent:
        return Unparseable("not a bounce or complaint")
    found = _STATUS.search(_body_text(message))
    return BounceReport(
        kind="hard" if permanent else "soft",
        status=".".join(found.groups()) if found else "",
        detector="flufl.bounce",
        occurred_at=_date(message.get("Date")),
    )


# --- attribution ------------------------------------------------------------------------------


def _attribute(message: Message, raw: bytes, rcpt_tos: Sequence[str],
               context: BounceContext) -> tuple[Recipient | None, str]:
    refusals: list[str] = []
    for rcpt in rcpt_tos:
        token = token_of(rcpt, context.domain)
        if token is None:
            continue
        found = _claim(token, context, refusals)
        if found is not None:
            return found, ""
    for token in _tokens_in(raw, context.domain):
        found = _claim(token, context, refusals)
        if found is not None:
            return found, ""
    original = _original_headers(message)
    if original is not None:
        by_headers, why = _by_headers(message, original, context)
        if by_headers is not None:
            return by_headers, ""
        refusals.append(why)
    reasons = "; ".join(dict.fromkeys(refusals)) or "no VERP token and no returned original"
    return None, f"no recipient: {reasons}"


def _claim(token: str, context: BounceContext, refusals: list[str]) -> Recipient | None:
    claim: VerpClaim | VerpRefusal = read_token(token, context.keys, context.directory)
    if isinstance(claim, VerpRefusal):
        refusals.append(f"VERP token {claim.reason}")
        return None
    return Recipient(claim.tenant_id, claim.campaign_id, claim.contact_id, "verp")


def _tokens_in(raw: bytes, domain: str) -> Iterator[str]:
    pattern = re.compile(rb"bounces\+([a-z2-7]{3,56})@" + re.escape(domain.encode()), re.IGNORECASE)
    seen: set[str] = set()
    for match in pattern.finditer(raw, 0, SCAN_LIMIT):
        token = match.group(1).decode("ascii").lower()
        if token not in seen:
            seen.add(token)
            yield token


def _original_headers(message: Message) -> Message | None:
    for part in _walk(message):
        kind = part.get_content_type()
        if kind in ("message/rfc822", "message/rfc822-headers", "text/rfc822-headers"):
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                return payload[0]
            body = part.get_payload(decode=True)
            if isinstance(body, bytes):
                return email.message_from_bytes(body[:SCAN_LIMIT])
    return None


def _by_headers(message: Message, original: Message, context: BounceContext) -> tuple[Recipient | None, str]:
    campaign = _text(original.get("X-Campaign-ID", "")).strip()
    if not campaign or not ENTITY_ID_RE.fullmatch(campaign):
        return None, "returned original has no X-Campaign-ID"
    tenant = context.tenant_of_campaign(campaign) if context.tenant_of_campaign else None
    if tenant is None:
        return None, f"tenant of campaign {campaign} unknown"
    local = _text(original.get("Message-ID", "")).strip().strip("<>").rpartition("@")[0]
    contact = local[len(campaign) + 1:] if local.startswith(campaign + ".") else ""
    if not ENTITY_ID_RE.fullmatch(contact):
        # The recipient the report names (ARF Original-Rcpt-To, DSN Final-Recipient): a
        # contact id is a function of tenant and address (schemas.contacts.contact_id_for).
        address = _reported_address(message)
        if address is None:
            return None, "returned original's Message-ID names no contact, the report no recipient"
        contact = contact_id_for(tenant, address)
    return Recipient(tenant, campaign, contact, "headers"), ""


def _reported_address(message: Message) -> str | None:
    fields: list[Message] = []
    for kind in ("message/feedback-report", "message/delivery-status"):
        part = _part(message, kind)
        if part is not None:
            fields.extend(_blocks(part))
    for block in fields:
        for name in ("original-rcpt-to", "original-recipient", "final-recipient"):
            value = _text(block.get(name, "")).rpartition(";")[2].strip().strip("<>")
            if _ADDRESS.fullmatch(value):
                return value
    return None


# --- reading MIME -----------------------------------------------------------------------------


def _walk(message: Message) -> Iterator[Message]:
    """Every part, depth first, without recursion (a deeply nested message is no crash)."""
    stack = [message]
    seen = 0
    while stack and seen < 1000:
        part = stack.pop()
        seen += 1
        yield part
        payload = part.get_payload()
        if part.is_multipart() and isinstance(payload, list):
            stack.extend(reversed([p for p in payload if isinstance(p, Message)]))


def _part(message: Message, content_type: str) -> Message | None:
    for part in _walk(message):
        if part.get_content_type() == content_type:
            return part
    return None


def _blocks(part: Message) -> list[Message]:
    """The field blocks of a message/delivery-status part (the parser splits them; a part
    that came base64- or otherwise encoded is parsed here)."""
    payload = part.get_payload()
    if isinstance(payload, list) and payload and all(isinstance(p, Message) for p in payload):
        return list(payload)
    body = part.get_payload(decode=True)
    if not isinstance(body, bytes):
        return []
    text = body[:SCAN_LIMIT].decode("utf-8", "replace").replace("\r\n", "\n")
    return [email.message_from_string(chunk) for chunk in re.split(r"\n\s*\n", text) if chunk.strip()]


def _fields(part: Message) -> Message:
    """The fields of a message/feedback-report part as one header block."""
    blocks = _blocks(part)
    return blocks[0] if blocks else Message()


def _body_text(message: Message) -> str:
    texts: list[str] = []
    size = 0
    for part in _walk(message):
        if part.get_content_maintype() == "text":
            body = part.get_payload(decode=True)
            if isinstance(body, bytes):
                texts.append(body[:SCAN_LIMIT - size].decode("utf-8", "replace"))
                size += len(texts[-1])
        if size >= SCAN_LIMIT:
            break
    return "\n".join(texts)


def _text(value: object) -> str:
    """A header value as text, whatever the parser made of it (str or email.header.Header)."""
    return value if isinstance(value, str) else str(value) if value is not None else ""


def _clean(value: object, limit: int) -> str:
    """One line, no control characters, at most `limit` characters."""
    text = " ".join(_CONTROL.sub(" ", _text(value)).split())
    return text[:limit]


def _date(value: object) -> datetime | None:
    text = _text(value).strip()
    if not text:
        return None
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if moment > datetime.now(UTC) + _FUTURE_SLACK:
        return None
    return moment
