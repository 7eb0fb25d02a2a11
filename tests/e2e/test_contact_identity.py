"""Contacts through the whole pipeline, driven by `campaignctl` (issue 12, classes 2-4):

- class 2: suppressions (blocklist, hard bounce) and unsubscribes survive later upsert
  imports; only `contacts unsuppress` / `contacts resubscribe` lift them, as events that the
  read model and the next campaign follow;
- class 3: one person is one contact whatever the case of the address (`ann+x@` is another),
  mailed once; contacts an earlier version made from a mixed-case address are found and
  reused or merged by the next import (the migration of existing ids), and a re-import then
  neither splits nor merges anything;
- class 4: an IDN domain is accepted and goes out in punycode; a UTF-8 local part goes out
  with SMTPUTF8 when the relay offers it and fails with a clear reason when it does not.

Real processes (command handler, hydrator, sender, projector, completion tracker) on the real
broker and PostgreSQL, the project's SMTP sink as the relay.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from projections.queries import campaign_progress
from schemas.contacts import (
    _CONTACT_NAMESPACE,
    ContactResubscribed,
    ContactSuppressed,
    ContactUnsubscribed,
    ContactUnsuppressed,
    ContactUpserted,
    contact_id_for,
    contact_key,
)
from schemas.envelope import wrap
from services.api.app import create_app
from services.api.auth import ApiKeys
from services.cli.main import app
from services.common.settings import Settings
from services.common.topics import CONTACTS
from services.sender.smtp_pool import SMTPUTF8_REFUSAL
from services.smtp_sink import SinkConfig, SmtpSink, header
from tests.kafka_io import publish, read_topic
from tests.service_process import ServiceProcess, service_env

pytestmark = pytest.mark.e2e
SERVICES = ("command_handler", "hydrator", "sender", "projector", "completion")


def cli(settings: Settings, *args: str) -> str:
    result = CliRunner().invoke(app, list(args), env=service_env(settings))
    assert result.exit_code == 0, result.output
    return result.stdout


def csv_file(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def wait_for(predicate, timeout, what, procs):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for p in procs:
            assert p.proc.poll() is None, f"{p.service} died:\n{p.log_tail()}"
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def pipeline(settings: Settings, sink: SmtpSink) -> Iterator[list[ServiceProcess]]:
    run = settings.replace(smtp_port=sink.port)
    procs = [ServiceProcess(name, run).start() for name in SERVICES]
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()


def send_and_wait(settings, conn, procs, tenant: str, *lists: str) -> str:
    campaign = cli(settings, "campaign", "create", "--tenant", tenant, "--name", "N", "--subject", "Hi",
                   "--from", "news@example.com", "--text", "Hello").strip()
    cli(settings, "campaign", "send", campaign, "--tenant", tenant, *[a for x in lists for a in ("--list", x)],
        "--no-watch")
    wait_for(lambda: (p := campaign_progress(conn, campaign)) and p.status == "completed", 180,
             f"{campaign} completed", procs)
    return campaign


def outcomes(conn, campaign: str) -> dict[str, str]:
    """Each recipient's address and how it ended (the exclusion reason, or its status)."""
    return dict(conn.execute(
        "SELECT email, coalesce(reason, status) FROM campaign_recipients WHERE campaign_id = %s",
        (campaign,)).fetchall())


def mailed(sink: SmtpSink, campaign: str) -> list[str]:
    return sorted(r for m in sink.messages if header(m, "X-Campaign-ID") == campaign for r in m["rcpt_tos"])


def profiles(conn, tenant: str) -> dict[str, str]:
    """The tenant's contacts in the read model that are not deleted: id -> address."""
    return dict(conn.execute(
        "SELECT contact_id, email FROM contact_profiles WHERE tenant_id = %s AND NOT deleted",
        (tenant,)).fetchall())


def flags(conn, tenant: str) -> dict[str, tuple[str | None, bool]]:
    """Every contact row of the tenant: id -> (suppressed_reason, globally_unsubscribed)."""
    return {cid: (reason, unsub) for cid, reason, unsub in conn.execute(
        "SELECT contact_id, suppressed_reason, globally_unsubscribed FROM contacts WHERE tenant_id = %s",
        (tenant,)).fetchall()}


def settled(read, timeout=60, procs=()):
    """`read()` once two reads 1 s apart agree (the projector has caught up)."""
    last = object()

    def same():
        nonlocal last
        now = read()
        if now == last:
            return True
        last = now
        return False

    wait_for(same, timeout, "the read model to settle", procs)
    return last


def old_contact_id(tenant: str, address: str) -> str:
    """The id an earlier version gave an address: tenant + address with only the domain
    lower-cased (kept here to write the contacts such a version left on the topic)."""
    return str(uuid.uuid5(_CONTACT_NAMESPACE, f"{tenant}\x00{address}"))


