"""Per-tenant API keys: `Authorization: Bearer <key>` names exactly one tenant.

Keys come from `API_KEYS` (`acme:key1,globex:key2`) and/or the file named by `API_KEYS_FILE`
(one `tenant:key` per line; blank lines and `#` comments ignored). Only SHA-256 digests of the
keys are kept in memory, and a lookup goes by digest, so the time a lookup takes says nothing
about how much of a guessed key was right.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from services.common.settings import ApiSettings


class ApiKeyError(ValueError):
    """The key configuration is malformed (empty tenant or key, a key given to two tenants)."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """Maps an API key to the tenant it belongs to."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._tenants: dict[bytes, str] = {}
        for tenant, key in pairs:
            tenant, key = tenant.strip(), key.strip()
            if not tenant or not key:
                raise ApiKeyError("an API key entry needs a tenant and a key: 'tenant:key'")
            digest = _digest(key)
            owner = self._tenants.setdefault(digest, tenant)
            if owner != tenant:
                raise ApiKeyError(f"one API key is configured for tenants {owner!r} and {tenant!r}")

    @classmethod
    def from_mapping(cls, keys_by_tenant: Mapping[str, Iterable[str]]) -> ApiKeys:
        return cls((tenant, key) for tenant, keys in keys_by_tenant.items() for key in keys)

    def tenant_for(self, key: str) -> str | None:
        """The tenant that owns `key`, or None for an unknown key."""
        return self._tenants.get(_digest(key))

    def __len__(self) -> int:
        return len(self._tenants)


def parse_api_keys(spec: str, separator: str = ",") -> list[tuple[str, str]]:
    """`acme:key1,globex:key2` -> [("acme", "key1"), ("globex", "key2")]."""
    pairs = []
    for entry in spec.split(separator):
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        tenant, sep, key = entry.partition(":")
        if not sep:
            raise ApiKeyError("an API key entry needs a tenant and a key: 'tenant:key'")
        pairs.append((tenant, key))
    return pairs


def load_api_keys(settings: ApiSettings) -> ApiKeys:
    """Keys from API_KEYS and API_KEYS_FILE (both may be given; neither means no key works)."""
    pairs = parse_api_keys(settings.api_keys.get_secret_value())
    if settings.api_keys_file:
        try:
            text = settings.api_keys_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ApiKeyError(f"API_KEYS_FILE {settings.api_keys_file}: {exc.strerror}") from None
        pairs += parse_api_keys(text, separator="\n")
    return ApiKeys(pairs)
