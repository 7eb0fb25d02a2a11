"""Console sessions and CSRF tokens, signed with the server's secret (HMAC-SHA256).

Guarantees: a session cookie names exactly the tenant whose API key was pasted at sign-in and
cannot be forged or altered without the secret; it expires after SESSION_TTL_S. Every POST must
carry the CSRF token derived from the browser's `console_csrf` nonce cookie (double submit,
signed), so a form posted from another site, or without the token, is refused with a reason.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

SESSION_COOKIE = "console_session"
CSRF_COOKIE = "console_csrf"
SESSION_TTL_S = 8 * 3600


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Session:
    tenant: str
    expires_at: int


class Signer:
    """Signs and checks session cookies and CSRF tokens with one secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the console session secret must be at least 16 bytes")
        self._secret = secret

    def _mac(self, purpose: str, value: str) -> str:
        return _b64(hmac.new(self._secret, f"{purpose}:{value}".encode(), hashlib.sha256).digest())

    def session_cookie(self, tenant: str, now: float | None = None) -> str:
        body = _b64(json.dumps({"t": tenant, "e": int((now or time.time()) + SESSION_TTL_S)}).encode())
        return f"{body}.{self._mac('session', body)}"

    def session(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session a cookie carries, or None if absent, forged, altered or expired."""
        if not cookie or "." not in cookie:
            return None
        body, mac = cookie.rsplit(".", 1)
        if not hmac.compare_digest(mac, self._mac("session", body)):
            return None
        try:
            data = json.loads(_unb64(body))
            session = Session(tenant=str(data["t"]), expires_at=int(data["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        return session if session.expires_at > (now or time.time()) else None

    @staticmethod
    def new_nonce() -> str:
        return secrets.token_urlsafe(24)

    def csrf_token(self, nonce: str) -> str:
        return self._mac("csrf", nonce)

    def csrf_fault(self, nonce: str | None, token: str | None) -> str | None:
        """Why a POST's CSRF token is refused, or None when it is good."""
        if not nonce:
            return "CSRF cookie missing: reload the page and submit the form again"
        if not token:
            return "CSRF token missing from the form"
        if not hmac.compare_digest(token, self.csrf_token(nonce)):
            return "CSRF token does not match this browser's session"
        return None
