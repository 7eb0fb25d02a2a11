"""Several SMTP relays behind the worker's `MailTransport`: routing by From domain, failover.

Routing (`RoutingTable`, pure): the From address's domain, case-insensitive, is looked up
exactly, then each parent domain in turn (mail.news.example.com -> news.example.com ->
example.com -> com), then the default relay takes it. `server_for` names the routed relay, so
the per-server rate limits of services/sender/throttle.py apply per relay.

Failover: a relay whose session cannot be set up (TCP connect refused or timed out, a 421 or
other refusal at the greeting, STARTTLS or certificate failure, AUTH refused) cannot have
taken the message, so the next relay of the configured failover list is tried for the same
message, and so on. Nothing that happens after MAIL FROM fails over: a 4xx/5xx reply is the
message's outcome, and a connection lost after DATA is ambiguous (the relay may have accepted
it) - trying another relay then could deliver it twice, so that attempt is returned as it is
and the worker's retry policy and send ledger deal with it.

Cool-off (`RelayHealth`): a relay that failed set-up is passed over for `cool_off_seconds`
(30 s by default), so mails do not each pay a connect timeout against a dead relay; after
that the next mail routed to it tries it again, and a success clears the mark. When every
relay a mail could use is cooling off (or failed just now), the attempt is transient: the
worker defers the recipient with backoff, nothing is lost.

A wrong password is a relay problem, not the recipient's (see smtp_pool): it fails over like
any set-up failure and, without another relay, is transient; it is logged as an error once
per cool-off so an operator sees it.

Guarantees: thread-safe (one router serves every send thread); `transmit` never raises for
SMTP or network trouble; at most one relay can have received any message (failover only
after a set-up failure). Which relay carried each mail is logged at debug level only; the
per-relay counts are in `stats`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from services.common.settings import SenderSettings, named_secrets
from services.sender import relay_config
from services.sender.mime import OutgoingMail
from services.sender.relay_config import RelaysConfig, RelaySettings, normalise_domain
from services.sender.replies import Attempt, Verdict
from services.sender.smtp_pool import (
    NOT_TRIED,
    RelayResult,
    Security,
    SetupPhase,
    SmtpPool,
    tls_context,
)
from services.sender.transport import MailTransport, TimedTransport

log = structlog.get_logger("sender.relays")


class RelayPool(Protocol):
    """One relay's connections (an `SmtpPool`)."""

    def send(self, mail: OutgoingMail) -> RelayResult: ...

    def close(self) -> None: ...


def send_all(pool: RelayPool, mails: Sequence[OutgoingMail],
             go: Callable[[int], bool] | None = None) -> list[RelayResult]:
    """`send` of each mail in order: by the pool's `send_many` when it has one. `go(i)`,
    asked right before mail i goes: False holds it back (NOT_TRIED)."""
    many = getattr(pool, "send_many", None)
    if many is not None and len(mails) > 1:
        results: list[RelayResult] = many(mails, go)
        return results
    return [NOT_TRIED if go is not None and not go(i) else pool.send(mail)
            for i, mail in enumerate(mails)]


class RoutingTable:
    """From domain -> relay name. Pure."""

    def __init__(self, routes: Mapping[str, str], default: str) -> None:
        self._routes = {normalise_domain(domain): name for domain, name in routes.items()}
        self.default = default

    def relay_for(self, sender: str) -> str:
        """The relay of a From / envelope address: exact domain, parent domains, default."""
        domain = normalise_domain(sender.rpartition("@")[2])
        while domain:
            name = self._routes.get(domain)
            if name is not None:
                return name
            domain = domain.partition(".")[2]
        return self.default


@dataclass
class RelayCounters:
    """What one relay did since start."""

    sent: int = 0  # transactions the relay accepted (250)
    refused: int = 0  # transactions with any other outcome (4xx, 5xx, lost connection)
    setup_failures: int = 0  # sessions that could not be set up (connect, TLS, AUTH)
    failovers: int = 0  # mails this relay could not take that went on to another relay
    failed_over_in: int = 0  # mails this relay carried for another (unusable) relay


