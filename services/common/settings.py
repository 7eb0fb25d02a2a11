"""Runtime settings of every service: the only module that reads the environment.

One typed object per service (pydantic-settings): each field has an environment variable of
its name (upper-case) unless it names another, is checked at start and documented in the
README's table (`python -m services.common.settings_table` writes it; a test fails when it is
stale). `load()` turns a bad value into one clear line naming the variable. Secrets are
SecretStr, so they never print in a log or a repr.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.heartbeat import Heartbeat, shared_heartbeat

# Ports of the local platform started by `make up`; tests start their own on other ports.
DEFAULT_KAFKA_PORT = 29092
DEFAULT_POSTGRES_PORT = 25432
DEFAULT_SMTP_PORT = 22525
DEFAULT_API_PORT = 28080
DEFAULT_TRACKER_PORT = 28090
DEFAULT_BOUNCE_SMTP_PORT = 22526

S = TypeVar("S", bound="Settings")


class SettingsError(ValueError):
    """A setting the environment gives is not valid; the message names the variable."""


class Settings(BaseSettings):
    """Where the platform lives: the settings every service shares."""

    model_config = SettingsConfigDict(
        frozen=True, extra="forbid", env_ignore_empty=True, validate_by_name=True,
    )

    kafka_bootstrap_servers: str = Field(
        f"127.0.0.1:{DEFAULT_KAFKA_PORT}", description="Kafka brokers, host:port[,host:port]")
    database_url: str = Field(
        f"postgresql://campaigns@127.0.0.1:{DEFAULT_POSTGRES_PORT}/campaigns",
        description="PostgreSQL conninfo URL of the read models")
    smtp_host: str = Field("127.0.0.1", description="SMTP relay the sender mails through "
                           "(and the address the SMTP sink listens on)")
    smtp_port: int = Field(DEFAULT_SMTP_PORT, ge=0, le=65535, description="Port of that relay")
    topic_prefix: str = Field(
        "", description="Prefix of every topic and consumer group (isolated pipelines on one "
        "broker)")
    topic_replication_factor: int = Field(
        -1, validation_alias="KAFKA_TOPIC_REPLICATION_FACTOR",
        description="Replicas of the topics the services create; -1 takes the cluster's "
        "default.replication.factor")
    state_dir: Path = Field(
        Path(".state"), validation_alias="CAMPAIGN_STATE_DIR",
        description="Folder of local state (platform, replicas, heartbeats)")
    heartbeat_file: str = Field(
        "", description="File the service's loop touches to show it is not stuck (empty: none)")
    metrics_port: int = Field(
        0, ge=0, le=65535, description="Port of /metrics, /healthz and /readyz (0: none)")
    metrics_host: str = Field(
        "127.0.0.1", description="Address of that endpoint (0.0.0.0 in a container)")
    campaign_metrics: Literal["on", "off"] = Field(
        "on", description="off: metrics record nothing (to measure their cost)")
    restart_counts_file: Path | None = Field(
        None, description="Set by the supervisor: its restart counts, for the restarts gauge")
    supervisor_process_name: str = Field(
        "", description="Set by the supervisor: this program's name")

    @field_validator("campaign_metrics", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    def replace(self: S, **changes: object) -> S:
        """A copy with `changes`, validated like the environment's values."""
        return type(self).model_validate({**self.model_dump(), **changes})

    def heartbeat(self) -> Heartbeat:
        return shared_heartbeat(self.heartbeat_file or None)

    def group(self, name: str) -> str:
        """Consumer group id for a service, namespaced like the topics."""
        return f"{self.topic_prefix}{name}"


class CommandHandlerSettings(Settings):
    command_handler_instance: str = Field(
        "0", description="Stable name of this instance: a restart with the same name takes "
        "over its group membership and transactional id at once")


class HydratorSettings(Settings):
    hydrator_instance: str = Field("0", description="Name of this hydrator instance")
    hydrator_processing_guarantee: Literal["at_least_once", "exactly_once"] = Field(
        "at_least_once", description="faust's processing guarantee")
    hydrator_loglevel: str = Field("WARNING", description="Level of faust's own log")


