"""Base record, identifiers and the e-mail address rules shared by commands and events.

Addresses, three notions (see README "Contact identity"):
- `normalise_email(raw)`: the address a person typed, checked by the `email-validator`
  library (RFC 5321/5322, RFC 6531 internationalised local parts, IDNA 2008 domains) and put
  in the form this system stores and delivers to: trimmed, the local part as given (Unicode
  NFC), the domain in its ASCII (IDNA, "xn--") form, lower-case. `ann@bücher.example` and
  `ann@XN--BCHER-KVA.example` both become `ann@xn--bcher-kva.example`. Used for every new
  input: CSV imports (`InputEmail` in commands).
- `Email` (the type of addresses in events): every address an earlier version stored is
  still read back unchanged, so no stored event stops decoding; a Unicode domain is put in
  its ASCII form. `normalise_email`'s results are a subset: they read back unchanged.
- `email_identity(address)`: who the address belongs to, the whole normalised address
  lower-cased. `Ann@Example.COM` and `ann@example.com` are one person; `ann+x@example.com`
  is another. Contact ids derive from it (`schemas.contacts.contact_id_for`).
"""

from __future__ import annotations

import functools
import re
from typing import Annotated

from email_validator import EmailNotValidError, validate_email
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES, DOT_ATOM_TEXT
from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints

# Tenants and aggregates are named by callers; a tight alphabet keeps them safe as Kafka
# keys, SQL values and log fields.
_TENANT_ID = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
_ENTITY_ID = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}"
TenantId = Annotated[str, StringConstraints(pattern=f"^{_TENANT_ID}$")]
EntityId = Annotated[str, StringConstraints(pattern=f"^{_ENTITY_ID}$")]
# The same rules for code that checks values without a model (use fullmatch: pydantic's
# anchors): the projector's and the sender's fast paths.
TENANT_ID_RE = re.compile(_TENANT_ID)
ENTITY_ID_RE = re.compile(_ENTITY_ID)

# The shape of a stored address (what events have always held): one @, no whitespace or
# control characters before it, a dotted ASCII domain. Not a validity check of new input
# (email-validator does that); it keeps every event ever written readable.
_DOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}\.)+[A-Za-z0-9-]{2,63}"
_EMAIL = re.compile(r"^[^@\s\x00-\x1f\x7f<>,;]{1,64}@" + _DOMAIN + "$")
_STORED_DOMAIN = re.compile(_DOMAIN)

# Exactly the addresses `Email` returns unchanged (the stored shape with a lower-case domain,
# no surrounding whitespace): use fullmatch.
NORMALISED_EMAIL_RE = re.compile(
    r"[^@\s\x00-\x1f\x7f<>,;]{1,64}@[a-z0-9](?:[a-z0-9-]{0,62}\.)+[a-z0-9-]{2,63}"
)

# RFC 5321 4.5.3.1.3: a path holds at most 256 octets, "<" and ">" included.
MAX_EMAIL_OCTETS = 254
# Distinct domains whose validation is remembered: an import names the same few domains over
# and over, and the domain is most of email-validator's ~80 us per address.
DOMAIN_CACHE_SIZE = 65_536
_MAILBOX_NAMES = frozenset(CASE_INSENSITIVE_MAILBOX_NAMES)


class InvalidEmail(ValueError):
    """An address that cannot be mailed."""


def normalise_email(raw: str) -> str:
    """The stored and delivered form of a new address, or InvalidEmail with the reason.

    Checked by email-validator (no DNS look-up; quoted local parts, IP literals and display
    names refused; local part at most 64 characters): trimmed, local part as given (NFC),
    domain in its lower-case ASCII (IDNA 2008) form. A plain ASCII address takes a fast path
    that validates its domain once per distinct domain and its local part with the library's
    own dot-atom rule; the unit tests hold the two paths to the same answers.
    """
    candidate = raw.strip()
    local, at, domain = candidate.rpartition("@")
    if (at and local.isascii() and len(local) <= 64 and DOT_ATOM_TEXT.match(local)
            and local.lower() not in _MAILBOX_NAMES):
        known = _ascii_domain(domain)
        if known is not None and len(local) + 1 + known[1] <= MAX_EMAIL_OCTETS:
            return f"{local}@{known[0]}"
    return _validated(raw, candidate)


def _validated(raw: str, candidate: str) -> str:
    """The library's full check of one address (the slow path)."""
    if not candidate.isascii():
        try:
            candidate.encode()
        except UnicodeEncodeError:
            raise InvalidEmail(f"not a valid e-mail address: {raw!r}: not valid UTF-8") from None
    try:
        checked = validate_email(candidate, check_deliverability=False, strict=True)
    except EmailNotValidError as exc:
        raise InvalidEmail(f"not a valid e-mail address: {raw!r}: {exc}") from None
    address = f"{checked.local_part}@{checked.ascii_domain}"
    if not _EMAIL.match(address):
        # Valid by the RFCs but not a shape events can hold (e.g. a one-letter top-level
        # domain): refused rather than stored in a form older readers would reject.
        raise InvalidEmail(
            f"not a valid e-mail address: {raw!r}: unsupported domain {checked.ascii_domain!r}")
    return address


@functools.lru_cache(maxsize=DOMAIN_CACHE_SIZE)
def _ascii_domain(domain: str) -> tuple[str, int] | None:
    """A domain's ASCII form and its longest UTF-8 length (as given, Unicode, ASCII), or
    None when the library refuses it or it does not fit the stored shape (the slow path then
    words the reason)."""
    try:
        checked = validate_email("a@" + domain, check_deliverability=False, strict=True)
        octets = max(len(domain.encode()), len(checked.domain.encode()), len(checked.ascii_domain))
    except (EmailNotValidError, UnicodeEncodeError):
        return None
    if not _STORED_DOMAIN.fullmatch(checked.ascii_domain):
        return None
    return checked.ascii_domain, octets


def recorded_email(raw: str) -> str:
    """An address as events hold it: the stored shape with a lower-case domain; a Unicode
    (IDN) domain is checked by `normalise_email` and put in its ASCII form."""
    candidate = raw.strip()
    if len(candidate) <= MAX_EMAIL_OCTETS and _EMAIL.match(candidate):
        local, _, domain = candidate.rpartition("@")
        return f"{local}@{domain.lower()}"
    if not candidate.rpartition("@")[2].isascii():
        return normalise_email(candidate)
    raise InvalidEmail(f"not a valid e-mail address: {raw!r}")


def email_identity(address: str) -> str:
    """Who an address belongs to: the whole address (as `Email` reads it) lower-cased.

    Case-insensitive as receiving systems and users treat addresses, although RFC 5321 lets
    a local part be case-sensitive. `str.lower`, not `casefold`: folding would also make
    "straße" and "strasse" one person, which are different mailboxes, not different cases.
    """
    return recorded_email(address).lower()


Email = Annotated[str, AfterValidator(recorded_email)]
InputEmail = Annotated[str, AfterValidator(normalise_email)]
# A header value must never carry CR/LF: that is how header injection starts.
HeaderText = Annotated[str, StringConstraints(min_length=1, max_length=998, pattern=r"^[^\r\n]*$")]


class Record(BaseModel):
    """Frozen, closed record: unknown fields are an error, never silently dropped."""

    model_config = ConfigDict(frozen=True, extra="forbid")
