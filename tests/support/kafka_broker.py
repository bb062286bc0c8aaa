"""The real Apache Kafka broker (KRaft mode, no ZooKeeper), started by the repo itself.

The jars come from Maven Central once (``install``, run by ``make install``): the Maven project
in ``tests/support/kafka/pom.xml`` copies ``kafka_2.13`` and its runtime dependencies into
``<venv>/kafka-<version>/libs``. After that nothing is downloaded: a cluster is started with
``java -cp 'libs/*' kafka.Kafka`` on free loopback ports, each node a combined
broker + controller with a static controller quorum.

- ``KafkaCluster.start(brokers=1)``: the single node the integration suite shares (fresh topics
  per test). Group joins are fast (``group.initial.rebalance.delay.ms=0``) and the internal
  topics are small, so a session pays ~5 s for the broker once.
- ``KafkaCluster.start(brokers=3)``: three nodes, a three-voter controller quorum, replication
  factor 3 and ``min.insync.replicas=2`` by default, for tests that restart a broker.
- ``KafkaCluster.start(security=True)``: besides the plain listener, an ``SSL`` listener that
  requires a client certificate (mutual TLS) and a ``SASL_SSL`` listener (SCRAM-SHA-512,
  SCRAM-SHA-256 and PLAIN), with a CA, broker and client certificate generated into the
  cluster's directory (``cluster.tls``) and the SCRAM user created at format time.

For a local pipeline against the real broker: ``make kafka`` (this module's ``run`` command)
starts one and prints its bootstrap address; ``--brokers 3`` starts the cluster.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.servers import free_port, wait_port
from tests.support.tls import make_pki

KAFKA_VERSION = "4.4.0"
HERE = Path(__file__).resolve().parent / "kafka"
POM = HERE / "pom.xml"
LOG_CONFIG = HERE / "log4j2.yaml"


def kafka_home() -> Path:
    """Where the jars live: ``$SLUICE_KAFKA_HOME`` or ``<venv>/kafka-<version>``."""
    env = os.environ.get("SLUICE_KAFKA_HOME")
    return Path(env) if env else Path(sys.prefix) / f"kafka-{KAFKA_VERSION}"


def libs_dir() -> Path:
    return kafka_home() / "libs"


def _stamp() -> Path:
    return kafka_home() / ".resolved"


def is_installed() -> bool:
    return _stamp().is_file() and _stamp().read_text().strip() == POM.read_text().strip()


def install(*, quiet: bool = True) -> Path:
    """Resolve the broker's jars with Maven into ``libs_dir()`` (once; a stamp holds the pom
    it was resolved from, so editing the pom re-resolves)."""
    if is_installed():
        return libs_dir()
    mvn = shutil.which("mvn")
    if mvn is None:
        raise RuntimeError("Maven (mvn) is needed once to fetch the Kafka broker's jars")
    libs = libs_dir()
    shutil.rmtree(libs, ignore_errors=True)
    libs.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        mvn,
        "-B",
        *(["-q"] if quiet else []),
        "-f",
        str(POM),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={libs}",
        "-DincludeScope=runtime",
    ]
    t0 = time.monotonic()
    subprocess.run(cmd, check=True)
    jars = sorted(p.name for p in libs.glob("*.jar"))
    if not any(j.startswith(f"kafka_2.13-{KAFKA_VERSION}") for j in jars):
        raise RuntimeError(f"Maven ran but {libs} has no kafka_2.13-{KAFKA_VERSION}.jar")
    _stamp().write_text(POM.read_text())
    print(
        f"kafka {KAFKA_VERSION}: {len(jars)} jars in {libs} ({time.monotonic() - t0:.1f} s)",
        file=sys.stderr,
    )
    return libs


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return str(Path(home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("Java 17+ is needed to run the Kafka broker")
    return java


SASL_USER = "sluice"
SASL_MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a test CA, the brokers' certificate and a client certificate, all signed
    by the CA; the broker's names ``localhost`` and ``127.0.0.1``."""

    ca: Path
    broker: Path
    """The broker's key store: PKCS#8 private key, then its certificate (Kafka's PEM type)."""
    client_cert: Path
    client_key: Path
    other_ca: Path
    """A CA that signed nothing here: trusting it instead of ``ca`` must fail."""


