"""The SMTP sink in-process on a free loopback port, driven by smtplib."""

from __future__ import annotations

import json
import smtplib
import ssl
import threading
import time
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import pytest

from services.smtp_sink import (
    SinkConfig,
    SmtpSink,
    count_records,
    header,
    read_records,
)
from services.smtp_sink.certificates import Certificate, self_signed
from tests.sink_settings import sink_config_from

pytestmark = pytest.mark.integration

# Client socket timeout: guards against a sink bug hanging the test run instead of failing it.
CLIENT_TIMEOUT_S = 10.0


def _message(n: int = 0, subject: str | None = None) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "campaigns@example.com"
    msg["To"] = f"user{n}@example.org"
    msg["Subject"] = subject or f"Hello {n}"
    msg["Message-ID"] = make_msgid(domain="campaigns.example.com")
    msg["X-Campaign-Id"] = "cmp-1"
    msg.set_content(f"Hi user {n}, this is message {n}.\n")
    return msg


def _client(sink: SmtpSink) -> smtplib.SMTP:
    return smtplib.SMTP(sink.host, sink.port, timeout=CLIENT_TIMEOUT_S)


def _send(sink: SmtpSink, msg: EmailMessage) -> None:
    with _client(sink) as client:
        client.send_message(msg)


def test_port_zero_picks_a_free_port() -> None:
    with SmtpSink(SinkConfig(port=0)) as first, SmtpSink(SinkConfig(port=0)) as second:
        assert first.port != 0
        assert second.port not in (0, first.port)


def test_plain_message_is_accepted_and_recorded(tmp_path: Path) -> None:
    path = tmp_path / "sink" / "messages.jsonl"
    msg = _message(subject="Grüße aus Köln")
    msg.add_alternative("<p>Hi <b>user</b></p>", subtype="html")
    with SmtpSink(SinkConfig(port=0, record_path=path)) as sink:
        with _client(sink) as client:
            refused = client.send_message(
                msg, from_addr="bounce@example.com", to_addrs=["a@example.org", "b@example.org"]
            )
        assert refused == {}
        [record] = sink.messages
        assert sink.stats["accept"] == 1

    assert record["mail_from"] == "bounce@example.com"
    assert record["rcpt_tos"] == ["a@example.org", "b@example.org"]
    assert record["message_id"] == msg["Message-ID"]
    assert record["subject"] == "Grüße aus Köln"
    assert header(record, "x-campaign-id") == "cmp-1"
    assert header(record, "To") == "user0@example.org"
    assert [name for name, _ in record["headers"]][:3] == ["From", "To", "Subject"]
    assert record["body"] == "Hi user 0, this is message 0.\n"
    assert record["html"] == "<p>Hi <b>user</b></p>\n"
    received = record["received_at"]
    assert received.endswith("+00:00")
    assert read_records(path) == [record]


@pytest.mark.parametrize(("field", "code"), [("tempfail_rate", 451), ("permfail_rate", 550)])
def test_failures_are_replied_and_not_recorded(tmp_path: Path, field: str, code: int) -> None:
    path = tmp_path / "messages.jsonl"
    config = SinkConfig(port=0, record_path=path, **{field: 1.0})  # type: ignore[arg-type]
    with SmtpSink(config) as sink:
        with _client(sink) as client:
            for n in range(3):  # the connection stays usable after a failed DATA
                with pytest.raises(smtplib.SMTPDataError) as failure:
                    client.send_message(_message(n))
                assert failure.value.smtp_code == code
        assert sink.messages == []
        expected = "tempfail" if code == 451 else "permfail"
        assert sink.stats[expected] == 3
        assert sink.stats["accept"] == 0
    assert count_records(path) == 0


def test_drop_after_data_disconnects_without_reply_and_records_nothing(tmp_path: Path) -> None:
    path = tmp_path / "messages.jsonl"
    with SmtpSink(SinkConfig(port=0, record_path=path, drop_rate=1.0)) as sink:
        client = _client(sink)
        client.ehlo()
        client.mail("campaigns@example.com")
        client.rcpt("user@example.org")  # RCPT passes: the drop comes after the final "."
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.data(_message().as_bytes())
        client.close()
        assert sink.messages == []
        assert sink.stats["drop_after_data"] == 1
    assert count_records(path) == 0


