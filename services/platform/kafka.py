"""A single-node Apache Kafka broker in KRaft mode, from jars that Maven resolves.

The version lives in deploy/kafka/pom.xml (property kafka.version); KAFKA_VERSION overrides it.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

from confluent_kafka.admin import AdminClient

from services.platform.processes import ManagedProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
POM = REPO_ROOT / "deploy" / "kafka" / "pom.xml"
LOG4J = REPO_ROOT / "deploy" / "kafka" / "log4j2.properties"
# A broker that has not answered metadata requests by then failed to start.
STARTUP_TIMEOUT_SECONDS = 90.0

# The broker's JVM: heap bounds only, for now (KAFKA_JVM_OPTS replaces them, split on spaces).
DEFAULT_JVM_OPTIONS = ("-Xms256m", "-Xmx1g")


def jvm_options() -> list[str]:
    """JVM options for the broker: KAFKA_JVM_OPTS if set, else DEFAULT_JVM_OPTIONS."""
    override = os.environ.get("KAFKA_JVM_OPTS", "").split()
    return override or list(DEFAULT_JVM_OPTIONS)


def new_cluster_id() -> str:
    """A random KRaft cluster id: 16 bytes, URL-safe base64, never starting with '-'.

    Kafka's own Uuid.randomUuid redraws such ids: StorageTool's argument parser takes
    "-t -abc..." for a missing value and an unknown option (CI hit it, 1 format in 64).
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def kafka_version() -> str:
    """The broker version: KAFKA_VERSION, else the pom's kafka.version property."""
    override = os.environ.get("KAFKA_VERSION")
    if override:
        return override
    match = re.search(r"<kafka.version>([^<]+)</kafka.version>", POM.read_text())
    assert match, "deploy/kafka/pom.xml lost its kafka.version property"
    return match.group(1)


def fetch_jars(libs_dir: Path) -> Path:
    """Resolve the broker and its runtime dependencies into libs_dir (once per version)."""
    version = kafka_version()
    target = libs_dir / version
    if (target / f"kafka_2.13-{version}.jar").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "mvn", "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
            f"-DoutputDirectory={target}", "-DincludeScope=runtime",
            f"-Dkafka.version={version}",
        ],
        check=True,
    )
    return target


class KafkaNode:
    """One broker+controller process with its own data folder and loopback ports."""

    def __init__(self, state_dir: Path, port: int, controller_port: int, libs_dir: Path) -> None:
        self.state_dir = state_dir
        self.port = port
        self.controller_port = controller_port
        self.libs_dir = libs_dir
        self.home = state_dir / "kafka"
        self.process = ManagedProcess("kafka", [], state_dir)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        self.home.mkdir(parents=True, exist_ok=True)
        conf = self.home / "server.properties"
        conf.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
                    f"listeners=PLAINTEXT://127.0.0.1:{self.port},"
                    f"CONTROLLER://127.0.0.1:{self.controller_port}",
                    f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                    "controller.listener.names=CONTROLLER",
                    "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                    "inter.broker.listener.name=PLAINTEXT",
                    f"log.dirs={self.home / 'data'}",
                    "num.partitions=1",
                    # One broker: the internal topics cannot have more than one replica.
                    "offsets.topic.replication.factor=1",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "share.coordinator.state.topic.replication.factor=1",
                    "share.coordinator.state.topic.min.isr=1",
                    # Topics come from the catalogue; a typo must fail, not create a topic.
                    "auto.create.topics.enable=false",
                    "group.initial.rebalance.delay.ms=0",
                    "",
                ]
            )
        )
        return conf

    def start(self) -> None:
        libs = fetch_jars(self.libs_dir)
        conf = self._write_config()
        classpath = f"{libs}/*"
        java = ["java", *jvm_options(), f"-Dlog4j2.configurationFile={LOG4J}", "-cp", classpath]
        if not (self.home / "data" / "meta.properties").exists():
            subprocess.run(
                [*java, "kafka.tools.StorageTool", "format",
                 f"--cluster-id={new_cluster_id()}", "-c", str(conf)],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        self.process.argv = [*java, "kafka.Kafka", str(conf)]
        self.process.start()
        self.wait_ready()

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        # log_level 0: connection-refused noise while the broker boots is expected, not news.
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.pid() is None:
                raise RuntimeError(f"Kafka exited during start; see {self.process.log_file}")
            try:
                admin.list_topics(timeout=2)
                return
            except Exception as exc:  # not up yet
                last = exc
                time.sleep(0.5)
        raise TimeoutError(f"Kafka did not answer on {self.bootstrap}: {last}")

    def stop(self) -> bool:
        return self.process.stop()