def make_tls_files(root: Path) -> TlsFiles:
    """The test PKI (``tests.support.tls.make_pki``) as a Kafka broker reads it: its key store
    is the server's PKCS#8 key followed by its certificate (Kafka's PEM type)."""
    pki = make_pki(root)
    broker = root / "broker-keystore.pem"
    broker.write_bytes(pki.read("server_key") + pki.read("server_cert"))
    broker.chmod(0o600)
    return TlsFiles(
        ca=pki.ca,
        broker=broker,
        client_cert=pki.client_cert,
        client_key=pki.client_key,
        other_ca=pki.other_ca,
    )


@dataclass
class KafkaNode:
    """One combined broker + controller process."""

    node_id: int
    port: int
    controller_port: int
    workdir: Path
    config: Path
    proc: subprocess.Popen[bytes] | None = None
    ssl_port: int = 0
    """Mutual-TLS listener (``security=True`` clusters only)."""
    sasl_ssl_port: int = 0
    """SASL over TLS listener (``security=True`` clusters only)."""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "broker.log"

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def launch(self, heap: str) -> None:
        cmd = [
            _java(),
            f"-Xmx{heap}",
            "-Xms128m",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={LOG_CONFIG}",
            "-cp",
            f"{libs_dir()}/*",
            "kafka.Kafka",
            str(self.config),
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM: a controlled shutdown (leadership moves off first); SIGKILL if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class KafkaCluster:
    """A KRaft cluster of ``len(nodes)`` combined nodes on loopback."""

    nodes: list[KafkaNode]
    root: Path
    cluster_id: str
    heap: str
    tls: TlsFiles | None = None
    """Certificates of a ``security=True`` cluster."""
    sasl_password: str = ""
    """Password of ``SASL_USER`` for every mechanism of a ``security=True`` cluster."""
    _stopped: bool = field(default=False, repr=False)

    name = "kafka"

    @property
    def bootstrap(self) -> str:
        return ",".join(n.address for n in self.nodes)

    @property
    def ssl_bootstrap(self) -> str:
        """The mutual-TLS listeners (a client certificate signed by ``tls.ca`` required)."""
        return ",".join(f"127.0.0.1:{n.ssl_port}" for n in self.nodes if n.ssl_port)

    @property
    def sasl_ssl_bootstrap(self) -> str:
        """The SASL_SSL listeners (``SASL_USER``/``sasl_password``, server-only TLS)."""
        return ",".join(f"127.0.0.1:{n.sasl_ssl_port}" for n in self.nodes if n.sasl_ssl_port)

    # The same surface as tests.support.servers.Server, so fixtures can hand either out.
    @property
    def address(self) -> str:
        return self.bootstrap

    def log_tail(self, n: int = 4000) -> str:
        return "\n".join(f"--- node {x.node_id}\n{x.log_tail(n)}" for x in self.nodes)

    @classmethod
    def start(
        cls,
        brokers: int = 1,
        *,
        port: int | None = None,
        heap: str | None = None,
        extra: dict[str, str] | None = None,
        root: Path | None = None,
        timeout: float = 90.0,
        security: bool = False,
    ) -> KafkaCluster:
        """Format KRaft storage for ``brokers`` nodes, start them, and wait until every broker
        is registered and answers metadata requests. ``security`` adds the SSL and SASL_SSL
        listeners (see the module doc); brokers talk to each other on the plain one."""
        if brokers < 1:
            raise ValueError("brokers must be >= 1")
        if not is_installed():
            raise RuntimeError(
                f"the Kafka {KAFKA_VERSION} jars are not in {libs_dir()}: run `make install` "
                "(or `python -m tests.support.kafka_broker install`)"
            )
        root = root or Path(tempfile.mkdtemp(prefix="sluice-kafka-"))
        heap = heap or ("1g" if brokers == 1 else "512m")
        cluster_id = _cluster_id()
        ports = [(port if (port and i == 0) else free_port(), free_port()) for i in range(brokers)]
        voters = ",".join(f"{i + 1}@127.0.0.1:{c}" for i, (_, c) in enumerate(ports))
        rf = min(3, brokers)
        base = _broker_config(rf, voters)
        tls = make_tls_files(root / "tls") if security else None
        password = uuid.uuid4().hex if security else ""
        if tls is not None:
            base |= _security_config(tls, password)
        base |= extra or {}
        nodes = []
        for i, (p, c) in enumerate(ports):
            workdir = root / f"node-{i + 1}"
            (workdir / "data").mkdir(parents=True)
            listeners = {"PLAINTEXT": p}
            if security:
                listeners |= {"SSL": free_port(), "SASL_SSL": free_port()}
            advertised = ",".join(f"{k}://127.0.0.1:{v}" for k, v in listeners.items())
            props = base | {
                "node.id": str(i + 1),
                "listeners": f"{advertised},CONTROLLER://127.0.0.1:{c}",
                "advertised.listeners": advertised,
                "log.dirs": str(workdir / "data"),
            }
            config = workdir / "server.properties"
            config.write_text("".join(f"{k}={v}\n" for k, v in sorted(props.items())))
            nodes.append(
                KafkaNode(
                    i + 1,
                    p,
                    c,
                    workdir,
                    config,
                    ssl_port=listeners.get("SSL", 0),
                    sasl_ssl_port=listeners.get("SASL_SSL", 0),
                )
            )
        cluster = cls(nodes, root, cluster_id, heap, tls=tls, sasl_password=password)
        atexit.register(cluster.stop)
        try:
            scram = [f"{m}=[name={SASL_USER},password={password}]" for m in SASL_MECHANISMS[:2]]
            _format(nodes, cluster_id, scram if security else [])
            for n in nodes:
                n.launch(heap)
            cluster.wait_ready(timeout)
        except BaseException as exc:
            tail = cluster.log_tail()
            cluster.stop()
            raise RuntimeError(f"kafka did not start: {exc!r}\n{tail}") from exc
        return cluster

    def wait_ready(self, timeout: float = 90.0, nodes: list[KafkaNode] | None = None) -> None:
        """Until every running node listens and the cluster reports all its brokers."""
        deadline = time.monotonic() + timeout
        for n in nodes or self.nodes:
            wait_port(n.port, timeout=max(1.0, deadline - time.monotonic()), proc=n.proc)
        want = {n.node_id for n in self.nodes if n.running}
        last: object = None
        while time.monotonic() < deadline:
            try:
                seen = _registered_brokers(self.bootstrap)
                if want <= seen:
                    return
                last = f"brokers registered: {sorted(seen)}, want {sorted(want)}"
            except Exception as exc:  # not answering yet
                last = exc
            time.sleep(0.2)
        raise TimeoutError(f"kafka not ready after {timeout:.0f} s: {last}")

    def restart(self, index: int, *, hard: bool = False) -> None:
        """Stop node ``index`` (SIGKILL when ``hard``, else a controlled shutdown), start it
        again on the same ports and data, and wait until it has rejoined."""
        node = self.nodes[index]
        node.kill() if hard else node.stop()
        node.launch(self.heap)
        self.wait_ready(nodes=[node])

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        # Stop followers first and the whole set in parallel: a controlled shutdown of the
        # last voter cannot move leadership anywhere and would wait out its timeout.
        for n in self.nodes:
            if n.proc is not None and n.proc.poll() is None:
                n.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for n in self.nodes:
            if n.proc is None:
                continue
            try:
                n.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                n.kill()
        shutil.rmtree(self.root, ignore_errors=True)


def _broker_config(rf: int, voters: str) -> dict[str, str]:
    """Settings of every node. Production defaults except where a test broker needs fast
    group joins and small internal topics; replication follows the cluster size."""
    return {
        "process.roles": "broker,controller",
        "controller.quorum.voters": voters,
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        # No 3 s wait for more members before the first assignment of a new group.
        "group.initial.rebalance.delay.ms": "0",
        # Internal topics: few partitions (created on first use; 50 each by default).
        "offsets.topic.num.partitions": "4",
        "transaction.state.log.num.partitions": "4",
        "offsets.topic.replication.factor": str(rf),
        "transaction.state.log.replication.factor": str(rf),
        "transaction.state.log.min.isr": str(min(2, rf)),
        "share.coordinator.state.topic.replication.factor": str(rf),
        "share.coordinator.state.topic.min.isr": str(min(2, rf)),
        "default.replication.factor": str(rf),
        "min.insync.replicas": str(min(2, rf)),
        "num.partitions": "1",
        "auto.create.topics.enable": "true",
        # Small segments and no flush tuning: tests write little; keep disk use low.
        "log.segment.bytes": str(64 * 1024 * 1024),
        "num.network.threads": "2",
        "num.io.threads": "4",
    }


def _security_config(tls: TlsFiles, password: str) -> dict[str, str]:
    """The SSL listener wants a client certificate from the CA (mutual TLS); the SASL_SSL one
    authenticates ``SASL_USER`` by SCRAM (users stored in the metadata log at format time) or
    PLAIN (users in the JAAS line). Both present the broker certificate, PEM files as is."""
    scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    plain = (
        "org.apache.kafka.common.security.plain.PlainLoginModule required "
        f'user_{SASL_USER}="{password}";'
    )
    return {
        "listener.security.protocol.map": (
            "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL"
        ),
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(tls.broker),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(tls.ca),
        "listener.name.ssl.ssl.client.auth": "required",
        "listener.name.sasl_ssl.ssl.client.auth": "none",
        "listener.name.sasl_ssl.sasl.enabled.mechanisms": ",".join(SASL_MECHANISMS),
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": scram,
        "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config": scram,
        "listener.name.sasl_ssl.plain.sasl.jaas.config": plain,
    }


def _cluster_id() -> str:
    """A random cluster id as Kafka's ``Uuid.randomUuid`` makes one: URL-safe base64 of 16
    random bytes, never starting with '-' (1 in 64 would, and a command line would read it as
    an option)."""
    while (cid := base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))[0] == "-":
        pass
    return cid


