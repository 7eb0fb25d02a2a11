"""The campaign directory of the bounce receiver: which (tenant, campaign) a VERP "r" token's
digest names, and which tenant a campaign belongs to, read from the campaigns read model.

Guarantees: an answer reflects the read model as of the last load, reloaded on a miss at
most once per `RELOAD_INTERVAL_SECONDS` (a flood of forged digests cannot turn into a flood
of queries); a database that cannot be reached within the bounds raises
DirectoryUnavailable, so the receiver answers 451 and the bounce comes again later.

The login reads every tenant's campaigns, so row-level security must let it (a superuser in
development, a member of campaign_writer in production; see migration 0003).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

import psycopg

from services.bounces.verp import CampaignRefs, DirectoryUnavailable

# Connecting gives up after this (whole seconds): guards against a database host that does
# not answer holding an SMTP session past the MTA's patience.
CONNECT_TIMEOUT_SECONDS = 2
# The load query is cancelled after this: guards against a locked or overloaded database.
STATEMENT_TIMEOUT_MS = 5_000
# A miss reloads at most this often: a campaign created a moment ago is found within it.
RELOAD_INTERVAL_SECONDS = 2.0


class PostgresCampaigns:
    """`CampaignDirectory` and `TenantOfCampaign` over the projector's campaigns table."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._lock = threading.Lock()
        self._refs = CampaignRefs()
        self._tenants: dict[str, str] = {}
        self._loaded_at = float("-inf")

    def __call__(self, ref: bytes) -> Iterable[tuple[str, str]]:
        with self._lock:
            if ref not in self._refs:
                self._reload()
            return self._refs(ref)

    def tenant_of(self, campaign_id: str) -> str | None:
        with self._lock:
            if campaign_id not in self._tenants:
                self._reload()
            return self._tenants.get(campaign_id)

    def _reload(self) -> None:
        if time.monotonic() - self._loaded_at < RELOAD_INTERVAL_SECONDS:
            return
        try:
            with psycopg.connect(self._url, connect_timeout=CONNECT_TIMEOUT_SECONDS,
                                 options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}") as conn:
                rows = conn.execute("SELECT tenant_id, campaign_id FROM campaigns").fetchall()
        except psycopg.Error as exc:
            raise DirectoryUnavailable(f"campaigns read model: {exc}") from None
        self._refs = CampaignRefs((str(t), str(c)) for t, c in rows)
        self._tenants = {str(c): str(t) for t, c in rows}
        self._loaded_at = time.monotonic()
