"""`campaignctl contacts merge-case-twins` and the lifting commands against the real broker:
what they write on contacts.events, folded as every reader folds it."""

from __future__ import annotations

import uuid
from collections import defaultdict

import pytest
from typer.testing import CliRunner

from schemas.contacts import (
    _CONTACT_NAMESPACE,
    ContactEvent,
    ContactState,
    ContactSuppressed,
    ContactUnsubscribed,
    ContactUpserted,
    contact_id_for,
    contact_key,
    fold_contact,
)
from schemas.envelope import wrap
from services.cli.main import app
from services.common.settings import Settings
from services.common.topics import CONTACTS
from tests.kafka_io import publish, read_topic
from tests.service_process import service_env

pytestmark = pytest.mark.integration


def cli(settings: Settings, *args: str):
    return CliRunner().invoke(app, list(args), env=service_env(settings))


def old_contact_id(tenant: str, address: str) -> str:
    """The id an earlier version gave an address (only its domain lower-cased)."""
    return str(uuid.uuid5(_CONTACT_NAMESPACE, f"{tenant}\x00{address}"))


def states(settings: Settings, tenant: str) -> tuple[int, dict[str, ContactState | None]]:
    records = [m for m in read_topic(settings, CONTACTS, timeout=10, idle=2) if m.envelope.tenant_id == tenant]
    events = defaultdict(list)
    for m in records:
        events[m.payload.contact_id].append(m.payload)
    return len(records), {cid: fold_contact(evs) for cid, evs in events.items()}


def test_merge_case_twins_merges_every_twin_once_and_leaves_lone_old_ids(settings):
    tenant = f"t{uuid.uuid4().hex[:8]}"
    ann_old = old_contact_id(tenant, "Ann@example.com")
    bob_old, bob = old_contact_id(tenant, "Bob@example.com"), contact_id_for(tenant, "bob@example.com")
    dora_old, dora_older = old_contact_id(tenant, "Dora@example.com"), old_contact_id(tenant, "DORA@example.com")
    seeded: list[ContactEvent] = [
        ContactUpserted(contact_id=ann_old, email="Ann@example.com", lists=["a"]),
        ContactUpserted(contact_id=bob, email="bob@example.com", lists=["b"]),
        ContactUpserted(contact_id=bob_old, email="Bob@example.com", lists=["a"]),
        ContactUnsubscribed(contact_id=bob_old, list_id="a"),
        ContactUpserted(contact_id=dora_older, email="DORA@example.com"),
        ContactUpserted(contact_id=dora_old, email="Dora@example.com", lists=["a"]),
        ContactSuppressed(contact_id=dora_old, reason="complaint"),
    ]
    publish(settings, CONTACTS, [(contact_key(tenant, p.contact_id), wrap(p, tenant_id=tenant,
                                                                            aggregate_id=p.contact_id))
                                 for p in seeded])
    before, _ = states(settings, tenant)

    dry = cli(settings, "contacts", "merge-case-twins", "--tenant", tenant)
    assert dry.exit_code == 0, dry.output
    assert "would merge 2 contacts into 2" in dry.stdout
    assert states(settings, tenant)[0] == before  # a dry run writes nothing

    done = cli(settings, "contacts", "merge-case-twins", "--tenant", tenant, "--apply")
    assert done.exit_code == 0, done.output
    assert "merged 2 contacts into 2" in done.stdout
    _, folded = states(settings, tenant)
    assert folded[ann_old] == ContactState(ann_old, "Ann@example.com", lists=frozenset({"a"}))  # alone: kept
    merged_bob, merged_dora = folded[bob], folded[dora_older]
    assert merged_bob is not None and merged_bob.lists == {"a", "b"} and merged_bob.unsubscribed_lists == {"a"}
    # Without the identity's own id, the oldest twin survives and keeps the complaint.
    assert merged_dora is not None and merged_dora.suppressed_reason == "complaint"
    assert merged_dora.lists == {"a"}
    for merged in (bob_old, dora_old):
        state = folded[merged]
        assert state is not None and state.deleted and not state.lists
    after, _ = states(settings, tenant)

    again = cli(settings, "contacts", "merge-case-twins", "--tenant", tenant, "--apply")
    assert again.exit_code == 0 and "merged 0 contacts into 0" in again.stdout
    assert states(settings, tenant)[0] == after


def test_lifting_commands_refuse_bad_input_with_the_reason(settings):
    bad = cli(settings, "contacts", "unsuppress", "ann@☃.example", "--tenant", "acme")
    assert bad.exit_code == 2 and "U+2603" in bad.stderr
    bad = cli(settings, "contacts", "resubscribe", "ann@example.com", "--tenant", "acme", "--list", "no spaces")
    assert bad.exit_code == 2 and "invalid input" in bad.stderr
