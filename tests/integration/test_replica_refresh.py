"""The hydrator's background replica refresh (Replicas.catch_up_all) against a real broker:
one offsets request for all partitions, and only replicas behind are read."""

from __future__ import annotations

import pytest

from schemas.base import normalise_email
from schemas.contacts import ContactUpserted, contact_id_for, contact_key
from schemas.envelope import Envelope, wrap
from services.common.topics import CONTACTS, topic_name
from services.hydrator.replica import Replicas
from tests.integration.test_hydrator import snapshot
from tests.kafka_io import publish

pytestmark = pytest.mark.integration


def _contacts(tenant: str, count: int, start: int = 0) -> list[tuple[bytes, Envelope]]:
    records = []
    for i in range(start, start + count):
        email = normalise_email(f"person{i}@example.com")
        cid = contact_id_for(tenant, email)
        payload = ContactUpserted(contact_id=cid, email=email, first_name="F", lists=["a"])
        records.append((contact_key(tenant, cid), wrap(payload, tenant_id=tenant, aggregate_id=cid)))
    return records


def test_refresh_reaches_every_partitions_end_and_then_reads_nothing(settings, tmp_path):
    tenant = "acme"
    publish(settings, CONTACTS, _contacts(tenant, 200))
    ends = snapshot(settings)
    partitions = set(range(CONTACTS.partitions))
    replicas = Replicas(settings, topic_name(CONTACTS, settings), tmp_path)
    try:
        assert replicas.catch_up_all(partitions) == ends
        held = sum(len(list(replicas.get(p).tenant_contacts(tenant))) for p in partitions)
        assert held == 200
        # Nothing new: the same positions.
        assert replicas.catch_up_all(partitions) == ends
        # New contacts on some partitions: those replicas catch up, the rest stay put.
        publish(settings, CONTACTS, _contacts(tenant, 30, start=200))
        later = snapshot(settings)
        assert later != ends
        assert replicas.catch_up_all(partitions) == later
        held = sum(len(list(replicas.get(p).tenant_contacts(tenant))) for p in partitions)
        assert held == 230
    finally:
        replicas.close()
