"""The migration of a tenant's contact ids to the identity rule, at once rather than import
by import: `merge_case_twins(settings, tenant_id, apply=...)`.

Contacts made before ids followed the identity (`schemas.base.email_identity`) keep their
id, and an import lands each row on the contact of its identity (`identity_merge`), merging
twins that differ only in case when the file names them. Twins that no file names again would
both still be mailed; this command merges every one of them now, by the same rules
(`identity_merge.resolve_identity`: the identity's own id survives, else the oldest; lists
and every flag carried over; the others deleted). Idempotent: once merged, nothing is left to
write, and running it again writes nothing. A contact alone under an old id is left as it is
(its id still names the person; imports write to it).

`apply=False` only reports what it would do.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import TypeAdapter

from schemas.base import Record, TenantId
from services.cli.contact_flags import publish_contact_facts
from services.cli.existing_contacts import scan_contacts
from services.cli.identity_merge import resolve_identities
from services.common.settings import Settings


@dataclass(frozen=True, slots=True)
class MergeReport:
    """`merged`: contacts deleted into a survivor; `facts`: events written (or that would be);
    `survivors`: the ids that took them."""

    merged: int
    facts: int
    survivors: tuple[str, ...]


def merge_case_twins(settings: Settings, tenant_id: str, *, apply: bool) -> MergeReport:
    """Merge every group of contacts of one identity in the tenant (module docstring)."""
    TypeAdapter(TenantId).validate_python(tenant_id)
    resolutions = resolve_identities(scan_contacts(settings, tenant_id).identities)
    facts: list[tuple[str, Record]] = [fact for r in resolutions.values() for fact in r.merges]
    survivors = tuple(sorted(r.target for r in resolutions.values() if r.merges))
    if apply and facts:
        publish_contact_facts(settings, tenant_id, facts, f"merging {len(survivors)} contacts' twins")
    return MergeReport(sum(r.merged for r in resolutions.values()), len(facts), survivors)
