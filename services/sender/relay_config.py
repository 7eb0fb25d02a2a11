"""Which SMTP relays the sender uses, read and checked once at start-up.

Source, from the environment: SENDER_RELAYS_FILE (a JSON or TOML file, by its suffix) or
SENDER_RELAYS (the same document as JSON); with neither, None: the sender keeps its single
SMTP_HOST:SMTP_PORT relay exactly as before. Setting both is an error.

Document (TOML shown; JSON has the same keys):

    default = "primary"            # relay of every From domain no relay names
    failover = ["backup"]          # tried in this order when the routed relay is unusable
    cool_off_seconds = 30          # how long a relay that failed is passed over

    [[relays]]
    name = "primary"
    host = "smtp.example.net"
    port = 587
    security = "starttls"          # none | starttls | tls
    username = "campaigns"
    password_env = "PRIMARY_SMTP_PASSWORD"   # or password_file = "/run/secrets/primary"
    connections = 8                # pool size (default: the sender's concurrency)
    timeout_seconds = 10
    domains = ["example.com", "news.example.org"]

Guarantees: a `RelaysConfig` that exists is valid - names unique, every domain routed to one
relay at most, the default and the failover list naming configured relays, credentials
complete and never sent in the clear unless explicitly allowed, a CA file that exists. Any
violation raises `RelayConfigError` whose message names the source and the field. Passwords
are read from the named environment variable or file when the config is loaded (so a missing
secret fails the start, not the first mail) and held as `SecretStr`: they never appear in a
repr, a log line or an error message.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    model_validator,
)

from services.common.settings import SenderSettings
from services.sender.smtp_pool import SMTP_TIMEOUT_SECONDS, Credentials, Security

FILE_VARIABLE = "SENDER_RELAYS_FILE"
JSON_VARIABLE = "SENDER_RELAYS"

# A relay that failed (connect, TLS, AUTH) is passed over this long by default: long enough
# that mails do not each pay a connect timeout against a dead relay, short enough that a
# relay back from a restart gets traffic again within half a minute.
DEFAULT_COOL_OFF_SECONDS = 30.0

RelayName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
# A DNS name: dot-separated labels of letters, digits and hyphens (IDNs in their A-label form).
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")


class RelayConfigError(ValueError):
    """The relay configuration cannot be used; the message says where and why."""


def normalise_domain(raw: str) -> str:
    """A domain as routing compares it: trimmed, lower case, no trailing dot."""
    return raw.strip().lower().rstrip(".")


class RelaySettings(BaseModel):
    """One relay as configured."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: RelayName
    host: str = Field(min_length=1, max_length=253)
    port: int = Field(default=25, ge=1, le=65535)
    security: Security = Security.NONE
    username: str | None = Field(default=None, min_length=1, max_length=256)
    # Where the password comes from: never the password itself in the config document.
    password_env: str | None = Field(default=None, min_length=1)
    password_file: Path | None = None
    # The resolved password (filled by `load`; not a key of the document).
    password: SecretStr | None = Field(default=None, exclude=True)
    ca_file: Path | None = None
    # Only for test relays with self-signed certificates: no certificate or host check.
    verify_certificate: bool = True
    # AUTH over a session that is not encrypted sends the password in the clear.
    allow_plaintext_auth: bool = False
    connections: int | None = Field(default=None, ge=1, le=1000)
    # Per socket operation (see smtp_pool.SMTP_TIMEOUT_SECONDS). Capped: one attempt that
    # fails over through every relay must stay well inside the sender's poll interval.
    timeout_seconds: float = Field(default=SMTP_TIMEOUT_SECONDS, gt=0, le=60)
    domains: list[str] = Field(default_factory=list, max_length=10_000)

    @model_validator(mode="after")
    def _consistent(self) -> RelaySettings:
        for domain in self.domains:
            if not _valid_domain(normalise_domain(domain)):
                raise ValueError(f"relay {self.name!r}: {domain!r} is not a domain name")
        if self.password_env and self.password_file:
            raise ValueError(f"relay {self.name!r}: give password_env or password_file, not both")
        has_secret = bool(self.password_env or self.password_file)
        if self.username and not has_secret:
            raise ValueError(f"relay {self.name!r}: username set without password_env or "
                             "password_file")
        if has_secret and not self.username:
            raise ValueError(f"relay {self.name!r}: a password source without a username")
        if self.security is Security.NONE:
            if self.username and not self.allow_plaintext_auth:
                raise ValueError(f"relay {self.name!r}: AUTH without TLS sends the password in "
                                 "the clear; use security starttls or tls (or set "
                                 "allow_plaintext_auth for a trusted local relay)")
            if self.ca_file is not None or not self.verify_certificate:
                raise ValueError(f"relay {self.name!r}: ca_file / verify_certificate need "
                                 "security starttls or tls")
        return self

    @property
    def credentials(self) -> Credentials | None:
        """The login, once `load` resolved the password."""
        if self.username is None or self.password is None:
            return None
        return Credentials(self.username, self.password.get_secret_value())


