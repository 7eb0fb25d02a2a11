"""Configuration of the SMTP sink: where it listens, what it records, which faults it injects.

Guarantees: a `SinkConfig` that exists is valid — every rate is in [0, 1], the rates sum to at
most 1 (each message gets at most one fault), latency is not negative and the port is a TCP
port; TLS modes come with a certificate and key, and AUTH that needs TLS has TLS to run on.
Anything else is refused at construction with a ValueError naming the field.

Relay imitation (for the sender's TLS / AUTH / failover code): `tls_cert` + `tls_key` offer
STARTTLS, `require_starttls` refuses mail before it, `implicit_tls` speaks TLS from the first
byte (SMTPS) instead; `auth_users` (name -> password) requires AUTH PLAIN or LOGIN before
MAIL; `refuse_connections` answers every connection with 421 at the greeting and closes it
(a relay that is up but not taking mail). `pipelining` (on by default, as on Postfix) offers
RFC 2920 PIPELINING in the EHLO reply; off, the sink imitates a relay without it. `chunking`
(on by default, as on Postfix >= 3.4) likewise offers RFC 3030 CHUNKING (BDAT), and
`smtputf8` (on by default) RFC 6531 SMTPUTF8.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from services.common.settings import DEFAULT_SMTP_PORT, SinkSettings

# Float sums like 0.1 + 0.2 + 0.7 land a hair above 1.0; without slack such configs would be
# refused although every rate the user wrote is fine.
_RATE_SUM_TOLERANCE = 1e-9

_RATE_FIELDS = ("tempfail_rate", "permfail_rate", "drop_rate", "drop_before_data_rate")


@dataclass(frozen=True)
class SinkConfig:
    """Everything the sink needs. port=0 means "pick a free port" (see `SmtpSink.port`)."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_SMTP_PORT
    record_path: Path | None = None
    # Shares of messages answered 451 / 550 at the end of DATA.
    tempfail_rate: float = 0.0
    permfail_rate: float = 0.0
    # Share of messages whose connection is dropped after the final "." without any reply:
    # the client cannot know whether the message was delivered.
    drop_rate: float = 0.0
    # Share of messages whose connection is dropped at RCPT, before DATA: surely not delivered.
    drop_before_data_rate: float = 0.0
    # Delay before answering DATA, per message, to imitate a slow receiving server.
    latency_ms: float = 0.0
    # Seed of the fault draws; None draws from the OS entropy (different every run).
    seed: int | None = None
    # Keep accepted messages in memory for in-process readers (tests). A long-running sink
    # process records to its file only, so its memory does not grow with every message.
    keep_in_memory: bool = True
    # PEM certificate (chain) and private key the sink presents for STARTTLS / implicit TLS.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Refuse MAIL (530) until the client has issued STARTTLS.
    require_starttls: bool = False
    # TLS from the first byte (SMTPS, like port 465) instead of offering STARTTLS.
    implicit_tls: bool = False
    # Accounts of AUTH PLAIN / LOGIN; when any is set, MAIL is refused (530) before AUTH.
    auth_users: dict[str, str] = field(default_factory=dict, repr=False)
    # Offer AUTH only over TLS (aiosmtpd's default; any real relay's policy).
    auth_require_tls: bool = True
    # Answer every connection with "421" at the greeting and close it.
    refuse_connections: bool = False
    # Offer PIPELINING (RFC 2920) in the EHLO reply, and send the replies to a pipelined
    # group of MAIL / RCPT commands in one write (see server.py).
    pipelining: bool = True
    # Offer CHUNKING (RFC 3030) in the EHLO reply and take BDAT: the message as counted
    # octets, with no 354 round trip and no dot-stuffing (see server.py).
    chunking: bool = True
    # Offer SMTPUTF8 (RFC 6531) in the EHLO reply: envelope addresses with a non-ASCII local
    # part are taken only then. False imitates a relay that refuses them.
    smtputf8: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.record_path, str):
            # Accept a plain string too (env values, CLI args); frozen, hence object.__setattr__.
            object.__setattr__(self, "record_path", Path(self.record_path))
        for name in _RATE_FIELDS:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"SinkConfig.{name} must be in [0, 1], got {value!r}")
        total = sum(getattr(self, name) for name in _RATE_FIELDS)
        if total > 1.0 + _RATE_SUM_TOLERANCE:
            raise ValueError(
                f"SinkConfig fault rates must sum to at most 1, got {total!r} "
                f"({', '.join(f'{n}={getattr(self, n)}' for n in _RATE_FIELDS)})"
            )
        if self.latency_ms < 0:
            raise ValueError(f"SinkConfig.latency_ms must be >= 0, got {self.latency_ms!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"SinkConfig.port must be in [0, 65535], got {self.port!r}")
        for name in ("tls_cert", "tls_key"):
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, Path(getattr(self, name)))
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("SinkConfig.tls_cert and tls_key go together")
        if self.tls_cert is None and (self.require_starttls or self.implicit_tls):
            raise ValueError("SinkConfig.require_starttls / implicit_tls need tls_cert and tls_key")
        if self.require_starttls and self.implicit_tls:
            raise ValueError("SinkConfig.require_starttls and implicit_tls exclude each other")
        if self.auth_users and self.auth_require_tls and self.tls_cert is None:
            raise ValueError("SinkConfig.auth_users with auth_require_tls need tls_cert and tls_key")

    @property
    def tls(self) -> bool:
        """The sink can speak TLS (STARTTLS or implicit)."""
        return self.tls_cert is not None

    @classmethod
    def from_settings(cls, settings: SinkSettings) -> SinkConfig:
        """The sink the settings describe (SMTP_HOST, SMTP_PORT, SINK_*); a sink with a
        record file keeps no copies in memory. Raises ValueError naming a bad variable."""
        return cls(
            host=settings.smtp_host,
            port=settings.smtp_port,
            record_path=settings.sink_record_path,
            tempfail_rate=settings.sink_tempfail_rate,
            permfail_rate=settings.sink_permfail_rate,
            drop_rate=settings.sink_drop_rate,
            drop_before_data_rate=settings.sink_drop_before_data_rate,
            latency_ms=settings.sink_latency_ms,
            seed=settings.sink_seed,
            keep_in_memory=settings.sink_record_path is None,
            tls_cert=settings.sink_tls_cert,
            tls_key=settings.sink_tls_key,
            require_starttls=settings.sink_require_starttls,
            implicit_tls=settings.sink_implicit_tls,
            auth_users=_accounts(settings.sink_auth_users.get_secret_value()),
            auth_require_tls=settings.sink_auth_require_tls,
            refuse_connections=settings.sink_refuse_connections,
            pipelining=settings.sink_pipelining,
            chunking=settings.sink_chunking,
            smtputf8=settings.sink_smtputf8,
        )


def _accounts(text: str) -> dict[str, str]:
    accounts: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise ValueError("SINK_AUTH_USERS must be name:password pairs separated by commas")
        accounts[user] = password
    return accounts
