"""Relay configuration, domain routing and the router's failover rules (pure: fake pools)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common.settings import SenderSettings
from services.sender.mime import OutgoingMail
from services.sender.relay_config import RelayConfigError, RelaysConfig, load, parse
from services.sender.relays import RelayRouter, RoutingTable, transport_factory
from services.sender.replies import Attempt, Verdict
from services.sender.smtp_pool import RelayResult, Security, SetupPhase, SmtpPool
from services.sender.transport import TimedTransport


def relay(name: str, **extra) -> dict:
    return {"name": name, "host": "127.0.0.1", "port": 2525, **extra}


def config(*relays: dict, **extra) -> RelaysConfig:
    return parse({"relays": list(relays), **extra}, "test", {}, Path("."))


def refused(document: dict, env: dict[str, str] | None = None) -> str:
    with pytest.raises(RelayConfigError) as caught:
        parse(document, "test", env or {}, Path("."))
    return str(caught.value)


# --- configuration ---------------------------------------------------------------------------


def test_a_full_config_parses_with_defaults():
    parsed = config(relay("a", domains=["Example.COM"]), relay("b", security="starttls"),
                    default="b", failover=["a"])
    assert [r.name for r in parsed.relays] == ["a", "b"]
    assert parsed.relays[0].security is Security.NONE and parsed.relays[1].security is Security.STARTTLS
    assert parsed.routes() == {"example.com": "a"}
    assert parsed.default_relay == "b" and parsed.failover == ["a"]
    assert parsed.cool_off_seconds == 30.0


def test_a_single_relay_is_the_default_without_naming_it():
    assert config(relay("only")).default_relay == "only"


@pytest.mark.parametrize(("document", "expected"), [
    ({"relays": [relay("a", security="ssl")]}, "relays.0.security: Input should be 'none', 'starttls' or 'tls'"),
    ({"relays": [relay("a"), relay("a")], "default": "a"}, "duplicate relay name(s): a"),
    ({"relays": [relay("a", domains=["x.com"]), relay("b", domains=["X.com."])], "default": "a"},
     "domain 'x.com' is routed to two relays: 'a' and 'b'"),
    ({"relays": [relay("a")], "failover": ["b"]}, "failover: unknown relay(s) b"),
    ({"relays": [relay("a")], "default": "zzz"}, "default: 'zzz' is not a configured relay"),
    ({"relays": [relay("a"), relay("b")]}, "default: name the relay of From domains no relay lists"),
    ({"relays": [relay("a"), relay("b")], "default": "a", "failover": ["b", "b"]}, "listed twice"),
    ({"relays": []}, "relays: List should have at least 1 item"),
    ({"relays": [relay("a", port=0)]}, "relays.0.port"),
    ({"relays": [relay("a", domains=["not a domain"])]}, "'not a domain' is not a domain name"),
    ({"relays": [relay("a", security="tls", username="u")]}, "username set without password_env"),
    ({"relays": [relay("a", security="tls", password_env="P")]}, "a password source without a username"),
    ({"relays": [relay("a", username="u", password_env="P")]}, "AUTH without TLS sends the password"),
    ({"relays": [relay("a", verify_certificate=False)]}, "need security starttls or tls"),
    ({"relays": [relay("a", colour="blue")]}, "relays.0.colour: Extra inputs are not permitted"),
    ({"relays": [relay("a", security="tls", username="u", password="hunter2")]},
     "a relay holds 'password'"),
    ([1, 2], "expected an object with a 'relays' list"),
])
def test_bad_configs_fail_with_a_clear_reason(document, expected):
    assert expected in refused(document)


def test_the_password_comes_from_the_named_variable_and_never_shows(tmp_path):
    parsed = parse({"relays": [relay("a", security="starttls", username="u", password_env="SMTP_PW")]},
                   "test", {"SMTP_PW": "s3cret-pw"}, tmp_path)
    [only] = parsed.relays
    assert only.credentials is not None and only.credentials.password == "s3cret-pw"
    assert "s3cret-pw" not in repr(parsed) + str(parsed) + repr(only.credentials)
    assert "s3cret-pw" not in parsed.model_dump_json()


def test_a_missing_password_variable_fails_the_start():
    message = refused({"relays": [relay("a", security="tls", username="u", password_env="NOPE")]})
    assert "relay 'a': environment variable NOPE (password_env) is not set or empty" in message


def test_the_password_file_is_read_relative_to_the_config_without_its_line_break(tmp_path):
    (tmp_path / "pw").write_text("from-file\n")
    parsed = parse({"relays": [relay("a", security="tls", username="u", password_file="pw")]},
                   "test", {}, tmp_path)
    credentials = parsed.relays[0].credentials
    assert credentials is not None and credentials.password == "from-file"
    message = refused({"relays": [relay("a", security="tls", username="u",
                                        password_file=str(tmp_path / "absent"))]})
    assert "password_file" in message and "absent" in message


def test_a_ca_file_must_exist(tmp_path):
    message = refused({"relays": [relay("a", security="tls", ca_file=str(tmp_path / "ca.pem"))]})
    assert "ca_file" in message and "does not exist" in message


def test_load_reads_a_toml_file_and_an_inline_json(tmp_path):
    path = tmp_path / "relays.toml"
    path.write_text('default = "a"\nfailover = ["b"]\n\n[[relays]]\nname = "a"\nhost = "h1"\n'
                    'port = 25\ndomains = ["example.com"]\n\n[[relays]]\nname = "b"\nhost = "h2"\n')
    from_file = load(SenderSettings(sender_relays_file=path), {})
    assert from_file is not None and [r.host for r in from_file.relays] == ["h1", "h2"]
    inline = load(SenderSettings(sender_relays=json.dumps({"relays": [relay("x")]})), {})
    assert inline is not None and inline.default_relay == "x"
    assert load(SenderSettings(), {}) is None


@pytest.mark.parametrize(("env", "expected"), [
    ({"SENDER_RELAYS_FILE": "/x.json", "SENDER_RELAYS": "{}"}, "not both"),
    ({"SENDER_RELAYS": "{not json"}, "SENDER_RELAYS: invalid JSON"),
    ({"SENDER_RELAYS_FILE": "/definitely/absent.toml"}, "cannot read"),
])
def test_load_errors_name_the_source(env, expected):
    with pytest.raises(RelayConfigError, match="SENDER_RELAYS") as caught:
        load(SenderSettings(**{name.lower(): value for name, value in env.items()}), {})
    assert expected in str(caught.value)


def test_a_file_of_unknown_format_is_refused(tmp_path):
    path = tmp_path / "relays.yaml"
    path.write_text("relays: []")
    with pytest.raises(RelayConfigError, match=r"name the file \*.json or \*.toml"):
        load(SenderSettings(sender_relays_file=path), {})


def test_without_relay_config_the_transport_is_the_single_smtp_relay():
    factory = transport_factory(SenderSettings(smtp_host="127.0.0.1", smtp_port=2626), {})
    transport = factory(2)
    assert isinstance(transport, TimedTransport) and isinstance(transport.inner, SmtpPool)
    assert transport.server_for("a@example.com") == "127.0.0.1:2626"


def test_every_transaction_is_timed_under_its_relay():
    from services.common.metrics import SMTP_TRANSACTION_SECONDS

    class Instant:
        def server_for(self, sender: str) -> str:
            return "relay-a"

        def transmit(self, mail):
            return Attempt(Verdict.SENT, 250, "ok")

        def close(self) -> None:
            pass

    def observed() -> float:
        return next(s.value for m in SMTP_TRANSACTION_SECONDS.collect() for s in m.samples
                    if s.name.endswith("_count") and s.labels.get("relay") == "relay-a")

    timed = TimedTransport(Instant())
    timed.transmit(type("Mail", (), {"sender": "n@example.com"})())
    before = observed()
    timed.transmit(type("Mail", (), {"sender": "n@example.com"})())
    assert observed() == before + 1


# --- routing ---------------------------------------------------------------------------------


def test_routing_by_exact_domain_then_parents_then_default():
    table = RoutingTable({"example.com": "a", "news.example.org": "b", "org": "c"}, "d")
    assert table.relay_for("x@example.com") == "a"
    assert table.relay_for("x@EXAMPLE.Com") == "a"
    assert table.relay_for("x@mail.example.com") == "a"
    assert table.relay_for("x@deep.mail.news.example.org") == "b"
    assert table.relay_for("x@example.org") == "c"
    assert table.relay_for("x@example.net") == "d"
    assert table.relay_for("x@notexample.com") == "d"
    assert table.relay_for("no-at-sign") == "d"


# --- the router, over fake pools ---------------------------------------------------------------


SENT = RelayResult(Attempt(Verdict.SENT, 250, "2.0.0 OK"))
DOWN = RelayResult(Attempt(Verdict.TRANSIENT, None, "connect: ConnectionRefusedError: refused"),
                   SetupPhase.CONNECT)
AUTH_FAILED = RelayResult(Attempt(Verdict.TRANSIENT, None, "auth: SMTPAuthenticationError: 535"),
                          SetupPhase.AUTH)
LOST_AFTER_DATA = RelayResult(Attempt(Verdict.TRANSIENT, None, "final reply: lost", ambiguous=True))
REFUSED_AT_RCPT = RelayResult(Attempt(Verdict.PERMANENT, 550, "5.1.1 no such user"))


class FakePool:
    def __init__(self, *results: RelayResult) -> None:
        self.results = list(results)
        self.mails: list[OutgoingMail] = []
        self.closed = False

    def send(self, mail: OutgoingMail) -> RelayResult:
        self.mails.append(mail)
        return self.results.pop(0) if len(self.results) > 1 else self.results[0]

    def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def mail(sender: str = "news@example.com", n: int = 0) -> OutgoingMail:
    return OutgoingMail(f"<m{n}@example.com>", sender, f"user{n}@example.org", b"Subject: x\r\n\r\nhi\r\n")


def router(pools: dict[str, FakePool], clock: Clock | None = None, **extra) -> RelayRouter:
    relays = [relay("a", domains=["example.com"]), relay("b", domains=["other.org"]), relay("c")]
    settings = config(*[r for r in relays if r["name"] in pools], default="c" if "c" in pools else "a",
                      **extra)
    return RelayRouter(settings, 2, pools=pools, clock=clock or Clock())


def test_mail_goes_to_the_relay_of_its_from_domain_and_server_for_names_it():
    pools = {"a": FakePool(SENT), "b": FakePool(SENT), "c": FakePool(SENT)}
    transport = router(pools)
    assert transport.transmit(mail("x@example.com")).verdict is Verdict.SENT
    assert transport.transmit(mail("x@mail.other.org")).verdict is Verdict.SENT
    assert transport.transmit(mail("x@elsewhere.net")).verdict is Verdict.SENT
    assert [len(pools[n].mails) for n in "abc"] == [1, 1, 1]
    assert transport.server_for("x@Example.com") == "a"
    assert transport.server_for("x@elsewhere.net") == "c"
    assert transport.stats.snapshot()["a"].sent == 1


def test_a_relay_that_cannot_be_reached_fails_over_in_order_and_cools_off():
    clock = Clock()
    pools = {"a": FakePool(DOWN), "b": FakePool(DOWN), "c": FakePool(SENT)}
    transport = router(pools, clock, failover=["b", "c"], cool_off_seconds=30)
    assert transport.transmit(mail("x@example.com", 1)).verdict is Verdict.SENT
    assert [len(pools[n].mails) for n in "abc"] == [1, 1, 1]
    # Within the cool-off the dead relays are passed over without a connection attempt.
    clock.now += 29
    assert transport.transmit(mail("x@example.com", 2)).verdict is Verdict.SENT
    assert [len(pools[n].mails) for n in "abc"] == [1, 1, 2]
    stats = transport.stats.snapshot()
    assert (stats["a"].setup_failures, stats["a"].failovers) == (1, 2)
    assert (stats["c"].sent, stats["c"].failed_over_in) == (2, 2)
    # After it, the routed relay is tried again; once it works it takes its mail again.
    clock.now += 2
    pools["a"].results = [SENT]
    assert transport.transmit(mail("x@example.com", 3)).verdict is Verdict.SENT
    assert [len(pools[n].mails) for n in "abc"] == [2, 1, 2]


def test_outcomes_after_the_session_started_never_fail_over():
    for result in (LOST_AFTER_DATA, REFUSED_AT_RCPT):
        pools = {"a": FakePool(result), "c": FakePool(SENT)}
        transport = router(pools, failover=["c"])
        attempt = transport.transmit(mail("x@example.com"))
        assert attempt == result.attempt
        assert len(pools["c"].mails) == 0, "another relay must not get a possibly delivered mail"
        assert transport.health.cooling("a", 1000.0) is None


def test_a_failed_login_fails_over_and_alone_is_transient_not_permanent():
    pools = {"a": FakePool(AUTH_FAILED), "c": FakePool(SENT)}
    assert router(pools, failover=["c"]).transmit(mail("x@example.com")).verdict is Verdict.SENT
    alone = router({"a": FakePool(AUTH_FAILED)})
    attempt = alone.transmit(mail("x@example.com"))
    assert attempt.verdict is Verdict.TRANSIENT and not attempt.ambiguous
    assert attempt.text.startswith("auth:")


def test_when_every_relay_is_down_the_attempt_is_transient_and_names_each():
    clock = Clock()
    pools = {"a": FakePool(DOWN), "c": FakePool(DOWN)}
    transport = router(pools, clock, failover=["c"])
    first = transport.transmit(mail("x@example.com"))
    assert first.verdict is Verdict.TRANSIENT and not first.ambiguous
    assert "no relay could take the mail" in first.text and "a: connect" in first.text
    assert "c: connect" in first.text
    second = transport.transmit(mail("x@example.com"))  # both cooling off: no connection at all
    assert second.verdict is Verdict.TRANSIENT and "passed over after connect failure" in second.text
    assert [len(pools[n].mails) for n in "ac"] == [1, 1]


def test_a_lone_relay_that_is_down_reports_its_own_reason_then_cools_off():
    pools = {"a": FakePool(DOWN)}
    transport = router(pools, cool_off_seconds=5)
    assert transport.transmit(mail("x@example.com")) == DOWN.attempt
    assert "passed over" in transport.transmit(mail("x@example.com")).text
    assert len(pools["a"].mails) == 1


def test_close_closes_every_pool():
    pools = {"a": FakePool(SENT), "c": FakePool(SENT)}
    router(pools).close()
    assert pools["a"].closed and pools["c"].closed


class GroupPool(FakePool):
    """A pool with `send_many`, as SmtpPool has: records each group it was handed."""

    def __init__(self, *results: RelayResult) -> None:
        super().__init__(*results)
        self.groups: list[list[str]] = []

    def send_many(self, mails, go=None):
        self.groups.append([m.message_id for m in mails])
        return [self.send(m) for m in mails]


def test_a_group_goes_to_each_routed_relay_together_and_fails_over_together():
    clock = Clock()
    a, b, c = GroupPool(DOWN), GroupPool(SENT), GroupPool(SENT)
    transport = router({"a": a, "b": b, "c": c}, clock, failover=["c"], cool_off_seconds=30)
    group = [mail("x@example.com", 1), mail("x@other.org", 2), mail("x@example.com", 3)]
    attempts = transport.transmit_many(group)
    assert [a.verdict for a in attempts] == [Verdict.SENT] * 3
    assert a.groups == [["<m1@example.com>", "<m3@example.com>"]]
    assert c.groups == [["<m1@example.com>", "<m3@example.com>"]]  # failed over
    assert b.groups == [] and len(b.mails) == 1  # one mail: `send`
    stats = transport.stats.snapshot()
    assert (stats["a"].setup_failures, stats["a"].failovers, stats["c"].failed_over_in) == (1, 2, 2)
    # Cooling off: the next group passes over relay a without trying it.
    again = transport.transmit_many([mail("x@example.com", 4), mail("x@example.com", 5)])
    assert [a.verdict for a in again] == [Verdict.SENT] * 2
    assert len(a.groups) == 1 and len(c.groups) == 2


def test_a_group_no_relay_can_take_gets_the_reasons_a_single_mail_would():
    pools: dict[str, FakePool] = {"a": GroupPool(DOWN)}
    transport = router(pools)
    [alone] = [transport.transmit(mail("x@example.com", 9))]
    pools = {"a": GroupPool(DOWN)}
    transport = router(pools)
    grouped = transport.transmit_many([mail("x@example.com", 1), mail("x@example.com", 2)])
    assert [(a.verdict, a.text) for a in grouped] == [(alone.verdict, alone.text)] * 2