def publish_contact_facts(settings: Settings, tenant: str, payloads) -> None:
    publish(settings, CONTACTS, [
        (contact_key(tenant, p.contact_id), wrap(p, tenant_id=tenant, aggregate_id=p.contact_id))
        for p in payloads])


def test_flags_survive_upserts_and_only_explicit_commands_lift_them(settings, tmp_path):
    tenant = f"t{uuid.uuid4().hex[:8]}"
    ids = {name: contact_id_for(tenant, f"{name}@example.com") for name in ("blocked", "bounced", "gone", "fine")}
    with SmtpSink(SinkConfig(port=0)) as sink, pipeline(settings, sink) as procs, \
            psycopg.connect(settings.database_url, autocommit=True) as conn:
        cli(settings, "contacts", "import", csv_file(tmp_path / "block.csv", "email\nblocked@example.com\n"),
            "--tenant", tenant, "--mode", "blocklist")
        cli(settings, "contacts", "import",
            csv_file(tmp_path / "first.csv", "email\nbounced@example.com\ngone@example.com\n"), "--tenant", tenant)
        # What the sender writes on a hard bounce, and the API on a one-click unsubscribe.
        publish_contact_facts(settings, tenant, [
            ContactSuppressed(contact_id=ids["bounced"], reason="hard_bounce"),
            ContactUnsubscribed(contact_id=ids["gone"], reason="one-click"),
        ])
        wait_for(lambda: len(flags(conn, tenant)) == 3 and flags(conn, tenant)[ids["gone"]][1], 60,
                 "flags projected", procs)
        # An ordinary import of everybody, with their names and a list: it must lift nothing.
        cli(settings, "contacts", "import", csv_file(tmp_path / "news.csv", "email,first_name\n"
            "blocked@example.com,B\nbounced@example.com,O\ngone@example.com,G\nfine@example.com,F\n"),
            "--tenant", tenant, "--list", "news")
        wait_for(lambda: len(profiles(conn, tenant)) == 4, 60, "upserts projected", procs)
        time.sleep(2)
        first = send_and_wait(settings, conn, procs, tenant, "news")
        assert outcomes(conn, first) == {
            "blocked@example.com": "suppressed:manual_blocklist", "bounced@example.com": "suppressed:hard_bounce",
            "gone@example.com": "unsubscribed", "fine@example.com": "sent"}
        assert flags(conn, tenant) == {ids["blocked"]: ("manual_blocklist", False),
                                       ids["bounced"]: ("hard_bounce", False),
                                       ids["gone"]: (None, True), ids["fine"]: (None, False)}
        assert mailed(sink, first) == ["fine@example.com"]

        # The explicit lifts, by address in any case; each is a fact on contacts.events.
        assert ids["blocked"] in cli(settings, "contacts", "unsuppress", "Blocked@Example.com", "--tenant", tenant,
                                     "--reason", "asked by phone")
        assert ids["gone"] in cli(settings, "contacts", "resubscribe", ids["gone"], "--tenant", tenant)
        wait_for(lambda: flags(conn, tenant)[ids["blocked"]] == (None, False)
                 and flags(conn, tenant)[ids["gone"]] == (None, False), 60, "lifts projected", procs)
        second = send_and_wait(settings, conn, procs, tenant, "news")
        assert outcomes(conn, second) == {
            "blocked@example.com": "sent", "bounced@example.com": "suppressed:hard_bounce",
            "gone@example.com": "sent", "fine@example.com": "sent"}
        assert mailed(sink, second) == ["blocked@example.com", "fine@example.com", "gone@example.com"]
        lifts = [m.payload for m in read_topic(settings, CONTACTS, timeout=10, idle=2)
                 if isinstance(m.payload, ContactUnsuppressed | ContactResubscribed)]
        assert sorted(lifts, key=lambda p: type(p).__name__) == [
            ContactResubscribed(contact_id=ids["gone"]),
            ContactUnsuppressed(contact_id=ids["blocked"], detail="asked by phone")]