class SenderSettings(Settings):
    sender_concurrency: int = Field(8, ge=1, description="SMTP connections per worker")
    sender_retry_base_seconds: float = Field(
        30.0, ge=0, description="Delay after the first transient failure (doubles each time)")
    sender_retry_max_delay_seconds: float = Field(
        3600.0, ge=0, description="Longest delay between attempts")
    sender_max_attempts: int = Field(8, ge=1, description="Attempts before a mail is given up")
    sender_max_age_seconds: float = Field(
        2 * 24 * 3600.0, ge=0, description="A mail older than this is given up")
    sender_tenant_rate: str = Field(
        "", description="Each tenant's limits, e.g. '100/s, 5000/min' (empty: none)")
    sender_smtp_rate: str = Field(
        "", description="Each SMTP server's limits, e.g. '50/s' (empty: none)")
    sender_relays_file: Path | None = Field(
        None, description="Relay configuration (*.json or *.toml): TLS, AUTH, routes, failover")
    sender_relays: str = Field("", description="The same configuration as inline JSON")
    unsubscribe_secret: SecretStr = Field(
        SecretStr(""), description="Signs one-click unsubscribe links (the API's must match); "
        "empty: no List-Unsubscribe header")
    public_api_url: str = Field(
        f"http://127.0.0.1:{DEFAULT_API_PORT}", description="Base URL of unsubscribe links")
    # The tracker's and the bounce receiver's variables: the sender signs what they verify.
    tracker_keys: SecretStr = Field(
        SecretStr(""), description="The tracker's signing keys ('id:secret,...', the first "
        "signs); empty: mails of tracked campaigns go untracked")
    tracker_public_url: str = Field(
        f"http://127.0.0.1:{DEFAULT_TRACKER_PORT}",
        description="Base URL of the pixels and redirects the sender writes")
    bounce_domain: str = Field(
        "bounces.localhost", description="Domain of the VERP return paths (the bounce "
        "receiver's)")
    bounce_verp_keys: SecretStr = Field(
        SecretStr(""), description="The bounce receiver's VERP keys (the first signs); empty: "
        "no VERP, the From address is the envelope sender")


class ProjectorSettings(Settings):
    projector_lanes: Literal["split", "single"] = Field(
        "split", description="split: one consumer per lane of topics; single: one for all")


class CompletionSettings(Settings):
    autopause_failure_rate: float | Literal["off"] = Field(
        0.5, description="Share of failed deliveries that pauses a campaign ('off': never)")
    autopause_min_deliveries: int = Field(
        100, ge=1, description="Deliveries before the failure rate is judged")
    completion_tracker_instance: str = Field("0", description="Name of this tracker instance")
    completion_tracker_transactional_id: str = Field(
        "", description="Transactional id (empty: derived from the instance name)")

    @field_validator("autopause_failure_rate")
    @classmethod
    def _a_share(cls, value: float | str) -> float | str:
        if isinstance(value, float) and not 0.0 < value <= 1.0:
            raise ValueError("must be in (0, 1] or 'off'")
        return value


class ApiSettings(Settings):
    api_host: str = Field("127.0.0.1", description="Address the API listens on")
    api_port: int = Field(DEFAULT_API_PORT, ge=0, le=65535, description="Port of the API")
    api_keys: SecretStr = Field(
        SecretStr(""), description="'tenant:key' entries, comma-separated")
    api_keys_file: Path | None = Field(
        None, description="A file of 'tenant:key' lines (added to API_KEYS)")
    unsubscribe_secret: SecretStr = Field(
        SecretStr(""), description="Checks one-click unsubscribe links (empty: 503)")
    console_session_secret: SecretStr = Field(
        SecretStr(""), description="Signs console sessions (empty: random per start)")