class RelaysConfig(BaseModel):
    """Every relay, the default one and the failover order."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    relays: list[RelaySettings] = Field(min_length=1, max_length=100)
    # Required with more than one relay: which relay takes mail of unlisted From domains.
    default: RelayName | None = None
    failover: list[RelayName] = Field(default_factory=list)
    cool_off_seconds: float = Field(default=DEFAULT_COOL_OFF_SECONDS, ge=0, le=3600)

    @model_validator(mode="after")
    def _consistent(self) -> RelaysConfig:
        names = [relay.name for relay in self.relays]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate relay name(s): {', '.join(duplicates)}")
        owners: dict[str, str] = {}
        for relay in self.relays:
            for domain in map(normalise_domain, relay.domains):
                owner = owners.setdefault(domain, relay.name)
                if owner != relay.name:
                    raise ValueError(f"domain {domain!r} is routed to two relays: {owner!r} "
                                     f"and {relay.name!r}")
                # The same relay naming a domain twice is harmless; say nothing.
        if self.default is None and len(self.relays) > 1:
            raise ValueError("default: name the relay of From domains no relay lists "
                             f"(one of {', '.join(names)})")
        if self.default is not None and self.default not in names:
            raise ValueError(f"default: {self.default!r} is not a configured relay "
                             f"(configured: {', '.join(names)})")
        unknown = [n for n in self.failover if n not in names]
        if unknown:
            raise ValueError(f"failover: unknown relay(s) {', '.join(unknown)} "
                             f"(configured: {', '.join(names)})")
        if len(set(self.failover)) != len(self.failover):
            raise ValueError("failover: a relay is listed twice")
        return self

    @property
    def default_relay(self) -> str:
        return self.default or self.relays[0].name

    def routes(self) -> dict[str, str]:
        """Normalised From domain -> relay name."""
        return {normalise_domain(d): relay.name for relay in self.relays for d in relay.domains}


def _valid_domain(domain: str) -> bool:
    return _DOMAIN.match(domain) is not None


def load(settings: SenderSettings, secrets: Mapping[str, str]) -> RelaysConfig | None:
    """The relay configuration SENDER_RELAYS_FILE or SENDER_RELAYS gives, passwords resolved
    from `secrets`; None when neither is set (the single SMTP_HOST relay). Raises
    RelayConfigError with the reason."""
    path, inline = settings.sender_relays_file, settings.sender_relays.strip()
    if path and inline:
        raise RelayConfigError(f"set {FILE_VARIABLE} or {JSON_VARIABLE}, not both")
    if path:
        where = f"{FILE_VARIABLE} {path}"
        document = _read_file(path, where)
        base = path.parent
    elif inline:
        where = JSON_VARIABLE
        document = _parse_json(inline, where)
        base = Path.cwd()
    else:
        return None
    return parse(document, where, secrets, base)


def parse(document: Any, where: str, env: Mapping[str, str], base: Path) -> RelaysConfig:
    """Validate a configuration document and resolve its secrets (files relative to `base`)."""
    if not isinstance(document, dict):
        raise RelayConfigError(f"{where}: expected an object with a 'relays' list")
    relays = document.get("relays")
    if isinstance(relays, list) and any(isinstance(r, dict) and "password" in r for r in relays):
        raise RelayConfigError(f"{where}: a relay holds 'password': name password_env or "
                               "password_file instead (secrets stay out of config documents)")
    try:
        config = RelaysConfig.model_validate(document)
    except ValidationError as exc:
        raise RelayConfigError(f"{where}: {_explain(exc)}") from None
    resolved = [_with_secret(relay, where, env, base) for relay in config.relays]
    checked = [_with_ca_file(relay, where, base) for relay in resolved]
    return config.model_copy(update={"relays": checked})


def _read_file(path: Path, where: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RelayConfigError(f"{where}: cannot read: {exc.strerror or exc}") from None
    if path.suffix.lower() == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise RelayConfigError(f"{where}: invalid TOML: {exc}") from None
    if path.suffix.lower() == ".json":
        return _parse_json(text, where)
    raise RelayConfigError(f"{where}: unknown format; name the file *.json or *.toml")


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise RelayConfigError(f"{where}: invalid JSON: {exc}") from None


def _explain(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_input=False):
        location = ".".join(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{location}: {message}" if location else message)
    return "; ".join(parts)


def _with_secret(relay: RelaySettings, where: str, env: Mapping[str, str],
                 base: Path) -> RelaySettings:
    if relay.password_env:
        secret = env.get(relay.password_env, "")
        if not secret:
            raise RelayConfigError(f"{where}: relay {relay.name!r}: environment variable "
                                   f"{relay.password_env} (password_env) is not set or empty")
    elif relay.password_file:
        path = relay.password_file if relay.password_file.is_absolute() else base / relay.password_file
        try:
            # One trailing line break is how files are written; it is not part of the secret.
            secret = path.read_text(encoding="utf-8").removesuffix("\n").removesuffix("\r")
        except OSError as exc:
            raise RelayConfigError(f"{where}: relay {relay.name!r}: password_file {path}: "
                                   f"{exc.strerror or exc}") from None
        if not secret:
            raise RelayConfigError(f"{where}: relay {relay.name!r}: password_file {path} is empty")
    else:
        return relay
    return relay.model_copy(update={"password": SecretStr(secret)})


def _with_ca_file(relay: RelaySettings, where: str, base: Path) -> RelaySettings:
    if relay.ca_file is None:
        return relay
    path = relay.ca_file if relay.ca_file.is_absolute() else base / relay.ca_file
    if not path.is_file():
        raise RelayConfigError(f"{where}: relay {relay.name!r}: ca_file {path} does not exist")
    return relay.model_copy(update={"ca_file": path})
