"""Apache Kafka in KRaft mode, from jars that Maven resolves: one node, or a cluster of N.

Every node is broker and controller at once; a cluster's nodes are its controller quorum
(static voters), so one of three may fail, the active controller included, and the cluster
still elects a leader for every partition. Replication follows the size: with three or more
nodes topics (and the offsets and transaction logs) get 3 replicas and min.insync.replicas 2,
on one node 1 and 1. The version lives in deploy/kafka/pom.xml (property kafka.version);
KAFKA_VERSION overrides it.
"""

from __future__ import annotations

import base64
import re
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from confluent_kafka.admin import AdminClient

from services.common.settings import PlatformSettings, load
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
    override = load(PlatformSettings).kafka_jvm_opts.split()
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
    override = load(PlatformSettings).kafka_version
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
    """One broker+controller process with its own data folder and loopback ports. Alone
    (the default) it is a single-node cluster; `voters` makes it one node of a quorum."""

    def __init__(self, state_dir: Path, port: int, controller_port: int, libs_dir: Path, *,
                 node_id: int = 1, voters: str | None = None, cluster_size: int = 1) -> None:
        self.state_dir = state_dir
        self.port = port
        self.controller_port = controller_port
        self.libs_dir = libs_dir
        self.node_id = node_id
        self.voters = voters or f"{node_id}@127.0.0.1:{controller_port}"
        self.cluster_size = cluster_size
        # A single node keeps the folder and pid file names it always had.
        self.name = "kafka" if cluster_size == 1 else f"kafka-{node_id}"
        self.home = state_dir / self.name
        self.process = ManagedProcess(self.name, [], state_dir)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        self.home.mkdir(parents=True, exist_ok=True)
        conf = self.home / "server.properties"
        replicas = min(3, self.cluster_size)
        min_isr = min(2, self.cluster_size)
        conf.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    f"node.id={self.node_id}",
                    f"controller.quorum.voters={self.voters}",
                    f"listeners=PLAINTEXT://127.0.0.1:{self.port},"
                    f"CONTROLLER://127.0.0.1:{self.controller_port}",
                    f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                    "controller.listener.names=CONTROLLER",
                    "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                    "inter.broker.listener.name=PLAINTEXT",
                    f"log.dirs={self.home / 'data'}",
                    "num.partitions=1",
                    # Topics are created with the cluster's default replication (ensure_topics),
                    # and so are the internal offsets and transaction logs.
                    f"default.replication.factor={replicas}",
                    f"min.insync.replicas={min_isr}",
                    f"offsets.topic.replication.factor={replicas}",
                    f"transaction.state.log.replication.factor={replicas}",
                    f"transaction.state.log.min.isr={min_isr}",
                    f"share.coordinator.state.topic.replication.factor={replicas}",
                    f"share.coordinator.state.topic.min.isr={min_isr}",
                    # Topics come from the catalogue; a typo must fail, not create a topic.
                    "auto.create.topics.enable=false",
                    "group.initial.rebalance.delay.ms=0",
                    # A killed node's partitions get new leaders after this, not the default 9 s.
                    "broker.heartbeat.interval.ms=500",
                    "broker.session.timeout.ms=3000",
                    "",
                ]
            )
        )
        return conf

    def start(self) -> None:
        self.launch(new_cluster_id())
        self.wait_ready()

    def launch(self, cluster_id: str) -> None:
        """Format the data folder with `cluster_id` on first use and start the process,
        without waiting: a quorum's nodes answer only once enough of them run."""
        libs = fetch_jars(self.libs_dir)
        conf = self._write_config()
        classpath = f"{libs}/*"
        java = ["java", *jvm_options(), f"-Dlog4j2.configurationFile={LOG4J}", "-cp", classpath]
        if not (self.home / "data" / "meta.properties").exists():
            subprocess.run(
                [*java, "kafka.tools.StorageTool", "format",
                 f"--cluster-id={cluster_id}", "-c", str(conf)],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        self.process.argv = [*java, "kafka.Kafka", str(conf)]
        self.process.start()

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


class KafkaCluster:
    """KafkaNodes on loopback, one per (broker port, controller port) pair, node ids from 1.
    One pair is the single node of before, with the same folders."""

    def __init__(self, state_dir: Path, ports: Sequence[tuple[int, int]], libs_dir: Path) -> None:
        if not ports:
            raise ValueError("a Kafka cluster needs at least one node")
        self.state_dir = state_dir
        voters = ",".join(f"{i + 1}@127.0.0.1:{c}" for i, (_, c) in enumerate(ports))
        self.nodes = [
            KafkaNode(state_dir, p, c, libs_dir, node_id=i + 1, voters=voters, cluster_size=len(ports))
            for i, (p, c) in enumerate(ports)
        ]

    @property
    def bootstrap(self) -> str:
        return ",".join(node.bootstrap for node in self.nodes)

    def node(self, node_id: int) -> KafkaNode:
        return self.nodes[node_id - 1]

    def _cluster_id(self) -> str:
        """The id the nodes were formatted with (kept in meta.properties), or a new one."""
        for node in self.nodes:
            meta = node.home / "data" / "meta.properties"
            if meta.exists():
                match = re.search(r"^cluster\.id=(.+)$", meta.read_text(), re.MULTILINE)
                if match:
                    return match.group(1).strip()
        return new_cluster_id()

    def start(self) -> None:
        cluster_id = self._cluster_id()
        for node in self.nodes:
            node.launch(cluster_id)
        for node in self.nodes:
            node.wait_ready()

    def restart(self, node_id: int) -> None:
        """Start one node again (after a crash) and wait until it answers."""
        node = self.node(node_id)
        node.launch(self._cluster_id())
        node.wait_ready()

    def controller(self) -> int:
        """The node id of the active controller, as the cluster reports it."""
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        found: int = admin.describe_cluster(request_timeout=10).result(timeout=15).controller.id
        return found

    def stop(self) -> bool:
        stopped = [node.stop() for node in self.nodes]
        return any(stopped)

    def pids(self) -> dict[str, int]:
        """Running nodes by name (`kafka`, or `kafka-1` ... in a cluster)."""
        found = {}
        for node in self.nodes:
            pid = node.process.pid()
            if pid is not None:
                found[node.name] = pid
        return found
