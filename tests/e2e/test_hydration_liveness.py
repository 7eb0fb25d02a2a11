"""Every audience size, zero included, after contacts.events was written by each of its
producers, reaches CampaignHydrated and CampaignCompleted within a bound (issue 12, class 1).

contacts.events is written by the CSV import (campaignctl), by the sender (a hard bounce
suppresses the contact) and, transactionally, by the API's outbox relay (a one-click
unsubscribe). A transaction's commit marker then takes a partition's last offset: it is never
delivered as a record, and a hydrator that waited for a record at the end offset stalled every
later campaign, whatever its audience. The campaigns here go to a small list, an empty list,
a list whose members all unsubscribed and a list whose member was suppressed, each through
the command topic, with every service a real process.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from schemas.base import normalise_email
from schemas.commands import CreateCampaign, SendCampaign
from schemas.contacts import ContactSuppressed, ContactUnsubscribed, contact_id_for
from schemas.envelope import Message, wrap
from schemas.events import CampaignCompleted, CampaignHydrated
from services.api.app import create_app
from services.api.auth import ApiKeys
from services.cli.contacts_import import import_contacts
from services.common.settings import Settings
from services.common.topics import COMMANDS, CONTACTS, EVENTS
from services.common.unsubscribe_tokens import sign
from services.smtp_sink import SinkConfig, SmtpSink
from tests.kafka_io import publish, read_topic
from tests.service_process import ServiceProcess

pytestmark = pytest.mark.e2e
SERVICES = ("command_handler", "hydrator", "sender", "completion")
SECRET = b"liveness-unsubscribe-secret"
# Every campaign of a batch is hydrated and completed within this (a few seconds when the
# hydrator is live; the old hydrator never got there).
CAMPAIGN_BOUND_S = 90.0


def cid(tenant: str, name: str) -> str:
    return contact_id_for(tenant, normalise_email(f"{name}@example.org"))


def write_csv(path: Path, rows: dict[str, list[str]]) -> Path:
    path.write_text("email,lists\n" + "".join(
        f"{name}@example.org,{';'.join(lists)}\n" for name, lists in rows.items()))
    return path


def send(settings: Settings, tenant: str, campaign: str, from_address: str, lists: list[str]) -> None:
    create = CreateCampaign(name=campaign, subject="Hi", from_address=from_address, body_text="b")
    publish(settings, COMMANDS, [
        (campaign.encode(), wrap(create, tenant_id=tenant, aggregate_id=campaign)),
        (campaign.encode(), wrap(SendCampaign(list_ids=lists), tenant_id=tenant, aggregate_id=campaign)),
    ])


def outcomes(settings: Settings, campaigns: list[str], procs: list[ServiceProcess],
             ) -> dict[str, tuple[CampaignHydrated, CampaignCompleted]]:
    """Each campaign's CampaignHydrated and CampaignCompleted, waiting at most CAMPAIGN_BOUND_S."""
    deadline = time.monotonic() + CAMPAIGN_BOUND_S
    found: dict[str, dict[type, object]] = {c: {} for c in campaigns}

    def wanted(m: Message) -> bool:
        return m.envelope.aggregate_id in found and isinstance(m.payload, CampaignHydrated | CampaignCompleted)

    while True:
        for m in read_topic(settings, EVENTS, timeout=5, idle=1.0):
            if wanted(m):
                found[m.envelope.aggregate_id].setdefault(type(m.payload), m.payload)
        if all(len(facts) == 2 for facts in found.values()):
            return {c: (facts[CampaignHydrated], facts[CampaignCompleted])  # type: ignore[misc]
                    for c, facts in found.items()}
        for p in procs:
            assert p.proc is not None and p.proc.poll() is None, f"{p.service} died:\n{p.log_tail()}"
        if time.monotonic() > deadline:
            hydrator = next(p for p in procs if p.service == "hydrator")
            missing = {c: sorted(t.__name__ for t in (CampaignHydrated, CampaignCompleted) if t not in f)
                       for c, f in found.items() if len(f) < 2}
            raise AssertionError(f"not hydrated and completed within {CAMPAIGN_BOUND_S:g} s: {missing}\n"
                                 f"{hydrator.log_tail(20)}")
        time.sleep(1.0)