def test_one_person_is_one_contact_and_existing_ids_are_migrated(settings, tmp_path):
    tenant = f"t{uuid.uuid4().hex[:8]}"
    ann_old = old_contact_id(tenant, "Ann@example.com")
    bob_old, bob = old_contact_id(tenant, "Bob@example.com"), contact_id_for(tenant, "bob@example.com")
    dora_old, dora = old_contact_id(tenant, "Dora@example.com"), contact_id_for(tenant, "dora@example.com")
    # What an earlier version left: Ann only under her mixed-case id; Bob and Dora twice (once
    # per case), Dora's mixed-case contact with a complaint.
    existing = [
        ContactUpserted(contact_id=ann_old, email="Ann@example.com", first_name="Ann", lists=["a"]),
        ContactUpserted(contact_id=bob_old, email="Bob@example.com", lists=["a"]),
        ContactUpserted(contact_id=bob, email="bob@example.com", lists=["a"]),
        ContactUpserted(contact_id=dora_old, email="Dora@example.com", lists=["a"]),
        ContactSuppressed(contact_id=dora_old, reason="complaint"),
        ContactUpserted(contact_id=dora, email="dora@example.com", lists=["a"]),
    ]
    rows = ("email,first_name\n Ann@Example.COM,Ann\nann@example.com,Ann\nann+x@example.com,X\n"
            "BOB@example.com,Bob\ndora@example.com,Dora\nnew@example.com,N\n New@Example.com ,N\n")
    with SmtpSink(SinkConfig(port=0)) as sink, pipeline(settings, sink) as procs, \
            psycopg.connect(settings.database_url, autocommit=True) as conn:
        publish_contact_facts(settings, tenant, existing)
        wait_for(lambda: len(profiles(conn, tenant)) == 5, 60, "existing contacts projected", procs)

        out = cli(settings, "contacts", "import", csv_file(tmp_path / "b.csv", rows), "--tenant", tenant,
                  "--list", "b")
        assert "imported 7 contacts" in out and "merged 2 contacts" in out
        new = contact_id_for(tenant, "new@example.com")
        ann_x = contact_id_for(tenant, "ann+x@example.com")
        expected = {ann_old: "ann@example.com", ann_x: "ann+x@example.com", bob: "BOB@example.com",
                    dora: "dora@example.com", new: "New@example.com"}
        wait_for(lambda: profiles(conn, tenant) == expected, 60, "import projected", procs)
        assert flags(conn, tenant)[dora] == ("complaint", False)  # carried over from her twin

        campaign = send_and_wait(settings, conn, procs, tenant, "a", "b")
        # Each person once, to the address as last given; Dora's complaint still holds.
        assert mailed(sink, campaign) == sorted(["ann@example.com", "ann+x@example.com", "BOB@example.com",
                                                 "New@example.com"])
        assert outcomes(conn, campaign)["dora@example.com"] == "suppressed:complaint"

        # Re-importing the same data changes nobody: no split, no merge, the same contacts.
        out = cli(settings, "contacts", "import", csv_file(tmp_path / "b.csv", rows), "--tenant", tenant,
                  "--list", "b")
        assert "imported 7 contacts" in out and "merged" not in out
        time.sleep(3)
        assert settled(lambda: profiles(conn, tenant), procs=procs) == expected


def test_internationalised_addresses_go_out_or_fail_with_the_reason(settings, tmp_path):
    tenant = f"t{uuid.uuid4().hex[:8]}"
    out = cli(settings, "contacts", "import",
              csv_file(tmp_path / "idn.csv", "email\nann@bücher.example\njörg@example.de\nbad@☃.example\n"),
              "--tenant", tenant, "--list", "intl")
    assert "imported 2 contacts" in out
    assert "line 4: not a valid e-mail address: 'bad@☃.example'" in out and "U+2603" in out
    key = f"key-{uuid.uuid4().hex}"
    with psycopg.connect(settings.database_url, autocommit=True) as conn, \
            TestClient(create_app(settings, ApiKeys([(tenant, key)]))) as api:
        with SmtpSink(SinkConfig(port=0, smtputf8=False)) as plain, pipeline(settings, plain) as procs:
            wait_for(lambda: len(profiles(conn, tenant)) == 2, 60, "contacts projected", procs)
            time.sleep(2)
            first = send_and_wait(settings, conn, procs, tenant, "intl")
            answer = api.get(f"/campaigns/{first}/recipients", headers={"Authorization": f"Bearer {key}"})
            assert answer.status_code == 200, answer.text
            got = {r["email"]: (r["status"], r["last_error"]) for r in answer.json()["recipients"]}
            assert mailed(plain, first) == ["ann@xn--bcher-kva.example"]  # punycode on the wire
        assert got == {"ann@xn--bcher-kva.example": ("sent", None),
                       "jörg@example.de": ("failed", SMTPUTF8_REFUSAL)}
        with SmtpSink(SinkConfig(port=0)) as utf8, pipeline(settings, utf8) as procs:
            second = send_and_wait(settings, conn, procs, tenant, "intl")
            assert mailed(utf8, second) == sorted(["ann@xn--bcher-kva.example", "jörg@example.de"])
        assert outcomes(conn, second) == {"ann@xn--bcher-kva.example": "sent", "jörg@example.de": "sent"}
