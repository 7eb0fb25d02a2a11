"""Bounce and complaint webhooks of the usual providers, as FastAPI routes: Amazon SES (via
SNS), SendGrid, Mailgun and Postmark notifications become the same EmailBounced /
EmailComplained (+ ContactSuppressed) as the SMTP receiver's, with source=webhook.

Guarantees:
- Nothing is recorded unless the request is authentic: SNS messages by their signature
  (SignatureVersion 1: RSA-SHA1, 2: RSA-SHA256) with a certificate fetched only over https
  from an amazonaws.com host (bounded, cached), and only from the configured topics;
  SendGrid by its ECDSA signature when a public key is configured; Mailgun by the HMAC of
  its signing key over a timestamp at most `MAILGUN_MAX_AGE_SECONDS` old; Postmark by its
  basic-auth credentials. A provider that is not configured is refused.
- Answers: 200 once every record is acknowledged by Kafka (notifications we do not record,
  like deliveries or unattributable bounces, are 200 too, counted as ignored); 401/403 for a
  bad or missing signature; 400 for a malformed body; input never causes a 5xx. Kafka away
  (or the campaign directory, or AWS for a subscription confirmation) gives 503, so the
  provider delivers the notification again; repeats have the same ids (dedup key: the
  provider's event id).
- The recipient: a VERP token in the provider's envelope sender or in a `verp` metadata
  field (signed: via=verp), else the provider's report of our Message-ID
  (`<campaign.contact@domain>`) with the campaign from X-Campaign-ID or a `campaign_id`
  metadata field (via=provider: the provider vouches for it by its signature).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from schemas.base import ENTITY_ID_RE
from services.bounces.events import Outgoing, records_for
from services.bounces.parse import BounceContext, BounceReport, ComplaintReport, Parsed, Recipient, Report
from services.bounces.publisher import PublishFailed
from services.bounces.verp import DirectoryUnavailable, VerpClaim, read_token, token_of

log = structlog.get_logger("bounces")

# A webhook body larger than this is refused (400): guards memory against a hostile client.
MAX_BODY_BYTES = 1024 * 1024
# Fetching an SNS signing certificate or confirming a subscription gives up after this:
# guards a request against an AWS endpoint that does not answer.
SNS_FETCH_TIMEOUT_SECONDS = 5.0
# Certificates kept; they rotate rarely, so a handful covers every region in use.
SNS_CERT_CACHE_SIZE = 32
MAX_CERT_BYTES = 64 * 1024
# Mailgun's timestamps older (or further ahead) than this are refused: a captured request
# cannot be replayed later.
MAILGUN_MAX_AGE_SECONDS = 300.0
# SendGrid signs timestamp + body; the same freshness bound applies to its timestamp.
SENDGRID_MAX_AGE_SECONDS = 600.0
_SNS_HOST = re.compile(r"sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?")

Publish = Callable[[list[Outgoing]], Awaitable[None]]


class Unavailable(Exception):
    """Something the answer depends on (AWS, for a certificate or a confirmation) did not
    answer: 503, the provider sends the notification again."""


class Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def sns_host_ok(host: str) -> bool:
    """The hosts SNS signs from: sns.<region>.amazonaws.com (.cn in China)."""
    return _SNS_HOST.fullmatch(host.lower()) is not None


@dataclass
class WebhookConfig:
    context: BounceContext
    publish: Publish
    sns_topic_arns: frozenset[str] = frozenset()  # empty: any topic
    sns_host_ok: Callable[[str], bool] = sns_host_ok
    sns_tls: ssl.SSLContext | bool = True  # httpx's verify: the system's CAs by default
    sendgrid_public_key: str = ""
    mailgun_signing_key: bytes = b""
    postmark_credentials: str = ""  # 'user:password'
    clock: Callable[[], float] = time.time
    stats: dict[str, int] = field(default_factory=dict)
    _certs: dict[str, rsa.RSAPublicKey] = field(default_factory=dict)

    def count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1


@dataclass(frozen=True)
class Notification:
    """One provider event, mapped: what it reports and where to find its recipient."""

    report: Report
    dedup_key: str
    verp: str = ""  # an address or bare token
    message_id: str = ""
    campaign_id: str = ""


def create_app(config: WebhookConfig) -> FastAPI:
    app = FastAPI(title="bounce webhooks", docs_url=None, redoc_url=None)
    app.include_router(router(config))
    return app


Reader = Callable[[WebhookConfig, bytes, Request], Awaitable[list[Notification]]]


def router(config: WebhookConfig) -> APIRouter:
    """POST /webhooks/<provider> for each provider."""
    routes = APIRouter(prefix="/webhooks")
    readers: dict[str, Reader] = {
        "ses": _ses, "sendgrid": _sendgrid, "mailgun": _mailgun, "postmark": _postmark,
    }
    for provider, read in readers.items():
        routes.add_api_route(f"/{provider}", _endpoint(config, provider, read), methods=["POST"],
                             name=provider)
    return routes


def _endpoint(config: WebhookConfig, provider: str,
              read: Reader) -> Callable[[Request], Awaitable[JSONResponse]]:
    async def handle(request: Request) -> JSONResponse:
        try:
            body = await _body(request)
            try:
                notifications = await read(config, body, request)
            except (Refused, Unavailable):
                raise
            except Exception as exc:  # input never makes a 5xx; the log shows what to fix
                log.exception("webhook unreadable", provider=provider)
                raise Refused(400, f"unreadable notification: {type(exc).__name__}") from None
            recorded = await _record(config, provider, notifications)
        except Refused as refused:
            config.count(f"{provider}_refused_{refused.status}")
            return JSONResponse({"error": refused.reason}, status_code=refused.status)
        except (PublishFailed, DirectoryUnavailable, Unavailable) as exc:
            config.count(f"{provider}_unavailable")
            return JSONResponse({"error": f"temporarily unavailable: {exc}"}, status_code=503)
        return JSONResponse({"recorded": recorded, "ignored": len(notifications) - recorded})

    return handle


async def _body(request: Request) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise Refused(400, "body too large")
        chunks.append(chunk)
    return b"".join(chunks)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Refused(400, "body is not JSON") from None


async def _record(config: WebhookConfig, provider: str, notifications: list[Notification]) -> int:
    records: list[Outgoing] = []
    now = datetime.now(UTC)
    for note in notifications:
        recipient = _recipient(config.context, note)
        if recipient is None:
            config.count(f"{provider}_unattributed")
            continue
        parsed = Parsed(note.report, recipient, note.dedup_key[:200])
        records.extend(records_for(parsed, source="webhook", provider=provider, now=now))
    if records:
        await config.publish(records)
    return sum(1 for r in records if r.envelope.type in ("EmailBounced", "EmailComplained"))


def _recipient(context: BounceContext, note: Notification) -> Recipient | None:
    if note.verp:
        token = token_of(note.verp, context.domain) if "@" in note.verp else note.verp.lower()
        if token:
            claim = read_token(token, context.keys, context.directory)
            if isinstance(claim, VerpClaim):
                return Recipient(claim.tenant_id, claim.campaign_id, claim.contact_id, "verp")
    local = note.message_id.strip().strip("<>").rpartition("@")[0]
    campaign = note.campaign_id.strip()
    if not campaign or not local.startswith(campaign + "."):
        return None
    contact = local[len(campaign) + 1:]
    if not ENTITY_ID_RE.fullmatch(campaign) or not ENTITY_ID_RE.fullmatch(contact):
        return None
    tenant = context.tenant_of_campaign(campaign) if context.tenant_of_campaign else None
    return Recipient(tenant, campaign, contact, "provider") if tenant else None


def _text(value: object, limit: int = 1000) -> str:
    return " ".join(str(value).split())[:limit] if isinstance(value, str | int | float) else ""


def _status(value: object) -> str:
    found = re.search(r"(?<![0-9.])([245]\.[0-9]{1,3}\.[0-9]{1,3})(?![0-9])", _text(value))
    return found.group(1) if found else ""


def _moment(value: object) -> datetime | None:
    try:
        if isinstance(value, int | float):
            return datetime.fromtimestamp(float(value), UTC)
        if isinstance(value, str):
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        return None
    return None


def _obj(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _objs(value: object) -> list[Mapping[str, Any]]:
    """The objects of a JSON list (nothing when it is no list)."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


