"""Real servers the tests talk to, started on 127.0.0.1: a Ray head, moto's S3, an MLflow server.

Each uses free ports and its own temp dir so that several test sessions on one machine do not
collide, and each is stopped by killing its own process group (never `ray stop`, which would kill
every Ray on the machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port(avoid: range | None = None) -> int:
    while True:
        with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if avoid is None or port not in avoid:
            return port


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited early with code {proc.returncode}")
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - any failure means "not ready yet"
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s")


def http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=2) as resp:  # noqa: S310 - loopback only
        return resp.status == 200


def stop_process_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def _node_ports() -> tuple[list[str], callable]:
    """`ray start` flags giving a node its own free ports (worker ports first, then every other
    port outside that range: Ray refuses overlaps), and the picker for further ports."""
    min_worker = free_port()
    workers = range(min_worker, min_worker + 201)

    def port() -> int:
        return free_port(avoid=workers)

    flags = [
        f"--dashboard-agent-listen-port={port()}", f"--dashboard-agent-grpc-port={port()}",
        f"--runtime-env-agent-port={port()}", f"--metrics-export-port={port()}",
        f"--object-manager-port={port()}", f"--node-manager-port={port()}",
        f"--min-worker-port={workers.start}", f"--max-worker-port={workers.stop - 1}",
    ]
    return flags, port


def _start_node(cmd: list[str], extra_env: dict[str, str], log_path: Path) -> subprocess.Popen:
    # Job entrypoints (`python pipelines/train.py`) must find this environment's python.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra_env}
    log = open(log_path, "wb")  # noqa: SIM115 - kept open for the process' lifetime
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@dataclass
class RayHead:
    """`ray start --head --block` in its own process group, with its own ports and temp dir."""

    num_cpus: int = 4
    object_store_bytes: int = 400 * 1024**2
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    gcs_port: int = 0
    dashboard_port: int = 0
    temp_dir: str = ""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, log_path: Path) -> "RayHead":
        flags, port = _node_ports()
        self.gcs_port, self.dashboard_port = port(), port()
        # Short path: Ray's unix sockets live under the temp dir and have a 107-byte limit.
        self.temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
        cmd = [
            str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
            f"--num-cpus={self.num_cpus}", f"--object-store-memory={self.object_store_bytes}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={port()}",
            *flags, f"--temp-dir={self.temp_dir}",
        ]
        self.proc = _start_node(cmd, self.env, log_path)
        # A head with token auth (env RAY_AUTH_TOKEN) answers only requests that carry the token.
        token = self.env.get("RAY_AUTH_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else None
        wait_until(lambda: http_ok(f"{self.dashboard_url}/api/version", headers), 120, "ray head", self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            # `ray start --block` cleans up slowly on SIGTERM; its children share the group.
            stop_process_group(self.proc, timeout=5)
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


@dataclass
class RayWorkerNode:
    """`ray start --address=<head> --block`: one more node of `head`'s cluster, in its own process
    group and temp dir (so it shares no disk state with the others), carrying a custom resource
    named `name` so tests can tell which node is which (`ray.util.state.list_nodes`)."""

    head: RayHead
    name: str
    num_cpus: int = 2
    object_store_bytes: int = 200 * 1024**2
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    temp_dir: str = ""

    def start(self, log_path: Path) -> "RayWorkerNode":
        flags, _ = _node_ports()
        self.temp_dir = tempfile.mkdtemp(prefix="rw", dir="/tmp")
        cmd = [
            str(BIN / "ray"), "start", f"--address={self.head.address}", "--block", "--disable-usage-stats",
            "--node-ip-address=127.0.0.1", f"--num-cpus={self.num_cpus}",
            f"--object-store-memory={self.object_store_bytes}", f'--resources={{"{self.name}": 1}}',
            *flags, f"--temp-dir={self.temp_dir}",
        ]
        self.proc = _start_node(cmd, self.env, log_path)
        # Generous: on a loaded 2-core machine a node's start has taken 2 minutes.
        wait_until(lambda: self.node_id() is not None, 300, f"ray node {self.name} (log: {log_path})", self.proc)
        return self

    def node_id(self) -> str | None:
        """This node's id while the cluster lists it alive."""
        from ray.util.state import list_nodes

        # Filtered in Python: the state API's ("state", "=", "ALIVE") filter misses nodes that
        # joined after another node died (Ray 2.60).
        for node in list_nodes(address=self.head.dashboard_url):
            if node.state == "ALIVE" and self.name in (node.resources_total or {}):
                return node.node_id
        return None

    def kill(self) -> None:
        """A node loss: SIGKILL to the raylet and everything it started (no clean shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, timeout=5)
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


@dataclass
class MotoS3:
    """moto's ThreadedMotoServer: a real HTTP S3 endpoint on loopback."""

    server: object = None
    port: int = 0

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MotoS3":
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


@dataclass
class MlflowServer:
    """`mlflow server` with a sqlite backend and artifacts on local disk (served through it)."""

    root: Path
    proc: subprocess.Popen | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MlflowServer":
        self.port = free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", (self.root / "artifacts").as_uri(), "--workers", "1",
        ]
        log = open(self.root / "server.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: http_ok(f"{self.url}/health"), 120, "mlflow server", self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)