def test_drop_before_data_disconnects_at_rcpt(tmp_path: Path) -> None:
    with SmtpSink(SinkConfig(port=0, drop_before_data_rate=1.0)) as sink:
        client = _client(sink)
        client.ehlo()
        client.mail("campaigns@example.com")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.rcpt("user@example.org")
        client.close()
        with pytest.raises(smtplib.SMTPServerDisconnected):
            _send(sink, _message())
        assert sink.messages == []
        assert sink.stats["drop_before_data"] == 2


def test_latency_delays_the_data_reply() -> None:
    latency_ms = 200
    with SmtpSink(SinkConfig(port=0, latency_ms=latency_ms)) as sink:
        with _client(sink) as client:
            client.ehlo()
            started = time.monotonic()
            client.send_message(_message())
            elapsed = time.monotonic() - started
        assert len(sink.messages) == 1
    assert elapsed >= latency_ms / 1000 * 0.95  # loose: timer granularity
    assert elapsed < CLIENT_TIMEOUT_S


def test_record_file_has_one_line_per_accepted_message(tmp_path: Path) -> None:
    path = tmp_path / "messages.jsonl"
    # Seeded mix of faults: the file must hold the accepted messages and nothing else.
    config = SinkConfig(port=0, record_path=path, tempfail_rate=0.3, permfail_rate=0.2, seed=3)
    accepted: list[str] = []
    with SmtpSink(config) as sink:
        with _client(sink) as client:
            for n in range(40):
                msg = _message(n)
                try:
                    client.send_message(msg)
                except smtplib.SMTPDataError:
                    continue
                accepted.append(msg["Message-ID"])
                # Visible to other readers as soon as the 250 came back (flushed, not buffered).
                assert count_records(path) == len(accepted)
        stats = sink.stats
    assert 0 < len(accepted) < 40
    assert stats["accept"] == len(accepted)
    assert stats["tempfail"] + stats["permfail"] == 40 - len(accepted)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(accepted)
    assert [json.loads(line)["message_id"] for line in lines] == accepted


def test_record_file_is_appended_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "messages.jsonl"
    for _ in range(2):
        with SmtpSink(SinkConfig(port=0, record_path=path)) as sink:
            _send(sink, _message())
    assert count_records(path) == 2


def test_readers_ignore_a_line_being_written(tmp_path: Path) -> None:
    path = tmp_path / "messages.jsonl"
    path.write_text('{"message_id": "<a@x>"}\n{"message_id": "<b@', encoding="utf-8")
    assert read_records(path) == [{"message_id": "<a@x>"}]
    assert count_records(path) == 1
    assert read_records(tmp_path / "missing.jsonl") == []
    assert count_records(tmp_path / "missing.jsonl") == 0


def test_concurrent_clients_over_reused_connections(tmp_path: Path) -> None:
    path = tmp_path / "messages.jsonl"
    threads, per_thread = 3, 200
    errors: list[BaseException] = []

    def sender(worker: int) -> None:
        try:
            with _client(sink) as client:  # one connection carries all of this worker's mail
                for n in range(per_thread):
                    client.send_message(_message(worker * per_thread + n))
        except BaseException as error:  # reported to the main thread
            errors.append(error)

    with SmtpSink(SinkConfig(port=0, record_path=path)) as sink:
        workers = [threading.Thread(target=sender, args=(w,)) for w in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        assert errors == []
        assert sink.wait_for_messages(threads * per_thread, timeout=5)
        ids = [record["message_id"] for record in sink.messages]
    assert len(ids) == len(set(ids)) == threads * per_thread
    assert count_records(path) == threads * per_thread
    assert {r["message_id"] for r in read_records(path)} == set(ids)


def test_stop_closes_open_connections() -> None:
    sink = SmtpSink(SinkConfig(port=0)).start()
    client = _client(sink)
    client.ehlo()
    sink.stop()
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.send_message(_message())
    client.close()
    sink.stop()  # idempotent


# --- relay imitation: TLS, AUTH, refusal ------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    return self_signed(tmp_path_factory.mktemp("tls"))


def _trusting(certificate: Certificate) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certificate.cert))


