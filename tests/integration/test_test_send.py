"""Test sends end to end on the real broker, database and SMTP sink: the CLI publishes
SendTestEmail, the command handler decides, the sender's test-send worker mails."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from typer.testing import CliRunner

from schemas import events
from schemas.commands import CreateCampaign, SampleContact, SendTestEmail
from schemas.envelope import wrap
from services.cli.main import app
from services.command_handler.handler import CommandHandler
from services.common.topics import COMMANDS, DELIVERIES, EVENTS, RECIPIENTS
from services.sender import proof_mail
from services.sender.smtp_pool import SmtpPool
from services.smtp_sink import SinkConfig, SmtpSink, header
from tests.integration.sender_kit import wait_until
from tests.kafka_io import publish, read_topic
from tests.service_process import REPO_ROOT, ServiceProcess, service_env

pytestmark = pytest.mark.integration

TENANT = "acme"
CREATE = CreateCampaign(name="Spring sale", subject='Hello {{ first_name | "friend" }} from {{ attr.city }}',
                        from_address="news@example.com", body_text="Hi {{ first_name }}, spring is here.")


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink(SinkConfig(port=0)) as running:
        yield running


@pytest.fixture
def services(settings, sink) -> Iterator[proof_mail.TestSendWorker]:
    """The command handler and the test-send worker (mailing into `sink`), each on a thread."""
    stop = threading.Event()
    errors: list[BaseException] = []
    handler = CommandHandler(settings)
    worker = proof_mail.TestSendWorker(settings, lambda size: SmtpPool("127.0.0.1", sink.port, size))

    def run(target) -> None:
        try:
            target(stop)
        except BaseException as exc:  # surfaced in the test, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s.run,), daemon=True) for s in (handler, worker)]
    for thread in threads:
        thread.start()
    try:
        yield worker
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert not any(t.is_alive() for t in threads), "a service did not stop"
    assert not errors, errors


def create_draft(settings) -> str:
    campaign_id = f"cmp-{uuid.uuid4().hex[:12]}"
    publish(settings, COMMANDS, [(campaign_id.encode(), wrap(CREATE, tenant_id=TENANT,
                                                             aggregate_id=campaign_id))])
    return campaign_id


def cli(settings, *args: str):
    return CliRunner().invoke(app, list(args), env=service_env(settings))


def test_a_draft_is_test_sent_to_exactly_the_given_addresses_and_its_audience_is_untouched(
        settings, sink, services):
    campaign_id = create_draft(settings)
    result = cli(settings, "campaign", "test-send", campaign_id, "--tenant", TENANT,
                 "--to", "Ann@Example.org", "--to", "bob@example.net", "--first-name", "Ann",
                 "--attr", "city=Oslo", "--timeout", "60")
    assert result.exit_code == 0, result.output
    assert "Ann@example.org: sent 250" in result.stdout and "bob@example.net: sent 250" in result.stdout

    assert sink.wait_for_messages(2, timeout=5)
    records = sink.messages
    assert sorted(r["rcpt_tos"][0] for r in records) == ["Ann@example.org", "bob@example.net"]
    assert {r["subject"] for r in records} == {"[TEST] Hello Ann from Oslo"}
    assert all(r["message_id"].startswith("<test+") for r in records)
    assert {header(r, "X-Campaign-ID") for r in records} == {campaign_id}

    # The audience side saw nothing: no recipient, no delivery.
    assert read_topic(settings, RECIPIENTS, timeout=3, idle=1) == []
    assert read_topic(settings, DELIVERIES, timeout=3, idle=1) == []
    outcomes = [e for e in read_topic(settings, EVENTS, until=4)
                if isinstance(e.payload, events.TestEmailSent)]
    assert sorted(e.payload.email for e in outcomes) == ["Ann@example.org", "bob@example.net"]
    assert {e.envelope.aggregate_id for e in outcomes} == {campaign_id}
    assert services.mailed == 2

    # The read model, projected from these very topics, shows the campaign without recipients.
    from projections.projector import projector_for

    with projector_for(settings) as projector:
        projector.drain(timeout=60)
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        row = conn.execute("SELECT status, total, queued, sent, failed FROM campaigns"
                           " WHERE campaign_id = %s", (campaign_id,)).fetchone()
        recipients = conn.execute("SELECT count(*) FROM campaign_recipients WHERE campaign_id = %s",
                                  (campaign_id,)).fetchone()
    assert row == ("draft", None, 0, 0, 0)  # never hydrated: no total; nothing queued or sent
    assert recipients == (0,)


def test_a_request_read_again_republishes_outcomes_and_mails_nobody_twice(settings, sink, services):
    campaign_id = create_draft(settings)
    test_id = uuid.uuid4()
    # A sender that died between claim and settle for this address: it is not mailed again.
    unsettled = "carol@example.org"
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO send_ledger (campaign_id, contact_id, tenant_id, message_id, claims)"
                     " VALUES (%s, %s, %s, 'x', 1)", (proof_mail.ledger_campaign(test_id), unsettled, TENANT))
    command = SendTestEmail(addresses=["dan@example.org", unsettled], test_id=test_id,
                            sample=SampleContact(first_name="Dan"))
    publish(settings, COMMANDS, [(campaign_id.encode(), wrap(command, tenant_id=TENANT,
                                                             aggregate_id=campaign_id))])
    first = read_topic(settings, EVENTS, until=4)  # created, requested, two outcomes
    [request] = [e for e in first if isinstance(e.payload, events.TestEmailRequested)]
    # The same request record once more, as after a crash before the offset commit.
    publish(settings, EVENTS, [(campaign_id.encode(), request.envelope)])
    wait_until(lambda: len(_outcomes(settings, test_id)) >= 4, 60, "outcomes not re-published")

    assert [r["rcpt_tos"] for r in sink.messages] == [["dan@example.org"]]
    outcomes = _outcomes(settings, test_id)
    sent = [o for o in outcomes if isinstance(o, events.TestEmailSent)]
    failed = [o for o in outcomes if isinstance(o, events.TestEmailFailed)]
    assert [o.email for o in sent] == ["dan@example.org"] * 2
    assert sent[0] == sent[1], "a re-published outcome equals the first"
    assert [o.email for o in failed] == [unsettled] * 2
    assert all(o.ambiguous and "not mailed again" in o.reason for o in failed)


def _outcomes(settings, test_id: uuid.UUID) -> list:
    return [e.payload for e in read_topic(settings, EVENTS, timeout=5, idle=1)
            if isinstance(e.payload, events.TestEmailSent | events.TestEmailFailed)
            and e.payload.test_id == test_id]


def test_an_unknown_campaign_is_rejected_with_the_reason(settings, sink, services):
    result = cli(settings, "campaign", "test-send", "cmp-never-created", "--tenant", TENANT,
                 "--to", "a@example.org", "--timeout", "60")
    assert result.exit_code == 1
    assert "test send rejected: unknown campaign 'cmp-never-created' for tenant 'acme'" in result.stderr
    assert sink.messages == []


def test_an_invalid_address_is_a_clear_error_and_nothing_is_published(settings):
    result = cli(settings, "campaign", "test-send", "cmp-1", "--tenant", TENANT,
                 "--to", "ok@example.org", "--to", "not an address")
    assert result.exit_code == 2
    assert "addresses.1: not a valid e-mail address: 'not an address'" in result.stderr
    too_many = [arg for i in range(26) for arg in ("--to", f"u{i}@example.org")]
    result = cli(settings, "campaign", "test-send", "cmp-1", "--tenant", TENANT, *too_many)
    assert result.exit_code == 2 and "at most 25 items" in result.stderr
    assert read_topic(settings, COMMANDS, timeout=3, idle=1) == []


# --- the sender process: relays from the environment, test sends on their thread ------------------


def test_the_sender_process_mails_test_sends_through_its_configured_relays(settings, sink):
    with SmtpSink(SinkConfig(port=0)) as other:
        relays = {"relays": [
            {"name": "corporate", "host": "127.0.0.1", "port": sink.port, "domains": ["example.com"]},
            {"name": "bulk", "host": "127.0.0.1", "port": other.port},
        ], "default": "bulk"}
        handler_stop = threading.Event()
        handler = CommandHandler(settings)
        thread = threading.Thread(target=handler.run, args=(handler_stop,), daemon=True)
        thread.start()
        process = ServiceProcess("sender", settings, SENDER_RELAYS=json.dumps(relays),
                                 SENDER_CONCURRENCY="2")
        try:
            with process:
                campaign_id = create_draft(settings)  # From news@example.com: relay "corporate"
                result = cli(settings, "campaign", "test-send", campaign_id, "--tenant", TENANT,
                             "--to", "reviewer@example.org", "--timeout", "90")
                assert result.exit_code == 0, result.output + process.log_tail()
            assert process.proc is not None and process.proc.returncode == 0, process.log_tail()
        finally:
            handler_stop.set()
            thread.join(30)
        assert [r["rcpt_tos"] for r in sink.messages] == [["reviewer@example.org"]]
        assert other.messages == []
        log = process.log_path.read_text()
        assert '"relays configured"' in log and '"test sends started"' in log


def test_the_sender_process_refuses_a_bad_relay_configuration_at_start(settings):
    bad = json.dumps({"relays": [{"name": "a", "host": "h", "security": "ssl"}]})
    proc = subprocess.run([sys.executable, "-m", "services.sender"], capture_output=True, text=True,
                          env=service_env(settings, SENDER_RELAYS=bad), timeout=60, cwd=REPO_ROOT)
    assert proc.returncode == 2
    output = proc.stdout + proc.stderr
    assert "relay configuration refused" in output
    assert "relays.0.security: Input should be 'none', 'starttls' or 'tls'" in output