# --- Amazon SES via SNS ---------------------------------------------------------------------

_SNS_NOTIFICATION_KEYS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
_SNS_SUBSCRIPTION_KEYS = ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type")


def sns_string_to_sign(message: Mapping[str, Any]) -> bytes:
    """The canonical text SNS signs: name and value lines of the type's fields, in order."""
    kind = message.get("Type")
    keys = _SNS_NOTIFICATION_KEYS if kind == "Notification" else _SNS_SUBSCRIPTION_KEYS
    lines: list[str] = []
    for key in keys:
        if key == "Subject" and "Subject" not in message:
            continue
        value = message.get(key)
        if not isinstance(value, str):
            raise Refused(400, f"SNS message without {key}")
        lines += [key, value]
    return ("\n".join(lines) + "\n").encode()


async def _sns_certificate(config: WebhookConfig, url: str) -> rsa.RSAPublicKey:
    cached = config._certs.get(url)
    if cached is not None:
        return cached
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname or not config.sns_host_ok(parts.hostname):
        raise Refused(403, "signing certificate not from an SNS host")
    if not parts.path.endswith(".pem"):
        raise Refused(403, "signing certificate URL is not a .pem")
    try:
        async with httpx.AsyncClient(timeout=SNS_FETCH_TIMEOUT_SECONDS, verify=config.sns_tls,
                                     follow_redirects=False) as client:
            response = await client.get(url)
    except httpx.HTTPError as exc:
        raise Unavailable(f"SNS certificate not fetched: {type(exc).__name__}") from None
    if response.status_code != 200 or len(response.content) > MAX_CERT_BYTES:
        raise Refused(403, "signing certificate not available")
    try:
        key = x509.load_pem_x509_certificate(response.content).public_key()
    except ValueError:
        raise Refused(403, "signing certificate unreadable") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise Refused(403, "signing certificate is not RSA")
    if len(config._certs) >= SNS_CERT_CACHE_SIZE:
        config._certs.clear()
    config._certs[url] = key
    return key