def test_required_starttls_refuses_mail_in_the_clear_and_records_the_tls_session(
        certificate: Certificate) -> None:
    config = SinkConfig(port=0, tls_cert=certificate.cert, tls_key=certificate.key, require_starttls=True)
    with SmtpSink(config) as sink:
        with _client(sink) as client:
            client.ehlo()
            assert client.has_extn("starttls")
            assert client.mail("campaigns@example.com")[0] == 530
            client.starttls(context=_trusting(certificate))  # verifies the certificate for 127.0.0.1
            client.ehlo()
            client.send_message(_message())
        [record] = sink.messages
    assert record["session"] == {"tls": True, "auth_user": None}


def test_auth_is_required_offered_only_over_tls_and_checks_the_password(certificate: Certificate) -> None:
    config = SinkConfig(port=0, tls_cert=certificate.cert, tls_key=certificate.key,
                        auth_users={"campaigns": "right-pw"})
    with SmtpSink(config) as sink:
        with _client(sink) as client:
            client.ehlo()
            assert not client.has_extn("auth")  # not before TLS
            client.starttls(context=_trusting(certificate))
            client.ehlo()
            assert client.mail("campaigns@example.com")[0] == 530  # not before AUTH
            client.rset()
            with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
                client.login("campaigns", "wrong-pw")
            assert refused.value.smtp_code == 535
            client.login("campaigns", "right-pw")
            client.send_message(_message())
        [record] = sink.messages
        assert sink.logins["ok"] == 1 and sink.logins["refused"] >= 1
    assert record["session"] == {"tls": True, "auth_user": "campaigns"}


def test_implicit_tls_speaks_tls_from_the_first_byte(certificate: Certificate) -> None:
    config = SinkConfig(port=0, tls_cert=certificate.cert, tls_key=certificate.key, implicit_tls=True,
                        auth_users={"campaigns": "pw"})
    with SmtpSink(config) as sink:
        with pytest.raises(smtplib.SMTPServerDisconnected):
            smtplib.SMTP(sink.host, sink.port, timeout=2)  # a plain client gets no greeting
        with smtplib.SMTP_SSL(sink.host, sink.port, timeout=CLIENT_TIMEOUT_S,
                              context=_trusting(certificate)) as client:
            client.login("campaigns", "pw")
            client.send_message(_message())
        [record] = sink.messages
    assert record["session"] == {"tls": True, "auth_user": "campaigns"}


def test_refuse_connections_answers_421_at_the_greeting() -> None:
    with SmtpSink(SinkConfig(port=0, refuse_connections=True)) as sink:
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            _client(sink)
        assert refused.value.smtp_code == 421
        assert sink.messages == []


@pytest.mark.parametrize(("fields", "message"), [
    ({"require_starttls": True}, "need tls_cert and tls_key"),
    ({"implicit_tls": True}, "need tls_cert and tls_key"),
    ({"tls_cert": "c.pem"}, "go together"),
    ({"auth_users": {"u": "p"}}, "auth_users with auth_require_tls need tls_cert"),
])
def test_inconsistent_tls_settings_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SinkConfig(port=0, **fields)


def test_tls_and_auth_settings_come_from_the_environment(
        certificate: Certificate, monkeypatch: pytest.MonkeyPatch) -> None:
    config = sink_config_from(monkeypatch, {
        "SMTP_PORT": "0", "SINK_TLS_CERT": str(certificate.cert), "SINK_TLS_KEY": str(certificate.key),
        "SINK_REQUIRE_STARTTLS": "yes", "SINK_AUTH_USERS": "a:1, b:2", "SINK_REFUSE_CONNECTIONS": "0",
    })
    assert config.require_starttls and not config.implicit_tls and not config.refuse_connections
    assert config.auth_users == {"a": "1", "b": "2"}
    assert "auth_users" not in repr(config)  # passwords stay out of logs
    with pytest.raises(ValueError, match="SINK_IMPLICIT_TLS"):
        sink_config_from(monkeypatch, {"SINK_IMPLICIT_TLS": "maybe"})
    with pytest.raises(ValueError, match="SINK_AUTH_USERS must be name:password"):
        sink_config_from(monkeypatch, {"SINK_AUTH_USERS": "nopassword"})