def test_every_audience_size_completes_after_every_producer_of_contacts(settings, tmp_path):
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    # Producer 1, the CSV import: a small list, a list to unsubscribe, one address to bounce.
    contacts = {"ann": ["small"], "bob": ["small"], "cat": ["small"],
                "dan": ["gone"], "eve": ["gone"], "fay": ["bounce"]}
    report = import_contacts(write_csv(tmp_path / "people.csv", contacts), tenant_id=tenant,
                             list_id=None, settings=settings)
    assert report.imported == len(contacts)

    with SmtpSink(SinkConfig(port=0)) as sink, SmtpSink(SinkConfig(port=0, permfail_rate=1.0)) as bouncer:
        relays = {"relays": [
            {"name": "bulk", "host": "127.0.0.1", "port": sink.port},
            {"name": "bouncing", "host": "127.0.0.1", "port": bouncer.port, "domains": ["bounce.example"]},
        ], "default": "bulk"}
        run = settings.replace(smtp_port=sink.port)
        procs = [ServiceProcess(name, run, SENDER_RELAYS=json.dumps(relays)).start() for name in SERVICES]
        try:
            # Producer 2, the sender: fay's mail is answered 550 5.1.1, so the sender
            # publishes ContactSuppressed(hard_bounce) to contacts.events.
            bounced = f"cmp-{uuid.uuid4().hex[:10]}"
            send(settings, tenant, bounced, "news@bounce.example", ["bounce"])
            first = outcomes(settings, [bounced], procs)
            assert first[bounced][1] == CampaignCompleted(total=1, sent=0, failed=1)
            suppressed = read_topic(settings, CONTACTS, until=1, timeout=30,
                                    counting=lambda m: isinstance(m.payload, ContactSuppressed))
            assert [m.payload.contact_id for m in suppressed if isinstance(m.payload, ContactSuppressed)] \
                == [cid(tenant, "fay")]

            # Producer 3, the API's outbox relay (Kafka transactions): two one-click unsubscribes.
            app = create_app(settings, ApiKeys([(tenant, uuid.uuid4().hex)]), unsubscribe_secret=SECRET)
            with TestClient(app) as api:
                for name in ("dan", "eve"):
                    token = sign(SECRET, tenant, cid(tenant, name), bounced)
                    answer = api.post("/unsubscribe", params={"token": token},
                                      data={"List-Unsubscribe": "One-Click"})
                    assert answer.status_code == 200, answer.text
                unsubscribed = read_topic(settings, CONTACTS, until=2, timeout=30,
                                          counting=lambda m: isinstance(m.payload, ContactUnsubscribed))
            assert sorted(m.payload.contact_id for m in unsubscribed
                          if isinstance(m.payload, ContactUnsubscribed)) \
                == sorted([cid(tenant, "dan"), cid(tenant, "eve")])

            # The campaigns after them: a small list, an empty list, a list all unsubscribed,
            # the suppressed member's list.
            names = {"small": ["small"], "empty": ["nobody"], "gone": ["gone"], "bounce": ["bounce"]}
            campaigns = {kind: f"cmp-{kind}-{uuid.uuid4().hex[:8]}" for kind in names}
            for kind, lists in names.items():
                send(settings, tenant, campaigns[kind], "news@example.com", lists)
            done = outcomes(settings, list(campaigns.values()), procs)
            mailed = sorted(m["rcpt_tos"][0] for m in sink.messages)
        finally:
            codes = {p.service: p.stop() for p in procs}

    assert done[campaigns["small"]] == (CampaignHydrated(total=3),
                                        CampaignCompleted(total=3, sent=3, failed=0))
    assert done[campaigns["empty"]] == (CampaignHydrated(total=0), CampaignCompleted(total=0, sent=0, failed=0))
    assert done[campaigns["gone"]] == (CampaignHydrated(total=0, excluded={"unsubscribed": 2}),
                                       CampaignCompleted(total=0, sent=0, failed=0))
    assert done[campaigns["bounce"]] == (CampaignHydrated(total=0, excluded={"suppressed:hard_bounce": 1}),
                                         CampaignCompleted(total=0, sent=0, failed=0))
    assert mailed == [f"{n}@example.org" for n in ("ann", "bob", "cat")]
    assert codes == dict.fromkeys(SERVICES, 0)