async def verify_sns(config: WebhookConfig, message: Mapping[str, Any]) -> None:
    """Raise Refused unless the SNS message is signed by the certificate it names."""
    version = message.get("SignatureVersion")
    algorithm: hashes.HashAlgorithm
    if version == "1":
        algorithm = hashes.SHA1()  # noqa: S303  (SNS's SignatureVersion 1 is RSA-SHA1)
    elif version == "2":
        algorithm = hashes.SHA256()
    else:
        raise Refused(403, "unknown SNS SignatureVersion")
    url, signature = message.get("SigningCertURL"), message.get("Signature")
    if not isinstance(url, str) or not isinstance(signature, str):
        raise Refused(403, "SNS message not signed")
    try:
        raw_signature = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise Refused(403, "SNS signature not base64") from None
    key = await _sns_certificate(config, url)
    try:
        key.verify(raw_signature, sns_string_to_sign(message), padding.PKCS1v15(), algorithm)
    except InvalidSignature:
        raise Refused(403, "bad SNS signature") from None


async def _ses(config: WebhookConfig, body: bytes, _request: Request) -> list[Notification]:
    message = _json(body)
    if not isinstance(message, dict):
        raise Refused(400, "SNS message is not an object")
    await verify_sns(config, message)
    topic = message.get("TopicArn")
    if config.sns_topic_arns and topic not in config.sns_topic_arns:
        raise Refused(403, "SNS topic not configured")
    kind = message.get("Type")
    if kind == "SubscriptionConfirmation":
        await _confirm(config, message.get("SubscribeURL"))
        return []
    if kind != "Notification":
        return []  # UnsubscribeConfirmation: nothing to record
    inner = _json(str(message.get("Message", "")).encode())
    if not isinstance(inner, dict):
        raise Refused(400, "SES notification is not an object")
    return ses_notifications(inner, str(message.get("MessageId", "")))


async def _confirm(config: WebhookConfig, url: object) -> None:
    parts = urlsplit(url if isinstance(url, str) else "")
    if parts.scheme != "https" or not parts.hostname or not config.sns_host_ok(parts.hostname):
        raise Refused(403, "SubscribeURL not an SNS host")
    try:
        async with httpx.AsyncClient(timeout=SNS_FETCH_TIMEOUT_SECONDS, verify=config.sns_tls,
                                     follow_redirects=False) as client:
            response = await client.get(str(url))
    except httpx.HTTPError as exc:
        raise Unavailable(f"subscription not confirmed: {type(exc).__name__}") from None
    if response.status_code != 200:
        raise Unavailable(f"subscription not confirmed: HTTP {response.status_code}")
    config.count("ses_subscriptions_confirmed")


