"""List-Unsubscribe headers (RFC 2369) with one-click unsubscribe (RFC 8058).

Each mail links to the read API's /unsubscribe with a token signed for its tenant, contact
and campaign (services/common/unsubscribe_tokens.py), so a recipient's mail client can
unsubscribe them with one POST and nobody can forge a link for someone else. Configured by
UNSUBSCRIBE_SECRET (the API verifies with the same secret) and PUBLIC_API_URL (where mail
clients reach the API); without a secret, mails carry no such headers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote

from services.common.settings import SenderSettings
from services.common.unsubscribe_tokens import sign

# What quote() leaves as it is: a token (URL-safe base64 and a dot) needs no escaping.
_URL_SAFE = re.compile(r"[A-Za-z0-9_.~-]*")


@dataclass(frozen=True)
class ListUnsubscribe:
    secret: bytes
    base_url: str

    @classmethod
    def from_settings(cls, settings: SenderSettings) -> ListUnsubscribe | None:
        secret = settings.unsubscribe_secret.get_secret_value()
        if not secret:
            return None
        return cls(secret.encode(), settings.public_api_url.rstrip("/"))

    def headers(self, tenant_id: str, contact_id: str, campaign_id: str) -> list[tuple[str, str]]:
        token = sign(self.secret, tenant_id, contact_id, campaign_id)
        url = (f"{self.base_url}/unsubscribe?token="
               f"{token if _URL_SAFE.fullmatch(token) else quote(token, safe='')}")
        return [("List-Unsubscribe", f"<{url}>"), ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")]
