"""Base record, identifiers and the e-mail address rule shared by commands and events."""

from __future__ import annotations

import re
from typing import Annotated

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

# Deliberately plain: one @, no whitespace or control characters, a dotted domain.
_EMAIL = re.compile(r"^[^@\s\x00-\x1f\x7f<>,;]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}\.)+[A-Za-z0-9-]{2,63}$")


# Exactly the addresses normalise_email returns unchanged (the address rule with a lower-case
# domain, no surrounding whitespace): use fullmatch.
NORMALISED_EMAIL_RE = re.compile(
    r"[^@\s\x00-\x1f\x7f<>,;]{1,64}@[a-z0-9](?:[a-z0-9-]{0,62}\.)+[a-z0-9-]{2,63}"
)


class InvalidEmail(ValueError):
    """An address that cannot be mailed."""


def normalise_email(raw: str) -> str:
    """Trim and lower-case the domain; the local part is case-sensitive by RFC 5321."""
    candidate = raw.strip()
    if len(candidate) > 254 or not _EMAIL.match(candidate):
        raise InvalidEmail(f"not a valid e-mail address: {raw!r}")
    local, _, domain = candidate.rpartition("@")
    return f"{local}@{domain.lower()}"


def _checked_email(raw: str) -> str:
    return normalise_email(raw)


Email = Annotated[str, AfterValidator(_checked_email)]
# A header value must never carry CR/LF: that is how header injection starts.
HeaderText = Annotated[str, StringConstraints(min_length=1, max_length=998, pattern=r"^[^\r\n]*$")]


class Record(BaseModel):
    """Frozen, closed record: unknown fields are an error, never silently dropped."""

    model_config = ConfigDict(frozen=True, extra="forbid")
