"""Name-based ids (UUIDv5) for many names under one namespace, without a UUID object each.

`Uuid5Names(namespace, prefix)(name)` is `str(uuid.uuid5(namespace, prefix + name))`: the
SHA-1 of the namespace and prefix is computed once and copied per name (uuid5 is SHA-1 by
definition; these ids name things, they protect nothing). The contact import names contacts
this way and the hydrator its recipient events, a few hundred thousand a second each.
"""

from __future__ import annotations

import hashlib
import uuid

# The RFC 4122 variant nibble (10xx) for any hex digit, keeping its two low bits.
VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


class Uuid5Names:
    def __init__(self, namespace: uuid.UUID, prefix: str = "") -> None:
        self._base = hashlib.sha1(namespace.bytes + prefix.encode(), usedforsecurity=False)

    def __call__(self, name: str) -> str:
        digest = self._base.copy()
        digest.update(name.encode())
        h = digest.hexdigest()
        return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"