class SinkSettings(Settings):
    """The SMTP sink (a test and bench relay): it listens on SMTP_HOST:SMTP_PORT."""

    sink_record_path: Path | None = Field(
        None, description="File the sink appends accepted messages to")
    sink_tempfail_rate: float = Field(0.0, ge=0, le=1, description="Share answered 451")
    sink_permfail_rate: float = Field(0.0, ge=0, le=1, description="Share answered 550")
    sink_drop_rate: float = Field(
        0.0, ge=0, le=1, description="Share whose connection drops after DATA, unanswered")
    sink_drop_before_data_rate: float = Field(
        0.0, ge=0, le=1, description="Share whose connection drops at RCPT")
    sink_latency_ms: float = Field(0.0, ge=0, description="Delay before answering DATA")
    sink_seed: int | None = Field(None, description="Seed of the fault draws")
    sink_tls_cert: Path | None = Field(None, description="PEM certificate for TLS")
    sink_tls_key: Path | None = Field(None, description="PEM private key for TLS")
    sink_require_starttls: bool = Field(False, description="Refuse MAIL before STARTTLS")
    sink_implicit_tls: bool = Field(False, description="TLS from the first byte (SMTPS)")
    sink_auth_users: SecretStr = Field(
        SecretStr(""), description="'name:password,...' accounts; AUTH required when set")
    sink_auth_require_tls: bool = Field(True, description="Offer AUTH only over TLS")
    sink_refuse_connections: bool = Field(False, description="Answer every connection 421")
    sink_pipelining: bool = Field(True, description="Offer PIPELINING")
    sink_chunking: bool = Field(True, description="Offer CHUNKING (BDAT)")
    sink_smtputf8: bool = Field(True, description="Offer SMTPUTF8")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Level of the sink's log (DEBUG: a line per message)")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value


class PlatformSettings(Settings):
    """The local platform of `make up`, the tests and the demo."""

    kafka_port: int = Field(DEFAULT_KAFKA_PORT, description="First broker's port")
    kafka_controller_port: int = Field(
        DEFAULT_KAFKA_PORT + 1, description="First KRaft controller's port")
    kafka_brokers: int = Field(
        1, ge=1, description="Nodes: 3 runs brokers on KAFKA_PORT, +2, +4 (controllers +1, +3, +5)")
    kafka_jvm_opts: str = Field("", description="The broker JVM's options (replace the heap bounds)")
    kafka_version: str = Field("", description="Broker version (empty: the pom's)")
    postgres_port: int = Field(DEFAULT_POSTGRES_PORT, description="PostgreSQL's port")
    metrics_base_port: int = Field(
        29400, description="Service i's endpoint listens on this + i")
    api_port: int = Field(DEFAULT_API_PORT, description="The API's port")
    demo_contacts: int = Field(10_000, ge=1, description="Recipients of `make demo`")


class WatchdogSettings(Settings):
    watchdog_stale_seconds: float = Field(
        60.0, gt=0, description="A heartbeat older than this restarts its program")
    watchdog_start_grace_seconds: float = Field(
        120.0, ge=0, description="Time a starting program has before its first heartbeat")
    supervisor_server_url: str = Field("", description="Set by the supervisor")
    supervisor_username: str = Field("", description="Set by the supervisor")
    supervisor_password: SecretStr = Field(SecretStr(""), description="Set by the supervisor")


