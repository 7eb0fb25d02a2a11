"""Signed tracking tokens: which tenant's contact opened which campaign's mail, or followed
which of its links.

Guarantee: `TrackingKeys.verify(token)` returns a claim only for a token that `sign_open` or
`sign_click` made with one of the keys configured now, unaltered: HMAC-SHA256 over the key
id and every field (kind, tenant, campaign, contact, signing time, link index and count, the
link's URL), compared in constant time. The URL of a click lives inside the signed text, so
a redirect needs no database and only ever goes where the sender's mail pointed: no open
redirect. Anything else raises InvalidTrackingToken with the reason: `malformed` (not the
shape of a token at all: the tracker answers 400), or a key id no longer (or never)
configured, a bad signature, an unsupported version (404).

Key rotation: keys are (key id, secret) pairs; the first signs, every one verifies. Add the
new key first on every tracker, then let the senders sign with it, and drop the old one only
when its mail no longer matters: its tokens are refused from then on ("unknown key").
Tokens are URL-safe (base64url, no padding) and at most MAX_TOKEN_LENGTH characters.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass

from schemas.base import ENTITY_ID_RE, TENANT_ID_RE
from schemas.engagement import MAX_TRACKED_URL_LENGTH
from services.common.unsubscribe_tokens import InvalidToken, _b64, _unb64

# Version tag inside the signed text: lets a future format coexist with this one.
_VERSION = "t1"
_SEPARATOR = "\n"
_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,16}")
# Shorter secrets are refused: an HMAC key should carry at least 128 bits.
MIN_SECRET_BYTES = 16
# A click's URL base64-encoded (4/3 of MAX_TRACKED_URL_LENGTH) plus ids, key id and MAC;
# longer input is refused before any decoding work.
MAX_TOKEN_LENGTH = 3 * 1024 + 512
# Links in one mail: bounds the index fields a token may carry.
MAX_LINKS = 10_000
# What a URL may hold: printable ASCII, no space (a rewritten href is percent-encoded).
_URL = re.compile(r"https?://[!-~]+", re.IGNORECASE)


class Kind(enum.StrEnum):
    OPEN = "o"
    CLICK = "c"


class Refusal(enum.StrEnum):
    """Why a token is refused."""

    MALFORMED = "malformed"
    UNKNOWN_KEY = "unknown key"
    BAD_SIGNATURE = "bad signature"
    UNSUPPORTED = "unsupported version"


class InvalidTrackingToken(InvalidToken):
    """Not a token a configured key signed; `reason` says which way."""

    def __init__(self, reason: Refusal) -> None:
        super().__init__(reason.value)
        self.reason = reason

    @property
    def malformed(self) -> bool:
        return self.reason is Refusal.MALFORMED


@dataclass(frozen=True, slots=True)
class TrackingClaim:
    """What a genuine token says. `sent_at`: when the sender signed it (Unix seconds), about
    when the mail was delivered. Clicks carry the link: its index among the mail's tracked
    links, how many there were, and its URL."""

    kind: Kind
    tenant_id: str
    campaign_id: str
    contact_id: str
    sent_at: int
    link_index: int | None = None
    links_in_mail: int | None = None
    url: str | None = None


def trackable_url(url: str) -> bool:
    """A link a click token can carry: http(s), printable ASCII, not over the length bound."""
    return len(url) <= MAX_TRACKED_URL_LENGTH and _URL.fullmatch(url) is not None


class TrackingKeys:
    """The configured (key id, secret) pairs; the first signs."""

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("tracking needs at least one key")
        for key_id, secret in keys:
            if not _KEY_ID.fullmatch(key_id):
                raise ValueError(f"key id {key_id!r}: 1-16 of A-Z a-z 0-9 _ -")
            if len(secret) < MIN_SECRET_BYTES:
                raise ValueError(f"key {key_id!r}: a secret needs at least {MIN_SECRET_BYTES} bytes")
        if len({key_id for key_id, _ in keys}) != len(keys):
            raise ValueError("key ids must be distinct")
        self._signing = keys[0]
        self._secrets = dict(keys)

    @classmethod
    def parse(cls, text: str) -> TrackingKeys:
        """'id:secret,id:secret' (the form of TRACKER_KEYS); the first pair signs."""
        pairs = []
        for entry in filter(None, (part.strip() for part in text.split(","))):
            key_id, colon, secret = entry.partition(":")
            if not colon:
                raise ValueError("each key is 'id:secret'")
            pairs.append((key_id.strip(), secret.strip().encode()))
        return cls(pairs)

    @property
    def signing_key_id(self) -> str:
        return self._signing[0]

    def sign_open(self, tenant_id: str, campaign_id: str, contact_id: str, *, sent_at: int) -> str:
        """The token of a mail's open pixel."""
        return self._sign((Kind.OPEN, tenant_id, campaign_id, contact_id, str(sent_at), "", "", ""))

    def sign_click(self, tenant_id: str, campaign_id: str, contact_id: str, *, sent_at: int,
                   link_index: int, links_in_mail: int, url: str) -> str:
        """The token of one link; ValueError for a link no token may carry (`trackable_url`)."""
        if not trackable_url(url):
            raise ValueError("only http(s) links of printable ASCII, at most "
                             f"{MAX_TRACKED_URL_LENGTH} characters, are tracked")
        if not 0 <= link_index < links_in_mail <= MAX_LINKS:
            raise ValueError("link_index must be in [0, links_in_mail), links_in_mail <= MAX_LINKS")
        return self._sign((Kind.CLICK, tenant_id, campaign_id, contact_id, str(sent_at),
                           str(link_index), str(links_in_mail), url))

    def verify(self, token: str) -> TrackingClaim:
        """The claim of a genuine token; raises InvalidTrackingToken otherwise."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH or token.count(".") != 2:
            raise InvalidTrackingToken(Refusal.MALFORMED)
        key_id, body, signature = token.split(".")
        if not _KEY_ID.fullmatch(key_id):
            raise InvalidTrackingToken(Refusal.MALFORMED)
        try:
            message, mac = _unb64(body), _unb64(signature)
        except InvalidToken:
            raise InvalidTrackingToken(Refusal.MALFORMED) from None
        secret = self._secrets.get(key_id)
        if secret is None:
            raise InvalidTrackingToken(Refusal.UNKNOWN_KEY)
        # Constant time: how much of a forged signature is right must not show in the timing.
        if not hmac.compare_digest(_mac(secret, key_id, message), mac):
            raise InvalidTrackingToken(Refusal.BAD_SIGNATURE)
        return _claim(message)

    def _sign(self, fields: tuple[str, ...]) -> str:
        kind, tenant_id, campaign_id, contact_id, sent_at = fields[:5]
        if not (TENANT_ID_RE.fullmatch(tenant_id) and ENTITY_ID_RE.fullmatch(campaign_id)
                and ENTITY_ID_RE.fullmatch(contact_id)):
            raise ValueError("tenant, campaign and contact ids must be valid ids")
        if not sent_at.isdigit():
            raise ValueError("sent_at must be Unix seconds, not negative")
        key_id, secret = self._signing
        message = _SEPARATOR.join((_VERSION, *fields)).encode()
        return f"{key_id}.{_b64(message)}.{_b64(_mac(secret, key_id, message))}"


def _mac(secret: bytes, key_id: str, message: bytes) -> bytes:
    # The key id is signed too: a token cannot be moved under another configured key.
    return hmac.new(secret, key_id.encode() + b"\n" + message, hashlib.sha256).digest()


def _claim(message: bytes) -> TrackingClaim:
    """The fields of a signed text (its signature already checked)."""
    try:
        parts = message.decode("ascii").split(_SEPARATOR)
    except UnicodeDecodeError:
        raise InvalidTrackingToken(Refusal.UNSUPPORTED) from None
    if len(parts) != 9 or parts[0] != _VERSION or parts[1] not in (Kind.OPEN, Kind.CLICK):
        raise InvalidTrackingToken(Refusal.UNSUPPORTED)
    _, kind, tenant_id, campaign_id, contact_id, sent_at, index, count, url = parts
    if not sent_at.isdigit():
        raise InvalidTrackingToken(Refusal.UNSUPPORTED)
    if kind == Kind.OPEN:
        return TrackingClaim(Kind.OPEN, tenant_id, campaign_id, contact_id, int(sent_at))
    if not (index.isdigit() and count.isdigit() and trackable_url(url)):
        raise InvalidTrackingToken(Refusal.UNSUPPORTED)
    return TrackingClaim(Kind.CLICK, tenant_id, campaign_id, contact_id, int(sent_at),
                         int(index), int(count), url)
