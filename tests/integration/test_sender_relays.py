"""Several relays over real SMTP (the project's sink): routing, failover, STARTTLS, AUTH, SMTPS,
and the real SenderWorker mailing through a router."""

from __future__ import annotations

import socket
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas.events import EmailSent, MessageTemplate, RecipientQueued
from services.sender.mime import OutgoingMail
from services.sender.relay_config import RelaysConfig, parse
from services.sender.relays import RelayRouter
from services.sender.replies import Verdict
from services.sender.throttle import RateLimiter
from services.smtp_sink import SinkConfig, SmtpSink
from services.smtp_sink.certificates import Certificate, self_signed
from tests.integration.sender_kit import (
    deliveries_until,
    produce,
    running_sender,
    terminal_for_all,
)

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def sinks() -> Iterator[tuple[SmtpSink, SmtpSink]]:
    with SmtpSink(SinkConfig(port=0)) as first, SmtpSink(SinkConfig(port=0)) as second:
        yield first, second


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def relay(name: str, port: int, **extra) -> dict:
    return {"name": name, "host": "127.0.0.1", "port": port, "timeout_seconds": 5, **extra}


def relays(*items: dict, env: dict[str, str] | None = None, **extra) -> RelaysConfig:
    return parse({"relays": list(items), **extra}, "test", env or {}, Path("."))


def mail(sender: str, n: int) -> OutgoingMail:
    message_id = f"<relay-test-{n}@{sender.rpartition('@')[2]}>"
    content = (f"From: {sender}\r\nTo: user{n}@example.org\r\nSubject: relay test {n}\r\n"
               f"Message-ID: {message_id}\r\n\r\nHello {n}\r\n").encode()
    return OutgoingMail(message_id, sender, f"user{n}@example.org", content)


def ids(sink: SmtpSink) -> list[str]:
    return [record["message_id"] for record in sink.messages]


def test_mail_lands_in_the_relay_of_its_from_domain(sinks):
    first, second = sinks
    config = relays(relay("first", first.port, domains=["example.com"]),
                    relay("second", second.port, domains=["other.org"]), default="second")
    router = RelayRouter(config, 2)
    try:
        senders = ["news@example.com", "news@mail.example.com", "news@other.org", "news@unlisted.net"]
        for n, sender in enumerate(senders):
            assert router.transmit(mail(sender, n)).verdict is Verdict.SENT
    finally:
        router.close()
    assert sorted(ids(first)) == ["<relay-test-0@example.com>", "<relay-test-1@mail.example.com>"]
    assert sorted(ids(second)) == ["<relay-test-2@other.org>", "<relay-test-3@unlisted.net>"]
    assert {r["mail_from"] for r in first.messages} == {"news@example.com", "news@mail.example.com"}