def ses_notifications(inner: Mapping[str, Any], sns_id: str) -> list[Notification]:
    """An SES notification (or event publishing record) mapped per recipient."""
    kind = inner.get("notificationType") or inner.get("eventType")
    mail = _obj(inner.get("mail"))
    headers = {str(h.get("name", "")).lower(): h.get("value") for h in _objs(mail.get("headers"))}
    where = {"verp": _text(mail.get("source"), 300), "message_id": _text(headers.get("message-id"), 300),
             "campaign_id": _text(headers.get("x-campaign-id"), 128)}
    out: list[Notification] = []
    if kind == "Bounce":
        bounce = _obj(inner.get("bounce"))
        hard = bounce.get("bounceType") == "Permanent"
        at = _moment(bounce.get("timestamp"))
        for i, rcpt in enumerate(_objs(bounce.get("bouncedRecipients"))):
            bounced = BounceReport(
                kind="hard" if hard else "soft", status=_status(rcpt.get("status")),
                diagnostic=_text(rcpt.get("diagnosticCode")),
                remote_mta=_text(bounce.get("reportingMTA"), 255), detector="ses", occurred_at=at)
            dedup = f"webhook:ses:{bounce.get('feedbackId') or sns_id}:{i}"
            out.append(Notification(bounced, dedup, **where))
    elif kind == "Complaint":
        complaint = _obj(inner.get("complaint"))
        feedback = _text(complaint.get("complaintFeedbackType"), 64).lower() or "abuse"
        if feedback not in ("not-spam",):
            report = ComplaintReport(feedback, _text(complaint.get("userAgent"), 255),
                                     _moment(complaint.get("timestamp")))
            out.append(Notification(report, f"webhook:ses:{complaint.get('feedbackId') or sns_id}", **where))
    return out


# --- SendGrid -------------------------------------------------------------------------------


def _sendgrid_key(text: str) -> ec.EllipticCurvePublicKey:
    data = text.strip()
    try:
        key = (serialization.load_pem_public_key(data.encode()) if data.startswith("-----")
               else serialization.load_der_public_key(base64.b64decode(data)))
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"SendGrid public key unreadable: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("SendGrid public key is not an EC key")
    return key


