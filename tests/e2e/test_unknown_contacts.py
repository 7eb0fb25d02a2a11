"""Hand-picked contact ids that name no contact of the sending tenant are reported by id
(issue 12, class 7), and the answer is the same whether another tenant has contacts with those
ids or nobody has: the read API's campaign JSON and `campaignctl campaign show` list exactly
those ids as unknown. A picked contact that was deleted is an exclusion (`deleted`), not an
unknown id; an id that is not even well-formed is refused before anything is published.

Real processes (command handler, hydrator, completion tracker, projector) on the real broker
and PostgreSQL; sends through `campaignctl campaign send`, contacts through the CSV import.
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from schemas.base import normalise_email
from schemas.contacts import ContactDeleted, contact_id_for, contact_key
from schemas.envelope import wrap
from services.api.app import create_app
from services.api.auth import ApiKeys
from services.cli.contacts_import import import_contacts
from services.cli.main import app as cli_app
from services.common.settings import Settings
from services.common.topics import CONTACTS
from tests.kafka_io import publish
from tests.service_process import ServiceProcess, service_env

pytestmark = pytest.mark.e2e
SERVICES = ("command_handler", "hydrator", "completion", "projector")
# A campaign whose picks are all unknown or deleted completes on hydration: seconds.
COMPLETION_BOUND_S = 90.0


def cli(settings: Settings, *args: str):
    return CliRunner().invoke(cli_app, list(args), env=service_env(settings))


def import_people(settings: Settings, tenant: str, names: list[str], path: Path) -> list[str]:
    path.write_text("email\n" + "".join(f"{n}@example.org\n" for n in names))
    assert import_contacts(path, tenant_id=tenant, list_id=None, settings=settings).imported == len(names)
    return [contact_id_for(tenant, normalise_email(f"{n}@example.org")) for n in names]


def send_picked(settings: Settings, tenant: str, contact_ids: list[str]) -> str:
    created = cli(settings, "campaign", "create", "--tenant", tenant, "--name", "picked",
                  "--subject", "Hi", "--from", "news@example.com", "--text", "b")
    assert created.exit_code == 0, created.output
    campaign = created.stdout.strip().splitlines()[-1]
    args = [a for cid in contact_ids for a in ("--contact", cid)]
    sent = cli(settings, "campaign", "send", campaign, "--tenant", tenant, "--no-watch", *args)
    assert sent.exit_code == 0, sent.output
    return campaign


def completed(api: TestClient, key: str, campaign: str, procs: list[ServiceProcess]) -> dict:
    deadline = time.monotonic() + COMPLETION_BOUND_S
    while True:
        answer = api.get(f"/campaigns/{campaign}", headers={"Authorization": f"Bearer {key}"})
        if answer.status_code == 200 and answer.json()["status"] == "completed":
            return answer.json()
        for p in procs:
            assert p.proc is not None and p.proc.poll() is None, f"{p.service} died:\n{p.log_tail()}"
        assert time.monotonic() < deadline, f"{campaign} not completed: {answer.text}"
        time.sleep(0.5)


def test_unknown_picks_are_listed_the_same_whether_another_tenant_has_them_or_nobody(settings, tmp_path):
    tenant_a, tenant_b = f"ta-{uuid.uuid4().hex[:8]}", f"tb-{uuid.uuid4().hex[:8]}"
    a_ids = import_people(settings, tenant_a, ["ann", "art", "amy", "abe"], tmp_path / "a.csv")
    (gone,) = import_people(settings, tenant_b, ["bea"], tmp_path / "b.csv")
    publish(settings, CONTACTS, [(contact_key(tenant_b, gone),
                                  wrap(ContactDeleted(contact_id=gone), tenant_id=tenant_b, aggregate_id=gone))])
    random_ids = [str(uuid.uuid4()) for _ in a_ids]  # shaped like real contact ids

    bad = cli(settings, "campaign", "send", "cmp-x", "--tenant", tenant_b, "--no-watch",
              "--contact", "not an id!")
    assert bad.exit_code == 2 and "contact_ids" in bad.output, bad.output

    key = uuid.uuid4().hex
    procs = [ServiceProcess(name, settings).start() for name in SERVICES]
    try:
        # Tenant B picks tenant A's contacts (and its own deleted one), then ids nobody has.
        with_theirs = send_picked(settings, tenant_b, [*a_ids, gone, a_ids[0]])
        with_random = send_picked(settings, tenant_b, [*random_ids, gone])
        with TestClient(create_app(settings, ApiKeys([(tenant_b, key)]))) as api:
            theirs = completed(api, key, with_theirs, procs)
            random = completed(api, key, with_random, procs)
        shown = {c: cli(settings, "campaign", "show", c, "--tenant", tenant_b)
                 for c in (with_theirs, with_random)}
    finally:
        codes = {p.service: p.stop() for p in procs}

    assert theirs["unknown_contact_ids"] == sorted(a_ids)
    assert random["unknown_contact_ids"] == sorted(random_ids)
    assert theirs["unknown_contact_count"] == random["unknown_contact_count"] == len(a_ids)
    # Everything else the outcome says is the same in both cases.
    same = ("status", "total", "queued", "sent", "failed", "skipped", "excluded", "pending",
            "unknown_contact_count")
    assert {f: theirs[f] for f in same} == {f: random[f] for f in same} == {
        "status": "completed", "total": 0, "queued": 0, "sent": 0, "failed": 0, "skipped": 0,
        "excluded": 1, "pending": 0, "unknown_contact_count": len(a_ids)}

    for campaign, ids in ((with_theirs, a_ids), (with_random, random_ids)):
        assert shown[campaign].exit_code == 0, shown[campaign].output
        lines = shown[campaign].stdout.splitlines()
        count = next(x for x in lines if " unknown contacts " in x).split("│")[2].strip()
        assert count == str(len(ids))
        assert lines[-len(ids):] == [f"  {cid}" for cid in sorted(ids)]

    def masked(text: str, ids: list[str], campaign: str) -> str:
        for i, cid in enumerate(sorted(ids)):
            text = text.replace(cid, f"<id {i}>")
        return re.sub(r"\d{4}-\d\d-\d\dT[\d:]+[+-]\d\d:\d\d", "<time>", text.replace(campaign, "<campaign>"))

    assert masked(shown[with_theirs].stdout, a_ids, with_theirs) \
        == masked(shown[with_random].stdout, random_ids, with_random)
    assert codes == dict.fromkeys(SERVICES, 0)
