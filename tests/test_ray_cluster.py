"""Ray clusters: configs/ray/cluster.yaml passes Ray's own cluster-config validation and keeps the security
defaults, and a pipeline run on a local multi-node Ray cluster survives worker processes killed mid-stage
with exactly the output of a clean run."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import ROOT
from tests.ray_local import local_ray_cluster

CLUSTER_YAML = ROOT / "configs/ray/cluster.yaml"


def shard_digests(run_dir: Path) -> list[tuple[str, str]]:
    from pipeline.shards import Manifest

    return [(s.path, s.sha256) for s in Manifest.load(run_dir).shards]


# ------------------------------------------------------------------------------- cluster config
def test_cluster_yaml_passes_rays_config_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    config = prepare_config(copy.deepcopy(raw))     # what `ray up` does before launching anything
    validate_config(config)                         # Ray's JSON schema + node-type consistency
    assert config["provider"]["type"] == "aws"
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert workers and all(v["max_workers"] >= 1 for v in workers.values())
    # The schema is strict: the same file with one unknown key is rejected, so the check above has teeth.
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["head"]["instance_typo"] = "m7i.4xlarge"
    with pytest.raises(Exception, match="instance_typo"):
        validate_config(prepare_config(broken))


def test_cluster_yaml_keeps_auth_on_dashboard_local_and_no_secrets():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in ray_starts)
    head = next(c for c in config["head_start_ray_commands"] if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head
    text = CLUSTER_YAML.read_text()
    assert "0.0.0.0" not in text and "RAY_AUTH_MODE=disabled" not in text
    # Any key that names a credential may only point at a file (copied from the operator's machine).
    for key, value in _walk(config):
        if re.search(r"(?i)password|secret|token|access_key|credential", str(key)):
            assert isinstance(value, str) and value.startswith(("~/", "/")), (key, value)
    assert not re.search(r"RAY_AUTH_TOKEN=\S", text)      # never a token on a command line
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)        # an AWS access key id
    # The token reaches the nodes as a file copied from the operator's machine, not as a value in here.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def _walk(node, key=None):
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from _walk(v, k)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)


# ----------------------------------------------------------------------------------- worker kill
def _unit_processes(cluster, title: str, node_session: int) -> list[psutil.Process]:
    """Ray worker processes of one node whose process title says they are running ``title``."""
    found = []
    for proc in cluster.processes():
        try:
            cmd = " ".join(proc.cmdline())
            if cmd.startswith(title) and os.getsid(proc.pid) == node_session:
                found.append(proc)
        except (psutil.Error, ProcessLookupError):
            continue
    return found


@pytest.mark.slow
@pytest.mark.realdata
def test_worker_killed_mid_stage_run_completes_with_clean_output(clean_run, config_path, tmp_path):
    """Head (1 CPU) + a worker node (2 CPUs). During crawl filtering a task worker on the worker node is
    SIGKILLed, during quality scoring an actor worker: Ray retries the task / restarts the actor and the
    run's shards are byte-identical to a clean run's."""
    run_dir = tmp_path / "run"
    with local_ray_cluster(head_cpus=1, worker_nodes=1, worker_cpus=2) as cluster:
        worker_session = cluster.procs[1].pid        # `ray start --block` of the worker node: its session
        env = {**os.environ, **cluster.env, "JAMBA_RAY_DASHBOARD": "0"}
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(config_path), "--output", str(run_dir),
                                 "--ray-address", cluster.gcs_address, "--no-progress"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        plan = [("crawl_filter", "ray::_execute_unit"), ("quality_score", "ray::StageWorker.run")]
        killed: list[dict] = []
        deadline = time.monotonic() + 600
        while plan and proc.poll() is None and time.monotonic() < deadline:
            stage, title = plan[0]
            stage_dir = run_dir / "stages" / stage
            if stage_dir.exists():
                victims = _unit_processes(cluster, title, worker_session)
                if victims:
                    victim = victims[0]
                    markers = len(list(stage_dir.glob("*.done.json")))
                    victim.send_signal(signal.SIGKILL)
                    killed.append({"stage": stage, "pid": victim.pid, "title": title, "markers_before": markers})
                    plan.pop(0)
            time.sleep(0.1)
        out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-5000:]
    assert [k["stage"] for k in killed] == ["crawl_filter", "quality_score"], (killed, out[-3000:])
    assert not any(psutil.pid_exists(k["pid"]) and psutil.Process(k["pid"]).status() != psutil.STATUS_ZOMBIE
                   for k in killed)
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["invariant_ok"] and stats["resumed_units"]["crawl_filter"] == 0   # one invocation, no rerun
    assert shard_digests(run_dir) == shard_digests(clean_run[0])
