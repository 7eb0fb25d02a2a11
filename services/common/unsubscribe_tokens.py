"""Unsubscribe tokens: who (tenant, contact) asked to leave, from which campaign's mail.

Guarantee: `verify(secret, token)` returns a claim only for a token that `sign` made with the
same secret, unaltered: HMAC-SHA256 over the claim, compared in constant time. Anything else
(tampered, truncated, another secret, malformed) raises InvalidToken, with no hint which.
Tokens are URL-safe base64 (no padding, no characters that need escaping in a query string)
and carry no expiry: an unsubscribe link must keep working as long as the mail is read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass

# Version tag inside the signed text: lets a future format coexist with this one.
_VERSION = "u1"
_SEPARATOR = "\n"
# schemas.base.TenantId / EntityId: the ids never contain the separator.
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ENTITY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
# Longer than any valid token: refuse before decoding attacker-sized input.
_MAX_TOKEN_LENGTH = 512


class InvalidToken(ValueError):
    """Not a token this secret signed."""


@dataclass(frozen=True, slots=True)
class UnsubscribeClaim:
    tenant_id: str
    contact_id: str
    campaign_id: str


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise InvalidToken("not a token")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise InvalidToken("not a token") from None
    if _b64(raw) != text:  # one spelling per token: unused trailing bits must be zero
        raise InvalidToken("not a token")
    return raw


def _mac(secret: bytes, message: bytes) -> bytes:
    return hmac.new(secret, message, hashlib.sha256).digest()


def sign(secret: bytes, tenant_id: str, contact_id: str, campaign_id: str) -> str:
    """A token for this tenant's contact, from this campaign's mail."""
    if not secret:
        raise ValueError("an unsubscribe secret must not be empty")
    if not (_TENANT.fullmatch(tenant_id) and _ENTITY.fullmatch(contact_id)
            and _ENTITY.fullmatch(campaign_id)):
        raise ValueError("tenant, contact and campaign ids must be valid ids")
    message = _SEPARATOR.join((_VERSION, tenant_id, contact_id, campaign_id)).encode()
    return f"{_b64(message)}.{_b64(_mac(secret, message))}"


def verify(secret: bytes, token: str) -> UnsubscribeClaim:
    """The claim a genuine token carries; raises InvalidToken otherwise."""
    if not secret:
        raise ValueError("an unsubscribe secret must not be empty")
    if not isinstance(token, str) or len(token) > _MAX_TOKEN_LENGTH or token.count(".") != 1:
        raise InvalidToken("not a token")
    body, signature = token.split(".")
    message, mac = _unb64(body), _unb64(signature)
    # Constant time: how much of a forged signature is right must not show in the timing.
    if not hmac.compare_digest(_mac(secret, message), mac):
        raise InvalidToken("not a token")
    try:
        parts = message.decode("utf-8").split(_SEPARATOR)
    except UnicodeDecodeError:
        raise InvalidToken("not a token") from None
    if len(parts) != 4 or parts[0] != _VERSION:
        raise InvalidToken("not a token")
    return UnsubscribeClaim(tenant_id=parts[1], contact_id=parts[2], campaign_id=parts[3])