class BounceSettings(Settings):
    """The bounce receiver (SMTP for the bounce domain) and the providers' webhooks."""

    bounce_domain: str = Field(
        "bounces.localhost", description="Domain of the VERP return paths (bounces+<token>@it)")
    bounce_smtp_host: str = Field("127.0.0.1", description="Address the bounce receiver listens on")
    bounce_smtp_port: int = Field(DEFAULT_BOUNCE_SMTP_PORT, ge=0, le=65535,
                                  description="Port of the bounce receiver")
    bounce_verp_keys: SecretStr = Field(
        SecretStr(""), description="'id:secret,...' VERP keys (id one of a-z, 2-7); the first signs, "
        "all verify")
    bounce_soft_limit: int = Field(
        3, ge=0, description="Soft bounces of that many campaigns in a row suppress (0: never)")
    bounce_kafka_timeout_seconds: float = Field(
        10.0, gt=0, le=120, description="Longest wait for Kafka before a report is answered 451 / 503")
    bounce_trust_headers: bool = Field(
        False, description="Suppress on bounces found only by the returned mail's unsigned headers")
    bounce_webhook_host: str = Field("127.0.0.1", description="Address of the webhook endpoint")
    bounce_webhook_port: int = Field(0, ge=0, le=65535, description="Port of the webhook endpoint (0: none)")
    bounce_sns_topic_arns: str = Field(
        "", description="SNS topics whose SES notifications are taken, comma-separated (empty: any)")
    bounce_sendgrid_public_key: str = Field(
        "", description="SendGrid's ECDSA verification key (base64 DER or PEM; empty: unsigned)")
    bounce_mailgun_signing_key: SecretStr = Field(
        SecretStr(""), description="Mailgun's webhook signing key (empty: Mailgun refused)")
    bounce_postmark_credentials: SecretStr = Field(
        SecretStr(""), description="'user:password' Postmark's webhook must send (empty: Postmark refused)")


class TrackerSettings(Settings):
    """The open and click tracker (services/tracker); senders sign with the same keys."""

    tracker_host: str = Field("127.0.0.1", description="Address the tracker listens on")
    tracker_port: int = Field(DEFAULT_TRACKER_PORT, ge=0, le=65535, description="Its port")
    tracker_keys: SecretStr = Field(
        SecretStr(""), description="'id:secret' signing keys, comma-separated: the first "
        "signs, every one verifies (rotation); empty: tracking off, the tracker refuses to start")
    tracker_public_url: str = Field(
        f"http://127.0.0.1:{DEFAULT_TRACKER_PORT}",
        description="Base URL of pixels and redirects, as recipients reach the tracker")
    tracker_scanner_window_seconds: float = Field(
        10.0, ge=0, description="A click this soon after delivery is taken as a link scanner's")
    tracker_hit_wait_ms: int = Field(
        1000, ge=1, le=30_000, description="Longest wait for Kafka's ack of a hit before the "
        "answer; a hit not acknowledged by then is lost and counted")


# Which classes the README documents, in order, and who reads each.
DOCUMENTED: tuple[tuple[type[Settings], str], ...] = (
    (Settings, "every service"),
    (CommandHandlerSettings, "command handler"),
    (HydratorSettings, "hydrator"),
    (SenderSettings, "sender"),
    (ProjectorSettings, "projector"),
    (CompletionSettings, "completion tracker"),
    (ApiSettings, "API"),
    (SinkSettings, "SMTP sink"),
    (PlatformSettings, "local platform (make up, tests, demo)"),
    (WatchdogSettings, "watchdog"),
    (BounceSettings, "bounce receiver and webhooks"),
    (TrackerSettings, "tracker"),
)


def variable(cls: type[Settings], field_name: str) -> str:
    """The environment variable of a field."""
    alias = cls.model_fields[field_name].validation_alias
    return alias if isinstance(alias, str) else field_name.upper()


def load(cls: type[S]) -> S:
    """`cls` read from the environment; a bad value raises SettingsError naming its variable."""
    try:
        return cls()
    except ValidationError as exc:
        reasons = []
        for error in exc.errors(include_input=False, include_url=False):
            where = str(error["loc"][0]) if error["loc"] else ""
            name = variable(cls, where) if where in cls.model_fields else where.upper()
            reasons.append(f"{name}: {error['msg']}")
        raise SettingsError("; ".join(reasons)) from None


def named_secrets() -> Mapping[str, str]:
    """The variables a configuration names at run time (a relay's password_env)."""
    return os.environ


def child_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment for a child process: this one's plus `extra`."""
    return {**os.environ, **extra}


def load_or_exit(cls: type[S], log: Any) -> S:
    """`load(cls)` for a service's start: a bad value is logged and ends the process (status 2)."""
    try:
        return load(cls)
    except SettingsError as error:
        log.error("invalid settings", error=str(error))
        raise SystemExit(2) from None