async def _sendgrid(config: WebhookConfig, body: bytes, request: Request) -> list[Notification]:
    if config.sendgrid_public_key:
        signature = request.headers.get("X-Twilio-Email-Event-Webhook-Signature", "")
        stamp = request.headers.get("X-Twilio-Email-Event-Webhook-Timestamp", "")
        if not signature or not stamp:
            raise Refused(401, "SendGrid signature missing")
        try:
            raw_signature = base64.b64decode(signature, validate=True)
            fresh = abs(config.clock() - float(stamp)) <= SENDGRID_MAX_AGE_SECONDS
            _sendgrid_key(config.sendgrid_public_key).verify(
                raw_signature, stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        except (binascii.Error, ValueError, InvalidSignature):
            raise Refused(403, "bad SendGrid signature") from None
        if not fresh:
            raise Refused(403, "SendGrid timestamp too old")
    events = _json(body)
    if not isinstance(events, list):
        raise Refused(400, "SendGrid body is not a list of events")
    return [n for event in _objs(events) for n in sendgrid_notifications(event)]


def sendgrid_notifications(event: Mapping[str, Any]) -> list[Notification]:
    kind = event.get("event")
    event_id = _text(event.get("sg_event_id"), 100) or _text(event.get("sg_message_id"), 100)
    dedup = f"webhook:sendgrid:{event_id}"
    if dedup.endswith(":"):
        return []
    where = {"verp": _text(event.get("verp"), 300), "message_id": _text(event.get("smtp-id"), 300),
             "campaign_id": _text(event.get("campaign_id"), 128)}
    at = _moment(event.get("timestamp"))
    report: Report
    if kind == "bounce":
        soft = event.get("type") == "blocked" or _status(event.get("status")).startswith("4")
        report = BounceReport("soft" if soft else "hard", _status(event.get("status")),
                              _text(event.get("reason")), detector="sendgrid", occurred_at=at)
    elif kind == "deferred":
        report = BounceReport("soft", _status(event.get("status") or event.get("response")),
                              _text(event.get("response")), detector="sendgrid", occurred_at=at)
    elif kind == "spamreport":
        report = ComplaintReport("abuse", occurred_at=at)
    else:
        return []
    return [Notification(report, dedup, **where)]


# --- Mailgun --------------------------------------------------------------------------------


async def _mailgun(config: WebhookConfig, body: bytes, _request: Request) -> list[Notification]:
    if not config.mailgun_signing_key:
        raise Refused(403, "Mailgun webhooks not configured")
    payload = _json(body)
    if not isinstance(payload, dict):
        raise Refused(400, "Mailgun body is not an object")
    signed = _obj(payload.get("signature"))
    stamp, token, signature = (str(signed.get(k, "")) for k in ("timestamp", "token", "signature"))
    if not stamp or not token or not signature:
        raise Refused(401, "Mailgun signature missing")
    expected = hmac.new(config.mailgun_signing_key, (stamp + token).encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature.lower()):
        raise Refused(403, "bad Mailgun signature")
    try:
        fresh = abs(config.clock() - float(stamp)) <= MAILGUN_MAX_AGE_SECONDS
    except ValueError:
        fresh = False
    if not fresh:
        raise Refused(403, "Mailgun timestamp too old")
    return mailgun_notifications(_obj(payload.get("event-data")))


def mailgun_notifications(data: Mapping[str, Any]) -> list[Notification]:
    kind, event_id = data.get("event"), _text(data.get("id"), 100)
    if not event_id:
        return []
    message = _obj(data.get("message"))
    headers = _obj(message.get("headers"))
    variables = _obj(data.get("user-variables"))
    where = {"verp": _text(variables.get("verp") or _obj(data.get("envelope")).get("sender"), 300),
             "message_id": _text(headers.get("message-id"), 300),
             "campaign_id": _text(variables.get("campaign_id"), 128)}
    at = _moment(data.get("timestamp"))
    report: Report
    if kind == "failed":
        status = _obj(data.get("delivery-status"))
        diagnostic = _text(status.get("description") or status.get("message"))
        code = _status(status.get("enhanced-code")) or _status(diagnostic)
        kind_: Literal["hard", "soft"] = "hard" if data.get("severity") == "permanent" else "soft"
        report = BounceReport(kind_, code, diagnostic, _text(status.get("mx-host"), 255), "mailgun", at)
    elif kind == "complained":
        report = ComplaintReport("abuse", occurred_at=at)
    else:
        return []
    return [Notification(report, f"webhook:mailgun:{event_id}", **where)]


# --- Postmark -------------------------------------------------------------------------------

_POSTMARK_HARD = frozenset({"HardBounce", "BadEmailAddress", "ManuallyDeactivated"})
_POSTMARK_SOFT = frozenset({"SoftBounce", "Transient", "DnsError", "Blocked", "SMTPApiError"})


async def _postmark(config: WebhookConfig, body: bytes, request: Request) -> list[Notification]:
    if not config.postmark_credentials:
        raise Refused(403, "Postmark webhooks not configured")
    given = request.headers.get("Authorization", "")
    scheme, _, encoded = given.partition(" ")
    try:
        credentials = base64.b64decode(encoded, validate=True) if scheme.lower() == "basic" else b""
    except (binascii.Error, ValueError):
        credentials = b""
    if not credentials:
        raise Refused(401, "Postmark credentials missing")
    if not secrets.compare_digest(credentials, config.postmark_credentials.encode()):
        raise Refused(403, "bad Postmark credentials")
    payload = _json(body)
    if not isinstance(payload, dict):
        raise Refused(400, "Postmark body is not an object")
    return postmark_notifications(payload)


def postmark_notifications(event: Mapping[str, Any]) -> list[Notification]:
    record, kind = event.get("RecordType"), event.get("Type")
    event_id = _text(event.get("ID"), 100)
    metadata = _obj(event.get("Metadata"))
    where = {"verp": _text(metadata.get("verp"), 300), "message_id": _text(metadata.get("message_id"), 300),
             "campaign_id": _text(metadata.get("campaign_id"), 128)}
    report: Report
    if not event_id:
        return []
    if record == "SpamComplaint" or kind == "SpamComplaint":
        report = ComplaintReport("abuse", occurred_at=_moment(event.get("BouncedAt")))
    elif record == "Bounce" and kind in _POSTMARK_HARD | _POSTMARK_SOFT:
        bounce_kind: Literal["hard", "soft"] = "hard" if kind in _POSTMARK_HARD else "soft"
        details = _text(event.get("Details"))
        report = BounceReport(bounce_kind, _status(details), details or _text(event.get("Description")),
                              detector="postmark", occurred_at=_moment(event.get("BouncedAt")))
    else:
        return []
    return [Notification(report, f"webhook:postmark:{event_id}", **where)]