class RelayStats:
    """Per-relay counters, thread-safe."""

    def __init__(self, names: list[str]) -> None:
        self._lock = threading.Lock()
        self._counters = {name: RelayCounters() for name in names}

    def add(self, name: str, **increments: int) -> None:
        with self._lock:
            counters = self._counters[name]
            for key, value in increments.items():
                setattr(counters, key, getattr(counters, key) + value)

    def snapshot(self) -> dict[str, RelayCounters]:
        with self._lock:
            return {name: RelayCounters(**vars(c)) for name, c in self._counters.items()}


@dataclass
class _Down:
    until: float
    phase: SetupPhase
    reason: str


@dataclass
class RelayHealth:
    """Which relays are cooling off after a set-up failure, and until when. Thread-safe."""

    cool_off_seconds: float
    _down: dict[str, _Down] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def cooling(self, name: str, now: float) -> _Down | None:
        """The relay's cool-off, while it lasts."""
        with self._lock:
            down = self._down.get(name)
            return down if down is not None and now < down.until else None

    def mark_down(self, name: str, phase: SetupPhase, reason: str, now: float) -> bool:
        """Pass the relay over until now + cool-off; True when it was not cooling off yet
        (the caller logs once per cool-off, not once per mail)."""
        with self._lock:
            previous = self._down.get(name)
            self._down[name] = _Down(now + self.cool_off_seconds, phase, reason)
            return previous is None or now >= previous.until

    def mark_up(self, name: str) -> None:
        with self._lock:
            self._down.pop(name, None)