@pytest.mark.parametrize("dead", ["closed port", "421 at greeting"])
def test_an_unusable_relay_fails_over_nothing_lost_or_doubled(sinks, dead):
    _, backup = sinks
    with SmtpSink(SinkConfig(port=0, refuse_connections=True)) as refusing:
        port = closed_port() if dead == "closed port" else refusing.port
        config = relays(relay("primary", port, domains=["example.com"]), relay("backup", backup.port),
                        default="primary", failover=["backup"])
        router = RelayRouter(config, 4)
        results: list = []
        try:
            threads = [threading.Thread(target=lambda k=k: results.extend(
                router.transmit(mail("news@example.com", 10 * k + n)) for n in range(10)))
                for k in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
        finally:
            router.close()
        assert refusing.messages == []
    assert [r.verdict for r in results] == [Verdict.SENT] * 40
    assert Counter(ids(backup)) == Counter(f"<relay-test-{n}@example.com>" for n in range(40))
    stats = router.stats.snapshot()
    assert stats["primary"].sent == 0 and stats["primary"].failovers == 40
    assert 1 <= stats["primary"].setup_failures <= 4  # then it cools off: no connect per mail
    assert stats["backup"].sent == 40 and stats["backup"].failed_over_in == 40


def test_starttls_and_auth_against_a_relay_that_requires_both(certificate):
    config = SinkConfig(port=0, tls_cert=certificate.cert, tls_key=certificate.key,
                        require_starttls=True, auth_users={"campaigns": PASSWORD})
    with SmtpSink(config) as sink:
        settings = relays(relay("secure", sink.port, security="starttls", ca_file=str(certificate.cert),
                                username="campaigns", password_env="RELAY_PW"),
                          env={"RELAY_PW": PASSWORD})
        router = RelayRouter(settings, 2)
        try:
            attempts = [router.transmit(mail("news@example.com", n)) for n in range(3)]
        finally:
            router.close()
        assert [a.verdict for a in attempts] == [Verdict.SENT] * 3, attempts
        assert [r["session"] for r in sink.messages] == [{"tls": True, "auth_user": "campaigns"}] * 3
        assert sink.logins == {"ok": 1, "refused": 0}  # one session, reused for all three


def test_implicit_tls_relay(certificate):
    config = SinkConfig(port=0, tls_cert=certificate.cert, tls_key=certificate.key, implicit_tls=True,
                        auth_users={"campaigns": PASSWORD})
    with SmtpSink(config) as sink:
        settings = relays(relay("smtps", sink.port, security="tls", ca_file=str(certificate.cert),
                                username="campaigns", password_env="RELAY_PW"),
                          env={"RELAY_PW": PASSWORD})
        router = RelayRouter(settings, 1)
        try:
            assert router.transmit(mail("news@example.com", 1)).verdict is Verdict.SENT
        finally:
            router.close()
        assert sink.messages[0]["session"] == {"tls": True, "auth_user": "campaigns"}


def test_a_wrong_password_fails_over_or_is_transient_never_permanent(certificate):
    config = SinkConfig(port=0, tls_cert=certificate.cert, tls_key=certificate.key,
                        auth_users={"campaigns": PASSWORD})
    with SmtpSink(config) as secured, SmtpSink(SinkConfig(port=0)) as backup:
        secure = relay("secured", secured.port, security="starttls", ca_file=str(certificate.cert),
                       username="campaigns", password_env="RELAY_PW")
        env = {"RELAY_PW": "wrong password"}
        alone = RelayRouter(relays(secure, env=env), 1)
        try:
            attempt = alone.transmit(mail("news@example.com", 1))
        finally:
            alone.close()
        assert attempt.verdict is Verdict.TRANSIENT and not attempt.ambiguous
        assert attempt.text.startswith("auth: SMTPAuthenticationError") and "535" in attempt.text
        assert PASSWORD not in attempt.text and "wrong password" not in attempt.text
        with_backup = RelayRouter(relays(secure, relay("backup", backup.port), env=env,
                                         default="secured", failover=["backup"]), 1)
        try:
            assert with_backup.transmit(mail("news@example.com", 2)).verdict is Verdict.SENT
        finally:
            with_backup.close()
        assert secured.messages == [] and ids(backup) == ["<relay-test-2@example.com>"]
        assert secured.logins["ok"] == 0 and secured.logins["refused"] >= 2


def test_an_untrusted_certificate_is_refused_unless_verification_is_switched_off(certificate):
    config = SinkConfig(port=0, tls_cert=certificate.cert, tls_key=certificate.key, require_starttls=True)
    with SmtpSink(config) as sink:
        strict = RelayRouter(relays(relay("strict", sink.port, security="starttls")), 1)
        try:
            attempt = strict.transmit(mail("news@example.com", 1))
        finally:
            strict.close()
        assert attempt.verdict is Verdict.TRANSIENT
        assert attempt.text.startswith("tls: SSLCertVerificationError"), attempt.text
        assert sink.messages == []
        relaxed = RelayRouter(relays(relay("relaxed", sink.port, security="starttls",
                                           verify_certificate=False)), 1)
        try:
            assert relaxed.transmit(mail("news@example.com", 2)).verdict is Verdict.SENT
        finally:
            relaxed.close()
        assert ids(sink) == ["<relay-test-2@example.com>"]


def test_starttls_required_by_us_but_not_offered_is_a_relay_failure(sinks):
    plain, backup = sinks
    config = relays(relay("plain", plain.port, security="starttls"), relay("backup", backup.port),
                    default="plain", failover=["backup"])
    router = RelayRouter(config, 1)
    try:
        assert router.transmit(mail("news@example.com", 1)).verdict is Verdict.SENT
    finally:
        router.close()
    assert plain.messages == [], "never mail in the clear when TLS was asked for"
    assert ids(backup) == ["<relay-test-1@example.com>"]


# --- the real sender through a router -------------------------------------------------------------


def campaign(campaign_id: str, from_address: str, count: int) -> list[RecipientQueued]:
    template = MessageTemplate(subject="Hello {{ first_name }}", from_address=from_address,
                               body_text="Hi {{ first_name }}")
    return [RecipientQueued(campaign_id=campaign_id, contact_id=f"{campaign_id}-ct-{i}",
                            email=f"user{i}@example.org", first_name=f"F{i}", template=template)
            for i in range(count)]


def test_the_sender_worker_mails_through_the_router_per_from_domain(settings, sinks):
    first, second = sinks
    config = relays(relay("first", closed_port(), domains=["example.com"]),
                    relay("second", first.port, domains=["example.net"]),
                    relay("third", second.port), default="third", failover=["second"])
    # Campaign ids of their own: the send ledger (shared database) remembers earlier runs.
    a, b, c = (f"cmp-relay-{uuid.uuid4().hex[:8]}" for _ in range(3))
    via_first = campaign(a, "news@example.com", 30)  # dead relay: fails over to second
    via_second = campaign(b, "news@example.net", 20)
    via_default = campaign(c, "news@example.org", 10)
    produce(settings, via_first + via_second + via_default)
    router = RelayRouter(config, 4)
    # The per-server rate limit books the routed relay's name (server_for); generous, so
    # nothing is throttled.
    limiter = BookingLog(server_limits=(100_000.0,))
    with running_sender(settings, concurrency=4, limiter=limiter, transport=router):
        events = deliveries_until(settings, terminal_for_all(60), timeout=120)
    sent = {e.payload.contact_id for e in events if isinstance(e.payload, EmailSent)}
    assert sent == {r.contact_id for r in via_first + via_second + via_default}
    by_campaign = Counter(_campaign(r) for r in first.messages)
    assert by_campaign == Counter({a: 30, b: 20})
    assert Counter(_campaign(r) for r in second.messages) == Counter({c: 10})
    assert len(set(ids(first))) == 50, "no mail twice"
    stats = router.stats.snapshot()
    assert stats["first"].sent == 0 and stats["first"].failovers == 30
    assert stats["second"].sent == 50 and stats["second"].failed_over_in == 30
    assert limiter.servers == Counter({"first": 30, "second": 20, "third": 10})


class BookingLog(RateLimiter):
    """A real limiter that also notes which server each booking was for."""

    def __init__(self, **limits) -> None:
        super().__init__(**limits)
        self.servers: Counter[str] = Counter()
        self._log_lock = threading.Lock()

    def book(self, tenant: str, server: str, now: float) -> float:
        with self._log_lock:
            self.servers[server] += 1
        return super().book(tenant, server, now)


def _campaign(record: dict) -> str:
    return next(value for name, value in record["headers"] if name.lower() == "x-campaign-id")
