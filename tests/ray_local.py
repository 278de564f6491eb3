"""A real local Ray cluster for tests: ``ray start --head`` (plus worker nodes) on 127.0.0.1 with token
authentication on, the dashboard / Jobs API bound to 127.0.0.1, and a private temp dir.

Why not ``ray stop`` in teardown: it kills every Ray process on the machine by name, including other test
runs' embedded clusters. Each node here runs ``ray start --block`` in its own session; teardown ends that
session's processes and any process whose command line names this cluster's private temp dir.
Why a private ``--temp-dir``: a bare ``ray.init()`` elsewhere on the machine joins the cluster recorded in
``/tmp/ray/ray_current_cluster``; this cluster is recorded only under its own directory.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
RAY = str(ROOT / ".venv/bin/ray") if (ROOT / ".venv/bin/ray").exists() else shutil.which("ray") or "ray"


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@dataclass
class LocalRayCluster:
    temp_dir: Path
    token: str
    gcs_address: str                    # 127.0.0.1:PORT, for ray.init / --ray-address
    dashboard_url: str                  # http://127.0.0.1:PORT, the Jobs API
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to talk to this cluster (the token never leaves the environment)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster: its nodes' sessions plus anything naming its temp dir."""
        marker, found = str(self.temp_dir), {}
        sessions = {p.pid for p in self.procs}
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmd = " ".join(proc.info["cmdline"] or [])
                if marker in cmd or os.getsid(proc.pid) in sessions:
                    found[proc.pid] = proc
            except (psutil.Error, ProcessLookupError):
                continue
        found.pop(os.getpid(), None)
        return list(found.values())

    def log_tail(self, chars: int = 3000) -> str:
        return "\n".join(p.read_text(errors="replace")[-chars:] for p in self.logs if p.exists())

    def stop(self) -> None:
        for proc in self.procs:  # `ray start --block` shuts its node down on SIGTERM
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
        leftovers = self.processes()
        for proc in leftovers:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(leftovers, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _start_node(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as fh:
        return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args], env=env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


@contextlib.contextmanager
def local_ray_cluster(head_cpus: int = 2, worker_nodes: int = 0, worker_cpus: int = 1,
                      timeout: float = 90) -> Iterator[LocalRayCluster]:
    # One retry: on a busy 2-core box a node's start-up can lose a port race or time out; a test about the
    # pipeline should not fail on that. A second failure is reported with the nodes' logs.
    for attempt in (1, 2):
        try:
            cluster = _start_cluster(head_cpus, worker_nodes, worker_cpus, timeout)
            break
        except (RuntimeError, TimeoutError):
            if attempt == 2:
                raise
    try:
        yield cluster
    finally:
        cluster.stop()


def _start_cluster(head_cpus: int, worker_nodes: int, worker_cpus: int, timeout: float) -> LocalRayCluster:
    # Short path: Ray's unix sockets live under it and must stay under ~100 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="jr", dir="/tmp"))
    token = secrets.token_hex(32)
    gcs, dash, agent, agent_grpc, client, metrics, rt_env = free_ports(7)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           # job entrypoints call `python`: the project's interpreter, as on a provisioned cluster
           "PATH": f"{ROOT / '.venv/bin'}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    cluster = LocalRayCluster(temp_dir, token, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}")
    head_log = temp_dir / "head.log"
    cluster.logs.append(head_log)
    cluster.procs.append(_start_node(
        ["--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--num-cpus", str(head_cpus),
         "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
         "--ray-client-server-port", str(client), "--metrics-export-port", str(metrics),
         "--runtime-env-agent-port", str(rt_env), "--temp-dir", str(temp_dir)], env, head_log))
    try:
        _wait_nodes(cluster, 1, timeout)
        for i in range(worker_nodes):
            agent, agent_grpc, metrics, rt_env = free_ports(4)
            log = temp_dir / f"worker{i}.log"
            cluster.logs.append(log)
            cluster.procs.append(_start_node(
                ["--address", cluster.gcs_address, "--node-ip-address", "127.0.0.1", "--num-cpus",
                 str(worker_cpus), "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port",
                 str(agent_grpc), "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(rt_env)],
                env, log))
        _wait_nodes(cluster, 1 + worker_nodes, timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_nodes(cluster: LocalRayCluster, count: int, timeout: float) -> None:
    """Until the Jobs API answers (with the token) and lists ``count`` alive nodes."""
    import requests

    deadline, last = time.monotonic() + timeout, ""
    headers = {"Authorization": f"Bearer {cluster.token}"}
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in cluster.procs):
            raise RuntimeError(f"a Ray node exited during start-up:\n{cluster.log_tail()}")
        try:
            r = requests.get(f"{cluster.dashboard_url}/nodes?view=summary", headers=headers, timeout=5)
            alive = [n for n in r.json()["data"]["summary"] if n["raylet"]["state"] == "ALIVE"] if r.ok else []
            if r.ok and len(alive) >= count:
                requests.get(f"{cluster.dashboard_url}/api/jobs/", headers=headers, timeout=5).raise_for_status()
                return
            last = f"HTTP {r.status_code}, {len(alive)} alive"
        except (requests.RequestException, KeyError, ValueError) as exc:
            last = str(exc)
        time.sleep(1)
    raise TimeoutError(f"Ray cluster not up after {timeout}s ({last}):\n{cluster.log_tail()}")