class RelayRouter:
    """A `MailTransport` over several relays: one `SmtpPool` per relay, mail routed by its
    From domain, failover to the next relay of the failover list on set-up failures."""

    def __init__(
        self,
        config: RelaysConfig,
        size: int,
        *,
        pools: Mapping[str, RelayPool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if size < 1:
            raise ValueError("a relay router needs at least one connection per relay")
        self.table = RoutingTable(config.routes(), config.default_relay)
        self.failover = list(config.failover)
        self.health = RelayHealth(config.cool_off_seconds)
        self.stats = RelayStats([relay.name for relay in config.relays])
        self._clock = clock
        self._pools: dict[str, RelayPool] = (
            dict(pools) if pools is not None
            else {relay.name: relay_pool(relay, size) for relay in config.relays})

    def server_for(self, sender: str) -> str:
        """The routed relay's name: its per-server rate limit applies."""
        return self.table.relay_for(sender)

    def transmit(self, mail: OutgoingMail) -> Attempt:
        """One transaction on the routed relay, or on the first usable relay after it."""
        routed = self.table.relay_for(mail.sender)
        chain = [routed, *(name for name in self.failover if name != routed)]
        reasons: list[str] = []
        tried: list[Attempt] = []
        for position, name in enumerate(chain):
            has_next = position + 1 < len(chain)
            down = self.health.cooling(name, self._clock())
            if down is not None:
                reasons.append(f"{name}: passed over after {down.phase.value} failure ({down.reason})")
                self.stats.add(name, failovers=int(has_next))
                continue
            result = self._pools[name].send(mail)
            if result.setup is None:
                return self._carried(name, routed, mail, result.attempt)
            tried.append(result.attempt)
            reasons.append(f"{name}: {result.attempt.text}")
            self.stats.add(name, setup_failures=1, failovers=int(has_next))
            self._mark_down(name, result)
        return _not_carried(reasons, tried)

    def transmit_many(self, mails: Sequence[OutgoingMail],
                      go: Callable[[int], bool] | None = None) -> list[Attempt]:
        """`transmit` of each mail, in order; the mails routed to one relay go over one of its
        sessions together, and those whose session could not be set up fail over together,
        relay by relay, exactly as one mail would. `go(i)` is asked right before mail i's
        transaction on each relay tried: False holds it back (NOT_TRIED's attempt)."""
        attempts: list[Attempt | None] = [None] * len(mails)
        routed_to: dict[str, list[int]] = {}
        for index, mail in enumerate(mails):
            routed_to.setdefault(self.table.relay_for(mail.sender), []).append(index)
        for routed, positions in routed_to.items():
            chain = [routed, *(name for name in self.failover if name != routed)]
            reasons: dict[int, list[str]] = {index: [] for index in positions}
            tried: dict[int, list[Attempt]] = {index: [] for index in positions}
            pending = positions
            for position, name in enumerate(chain):
                if not pending:
                    break
                has_next = position + 1 < len(chain)
                down = self.health.cooling(name, self._clock())
                if down is not None:
                    for index in pending:
                        reasons[index].append(f"{name}: passed over after {down.phase.value}"
                                              f" failure ({down.reason})")
                    self.stats.add(name, failovers=int(has_next) * len(pending))
                    continue
                results = send_all(self._pools[name], [mails[i] for i in pending],
                                   None if go is None else _renumbered(go, pending))
                failed: list[int] = []
                for index, result in zip(pending, results, strict=True):
                    if result is NOT_TRIED:
                        attempts[index] = result.attempt
                        continue
                    if result.setup is None:
                        attempts[index] = self._carried(name, routed, mails[index],
                                                        result.attempt)
                        continue
                    failed.append(index)
                    tried[index].append(result.attempt)
                    reasons[index].append(f"{name}: {result.attempt.text}")
                if failed:
                    self.stats.add(name, setup_failures=1,  # one session, for the group
                                   failovers=int(has_next) * len(failed))
                    self._mark_down(name, results[pending.index(failed[0])])
                pending = failed
            for index in pending:
                attempts[index] = _not_carried(reasons[index], tried[index])
        assert all(attempt is not None for attempt in attempts)
        return attempts  # type: ignore[return-value]

    def _carried(self, name: str, routed: str, mail: OutgoingMail, attempt: Attempt) -> Attempt:
        self.health.mark_up(name)
        sent = attempt.verdict is Verdict.SENT
        self.stats.add(name, sent=int(sent), refused=int(not sent),
                       failed_over_in=int(name != routed))
        log.debug("mail transmitted", relay=name, routed=routed, message_id=mail.message_id,
                  verdict=attempt.verdict.value, reply=attempt.reply)
        return attempt

    def _mark_down(self, name: str, result: RelayResult) -> None:
        assert result.setup is not None
        now = self._clock()
        if not self.health.mark_down(name, result.setup, result.attempt.text, now):
            return
        fields = {"relay": name, "phase": result.setup.value, "reason": result.attempt.text,
                  "cool_off_seconds": self.health.cool_off_seconds}
        if result.setup is SetupPhase.AUTH:
            log.error("relay refused our login: check its username and password", **fields)
        else:
            log.warning("relay unusable; passing it over", **fields)

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()


def _renumbered(go: Callable[[int], bool], positions: list[int]) -> Callable[[int], bool]:
    """`go` asked of a subset's i-th mail: the group's positions[i]."""
    return lambda i: go(positions[i])


def _not_carried(reasons: list[str], tried: list[Attempt]) -> Attempt:
    """The attempt of a mail no relay of its chain could take."""
    if len(reasons) == 1 and tried:
        return tried[0]  # one relay, failed just now: its own reason, as a lone pool says
    return Attempt(Verdict.TRANSIENT, None, "no relay could take the mail: " + "; ".join(reasons))


def relay_pool(relay: RelaySettings, size: int) -> SmtpPool:
    """The connection pool of one configured relay (`size` unless the relay names its own)."""
    context = (tls_context(relay.ca_file, relay.verify_certificate)
               if relay.security is not Security.NONE else None)
    return SmtpPool(relay.host, relay.port, relay.connections or size,
                    timeout=relay.timeout_seconds, security=relay.security, context=context,
                    credentials=relay.credentials, name=relay.name)


def transport_factory(settings: SenderSettings, secrets: Mapping[str, str] | None = None,
                      ) -> Callable[[int], MailTransport]:
    """What the sender mails through, for `size` connections: the relays configured by
    SENDER_RELAYS_FILE / SENDER_RELAYS (passwords from `secrets`, by default the environment),
    or the single SMTP_HOST:SMTP_PORT relay. Raises RelayConfigError (at start-up) for a
    configuration that cannot be used."""
    config = relay_config.load(settings, named_secrets() if secrets is None else secrets)
    if config is None:
        return lambda size: TimedTransport(SmtpPool(settings.smtp_host, settings.smtp_port, size))
    log.info("relays configured", default=config.default_relay, failover=config.failover,
             relays=[{"name": r.name, "host": r.host, "port": r.port, "security": r.security.value,
                      "auth": r.username is not None, "domains": len(r.domains)}
                     for r in config.relays])
    return lambda size: TimedTransport(RelayRouter(config, size))