def _format(nodes: list[KafkaNode], cluster_id: str, scram: list[str]) -> None:
    """``kafka-storage format`` for every node at once (static quorum: no --standalone);
    ``scram`` credentials (``MECHANISM=[name=..,password=..]``) are written into the initial
    metadata."""
    procs = []
    for node in nodes:
        cmd = [
            _java(),
            "-Xmx256m",
            "-XX:TieredStopAtLevel=1",
            f"-Dlog4j2.configurationFile={LOG_CONFIG}",
            "-cp",
            f"{libs_dir()}/*",
            "kafka.tools.StorageTool",
            "format",
            f"--cluster-id={cluster_id}",
            "--config",
            str(node.config),
            *(a for cred in scram for a in ("--add-scram", cred)),
        ]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(
                f"kafka-storage format failed: {out.decode(errors='replace')[-3000:]}"
            )


def _registered_brokers(bootstrap: str) -> set[int]:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap.split(","), request_timeout_ms=5000, client_id="sluice-probe"
    )
    try:
        info = admin.describe_cluster()
        return {int(b["broker_id"]) for b in info["brokers"] if not b.get("is_fenced")}
    finally:
        admin.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tests.support.kafka_broker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install", help="resolve the broker's jars from Maven Central (once)")
    run = sub.add_parser("run", help="start a cluster and keep it up until Ctrl-C")
    run.add_argument("--brokers", type=int, default=1)
    run.add_argument("--port", type=int, default=9092, help="first broker's port (0 = free)")
    args = ap.parse_args(argv)
    if args.cmd == "install":
        install(quiet=False)
        print(libs_dir())
        return 0
    install(quiet=False)
    t0 = time.monotonic()
    cluster = KafkaCluster.start(args.brokers, port=args.port or None)
    print(
        f"Apache Kafka {KAFKA_VERSION} ({args.brokers} broker(s)) ready in "
        f"{time.monotonic() - t0:.1f} s\nSLUICE_KAFKA_BOOTSTRAP={cluster.bootstrap}\n"
        "(Ctrl-C to stop)",
        flush=True,
    )

    def _interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
