"""VERP return paths: `bounces+<token>@<bounce domain>`, naming the mail's tenant, campaign and
contact, signed so that a bounce cannot be forged for someone else.

Guarantees:
- `verp_address` gives a mailbox whose local part is at most 64 octets (RFC 5321 4.5.3.1.1)
  and uses only lower-case letters, digits 2-7 and "+": an MTA that lower-cases (or
  upper-cases) the local part does not change its meaning; base32 without padding.
- `read_address` returns a claim only for an address `verp_address` made with a key it still
  holds (key rotation: the key id is in the token; any listed key verifies, the first signs),
  unaltered: HMAC-SHA256 (truncated to 64 bits, enough against online guessing over SMTP)
  over every id, compared in constant time. Anything else gives a `VerpRefusal` with the
  reason, never an exception (except `DirectoryUnavailable` from the campaign directory).

Token forms (the first character), picked by `verp_address`:
- "a" (all inline): tenant, campaign and contact in the token; self-contained.
- "r" (by reference): when the ids do not fit, the (tenant, campaign) pair is named by an
  8-byte digest (`campaign_ref`) and the contact is inline (a UUID packs into 16 bytes, other
  ids up to 16 characters). The receiver resolves the digest through a campaign directory
  (the campaigns read model; see services.bounces.directory); the MAC covers the full ids,
  so a digest collision or a forged digest cannot attribute a bounce to another campaign.
- Ids that fit neither (a non-UUID contact id over 16 characters): `VerpTooLong`; the sender
  then uses the plain bounce address (`bounces@<domain>`) and the bounce is attributed by
  the returned original's headers, if at all.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from schemas.base import ENTITY_ID_RE, TENANT_ID_RE

LOCAL_PREFIX = "bounces"
# RFC 5321 4.5.3.1.1: a local part holds at most 64 octets.
MAX_LOCAL_OCTETS = 64
_TOKEN_CHARS = MAX_LOCAL_OCTETS - len(LOCAL_PREFIX) - 1
# Two visible characters (form, key id) before the base32 body.
_BODY_BYTES = (_TOKEN_CHARS - 2) * 5 // 8
_MAC_BYTES = 8
_REF_BYTES = 8
_UUID_TAG, _TEXT_TAG = 1, 0
# The base32 alphabet, lower-case: what a key id may be.
KEY_ID_CHARS = "abcdefghijklmnopqrstuvwxyz234567"
_BODY = re.compile(r"[a-z2-7]+")

# The candidates a campaign directory knows for a digest: (tenant, campaign) pairs.
CampaignDirectory = Callable[[bytes], Iterable[tuple[str, str]]]


class DirectoryUnavailable(RuntimeError):
    """The campaign directory could not be asked (its database is away): try again later."""


class VerpTooLong(ValueError):
    """The ids do not fit in a 64-octet local part in either form."""


@dataclass(frozen=True, slots=True)
class VerpClaim:
    tenant_id: str
    campaign_id: str
    contact_id: str


@dataclass(frozen=True, slots=True)
class VerpRefusal:
    reason: str


@dataclass(frozen=True)
class VerpKeys:
    """Signing keys by key id; the first one signs new tokens, all of them verify."""

    keys: Mapping[str, bytes]
    signing: str

    @classmethod
    def parse(cls, text: str) -> VerpKeys:
        """'kid:secret,kid:secret' (kid one of a-z, 2-7; the first signs)."""
        keys: dict[str, bytes] = {}
        order: list[str] = []
        for entry in (part.strip() for part in text.split(",")):
            if not entry:
                continue
            kid, sep, secret = entry.partition(":")
            kid = kid.strip().lower()
            if not sep or len(kid) != 1 or kid not in KEY_ID_CHARS or not secret:
                raise ValueError("VERP keys are 'id:secret' entries, id one of a-z or 2-7")
            if kid in keys:
                raise ValueError(f"VERP key id {kid!r} given twice")
            keys[kid] = secret.encode()
            order.append(kid)
        if not order:
            raise ValueError("no VERP key given")
        return cls(keys, order[0])


def campaign_ref(tenant_id: str, campaign_id: str) -> bytes:
    """The digest naming a (tenant, campaign) pair in "r" tokens."""
    return hashlib.sha256(f"verp-ref\x00{tenant_id}\x00{campaign_id}".encode()).digest()[:_REF_BYTES]


def _mac(secret: bytes, form: str, kid: str, tenant: str, campaign: str, contact: str) -> bytes:
    signed = "\x00".join(("verp1", form, kid, tenant, campaign, contact)).encode()
    return hmac.new(secret, signed, hashlib.sha256).digest()[:_MAC_BYTES]


def _contact_bytes(contact_id: str) -> bytes:
    try:
        packed = uuid.UUID(contact_id)
    except ValueError:
        packed = None
    if packed is not None and str(packed) == contact_id:
        return bytes([_UUID_TAG]) + packed.bytes
    return bytes([_TEXT_TAG]) + contact_id.encode()


def _contact_text(raw: bytes) -> str | None:
    if not raw:
        return None
    if raw[0] == _UUID_TAG:
        return str(uuid.UUID(bytes=raw[1:])) if len(raw) == 17 else None
    if raw[0] == _TEXT_TAG:
        text = raw[1:].decode("ascii", "replace")
        return text if ENTITY_ID_RE.fullmatch(text) else None
    return None


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode().rstrip("=").lower()


def _unb32(text: str) -> bytes | None:
    if not _BODY.fullmatch(text) or len(text) * 5 % 8 >= 5:
        return None
    try:
        raw = base64.b32decode(text.upper() + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        return None
    return raw if _b32(raw) == text else None  # one spelling per token


def verp_token(keys: VerpKeys, tenant_id: str, campaign_id: str, contact_id: str) -> str:
    """The token for a mail of this campaign to this contact (see the forms above)."""
    if not (TENANT_ID_RE.fullmatch(tenant_id) and ENTITY_ID_RE.fullmatch(campaign_id)
            and ENTITY_ID_RE.fullmatch(contact_id)):
        raise ValueError("tenant, campaign and contact must be valid ids")
    kid, secret = keys.signing, keys.keys[keys.signing]
    contact = _contact_bytes(contact_id)
    t, c = tenant_id.encode(), campaign_id.encode()
    inline = bytes([len(t)]) + t + bytes([len(c)]) + c + contact
    if len(inline) + _MAC_BYTES <= _BODY_BYTES:
        mac = _mac(secret, "a", kid, tenant_id, campaign_id, contact_id)
        return "a" + kid + _b32(inline + mac)
    by_ref = campaign_ref(tenant_id, campaign_id) + contact
    if len(by_ref) + _MAC_BYTES <= _BODY_BYTES:
        mac = _mac(secret, "r", kid, tenant_id, campaign_id, contact_id)
        return "r" + kid + _b32(by_ref + mac)
    raise VerpTooLong(f"contact id of {len(contact_id)} characters does not fit a VERP token")


def verp_address(keys: VerpKeys, domain: str, tenant_id: str, campaign_id: str, contact_id: str) -> str:
    """The envelope sender (MAIL FROM) of a campaign mail to a contact."""
    return f"{LOCAL_PREFIX}+{verp_token(keys, tenant_id, campaign_id, contact_id)}@{domain.lower()}"


def token_of(address: str, domain: str) -> str | None:
    """The token of `bounces+<token>@<domain>` (any case, with or without <>), else None."""
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    local, at, host = text.rpartition("@")
    if not at or host.lower().rstrip(".") != domain.lower().rstrip("."):
        return None
    prefix, plus, token = local.partition("+")
    if not plus or prefix.lower() != LOCAL_PREFIX:
        return None
    return token.lower()


def read_token(token: str, keys: VerpKeys,
               directory: CampaignDirectory | None = None) -> VerpClaim | VerpRefusal:
    """The ids a genuine token names, or why not. Raises only DirectoryUnavailable."""
    token = token.lower()
    if len(token) < 3 or len(token) > _TOKEN_CHARS:
        return VerpRefusal("malformed token")
    form, kid, body = token[0], token[1], _unb32(token[2:])
    if body is None or form not in "ar" or len(body) <= _MAC_BYTES:
        return VerpRefusal("malformed token")
    secret = keys.keys.get(kid)
    if secret is None:
        return VerpRefusal(f"unknown key id {kid!r}")
    ids, mac = body[:-_MAC_BYTES], body[-_MAC_BYTES:]
    if form == "a":
        candidates = _inline(ids)
        if candidates is None:
            return VerpRefusal("malformed token")
        tenant, campaign, contact = candidates
        pairs: Iterable[tuple[str, str]] = [(tenant, campaign)]
    else:
        if len(ids) <= _REF_BYTES:
            return VerpRefusal("malformed token")
        found = _contact_text(ids[_REF_BYTES:])
        if found is None:
            return VerpRefusal("malformed token")
        contact = found
        if directory is None:
            return VerpRefusal("campaign reference needs a directory")
        pairs = list(directory(ids[:_REF_BYTES]))
        if not pairs:
            return VerpRefusal("unknown campaign reference")
    for tenant, campaign in pairs:
        # Constant time: how much of a forged MAC is right must not show in the timing.
        if hmac.compare_digest(_mac(secret, form, kid, tenant, campaign, contact), mac):
            return VerpClaim(tenant, campaign, contact)
    return VerpRefusal("bad signature")


def read_address(address: str, domain: str, keys: VerpKeys,
                 directory: CampaignDirectory | None = None) -> VerpClaim | VerpRefusal:
    """`read_token` of a whole address; an address not of the bounce domain is refused."""
    token = token_of(address, domain)
    if token is None:
        return VerpRefusal("not a VERP address of the bounce domain")
    return read_token(token, keys, directory)


def _inline(ids: bytes) -> tuple[str, str, str] | None:
    try:
        t_len = ids[0]
        tenant = ids[1:1 + t_len].decode("ascii")
        c_len = ids[1 + t_len]
        campaign = ids[2 + t_len:2 + t_len + c_len].decode("ascii")
    except (IndexError, UnicodeDecodeError):
        return None
    contact = _contact_text(ids[2 + t_len + c_len:])
    if contact is None or not TENANT_ID_RE.fullmatch(tenant) or not ENTITY_ID_RE.fullmatch(campaign):
        return None
    if len(tenant) != t_len or len(campaign) != c_len:
        return None
    return tenant, campaign, contact


class CampaignRefs:
    """An in-memory campaign directory: digest -> the (tenant, campaign) pairs added."""

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        self._refs: dict[bytes, set[tuple[str, str]]] = {}
        for tenant, campaign in pairs:
            self.add(tenant, campaign)

    def add(self, tenant_id: str, campaign_id: str) -> None:
        self._refs.setdefault(campaign_ref(tenant_id, campaign_id), set()).add((tenant_id, campaign_id))

    def __contains__(self, ref: bytes) -> bool:
        return ref in self._refs

    def __call__(self, ref: bytes) -> Iterable[tuple[str, str]]:
        return sorted(self._refs.get(ref, ()))
