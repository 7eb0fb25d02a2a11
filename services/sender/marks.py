"""What the sender adds to a campaign's mail for engagement and bounces: tracked bodies (open
pixel, click redirects) and a VERP envelope sender.

Guarantees:
- A campaign that asks for neither opens nor clicks gets its rendered content back as it is
  (the same object: the untracked path costs one attribute test per mail); so does every
  mail while the sender has no tracking keys, logged once per campaign, never failing the
  mail: the mail matters more than its statistics.
- Tracked bodies are `track_bodies`' (services.engagement.rewrite): only body links change;
  the List-Unsubscribe header, the Message-ID and every other header are built as before.
  Links under PUBLIC_API_URL/unsubscribe stay as written.
- With VERP keys, the envelope sender is `verp_address(...)` of the mail's tenant, campaign
  and contact; ids that do not fit give `bounces@<domain>` instead. Without keys it is the
  template's From address, as before. The From header never changes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from datetime import datetime

import structlog

from schemas.events import RecipientQueued
from services.bounces.verp import LOCAL_PREFIX, VerpKeys, VerpTooLong, verp_address
from services.common.settings import SenderSettings
from services.engagement.rewrite import TrackingSite, track_bodies
from services.engagement.tokens import TrackingKeys
from services.sender.render import RenderedContent

log = structlog.get_logger("sender")

# Campaigns whose "tracking asked, no keys" line was logged: bounded, a line per campaign is
# what matters, not remembering every campaign ever sent.
_WARNED_LIMIT = 10_000


@dataclass(frozen=True)
class ReturnPaths:
    """VERP envelope senders under `domain`, signed with `keys`."""

    keys: VerpKeys
    domain: str

    def sender(self, tenant_id: str, campaign_id: str, contact_id: str) -> str:
        try:
            return verp_address(self.keys, self.domain, tenant_id, campaign_id, contact_id)
        except VerpTooLong:
            return f"{LOCAL_PREFIX}@{self.domain}"


@dataclass
class MailMarks:
    """The tracking site and return paths of one sender (either may be absent); thread-safe."""

    site: TrackingSite | None = None
    return_paths: ReturnPaths | None = None
    _warned: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_settings(cls, settings: SenderSettings) -> MailMarks:
        """ValueError (naming the variable) for keys that cannot sign."""
        site = None
        tracker_text = settings.tracker_keys.get_secret_value()
        if tracker_text.strip():
            try:
                keys = TrackingKeys.parse(tracker_text)
            except ValueError as exc:
                raise ValueError(f"TRACKER_KEYS: {exc}") from None
            # As TrackingSite.from_settings: the one-click unsubscribe page stays as written.
            site = TrackingSite(keys, settings.tracker_public_url,
                                (settings.public_api_url.rstrip("/") + "/unsubscribe",))
        verp_text = settings.bounce_verp_keys.get_secret_value()
        paths = None
        if verp_text.strip():
            if not settings.bounce_domain.strip():
                raise ValueError("BOUNCE_DOMAIN: needed with BOUNCE_VERP_KEYS")
            try:
                paths = ReturnPaths(VerpKeys.parse(verp_text), settings.bounce_domain.strip())
            except ValueError as exc:
                raise ValueError(f"BOUNCE_VERP_KEYS: {exc}") from None
        return cls(site, paths)

    def content(self, tenant_id: str, recipient: RecipientQueued, rendered: RenderedContent,
                now: datetime) -> RenderedContent:
        """`rendered` with the campaign's tracking, when it asks for any."""
        template = recipient.template
        if not (template.track_opens or template.track_clicks):
            return rendered
        site = self.site
        if site is None:
            self._warn_untracked(tenant_id, recipient.campaign_id)
            return rendered
        tracked = track_bodies(
            rendered.html, rendered.text, site=site, tenant_id=tenant_id,
            campaign_id=recipient.campaign_id, contact_id=recipient.contact_id,
            sent_at=int(now.timestamp()), opens=template.track_opens,
            clicks=template.track_clicks, text_links=True)
        return replace(rendered, html=tracked.html, text=tracked.text)

    def envelope_sender(self, tenant_id: str, recipient: RecipientQueued) -> str | None:
        """The VERP return path of this mail, None without VERP keys."""
        if self.return_paths is None:
            return None
        return self.return_paths.sender(tenant_id, recipient.campaign_id, recipient.contact_id)

    def _warn_untracked(self, tenant_id: str, campaign_id: str) -> None:
        with self._lock:
            if campaign_id in self._warned:
                return
            if len(self._warned) >= _WARNED_LIMIT:
                self._warned.clear()
            self._warned.add(campaign_id)
        log.warning("campaign asks for tracking but TRACKER_KEYS is empty: sent untracked",
                    tenant=tenant_id, campaign_id=campaign_id)
