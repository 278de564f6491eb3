"""The Airflow DAGs with real Airflow (SQLite metadata DB, ``dag.test()``) against a real local Ray head
(``ray start --head``, token authentication, Jobs API on 127.0.0.1): the data DAG produces the same shards as
a plain pipeline run, survives a stage whose Ray job is killed (Airflow retries, the stage resumes), and a
rerun of the same logical date changes nothing; the training DAG refuses a plan that does not fit and
launches DeepSpeed when it fits."""

from __future__ import annotations

import hashlib
import importlib.util
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

from tests.conftest import REQUIRE_REAL, ROOT
from tests.ray_local import free_ports, local_ray_cluster

DAGS = ROOT / "airflow_dags"
LOGICAL_DATE = "2024-03-01T00:00:00+00:00"
VERSION = "2024-03-01"                # what the DAG derives from the logical date (no snapshot given)

AIRFLOW_INSTALLED = importlib.util.find_spec("airflow") is not None  # not `import airflow`: it writes ~/airflow


@pytest.fixture(autouse=True)
def _airflow_installed():
    if not AIRFLOW_INSTALLED:
        message = "apache-airflow is not installed (the project's `airflow` extra: pip install -e '.[airflow]')"
        pytest.fail(message) if REQUIRE_REAL else pytest.skip(message)


def shard_digests(run_dir: Path) -> list[tuple[str, str]]:
    from pipeline.shards import Manifest

    return [(s.path, s.sha256) for s in Manifest.load(run_dir).shards]


@pytest.fixture(scope="session")
def airflow_env(tmp_path_factory) -> dict[str, str]:
    """A fresh AIRFLOW_HOME with a migrated SQLite DB; the environment every Airflow subprocess gets."""
    home = tmp_path_factory.mktemp("airflow_home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AIRFLOW"))}
    env.update({"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS), "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
                "JAMBA_AIRFLOW_RETRY_DELAY_S": "1", "JAMBA_DATA_SCHEDULE": "none", "JAMBA_RAY_DASHBOARD": "0"})
    proc = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return env


def dag_test(env: dict[str, str], dag_id: str, conf: dict, timeout: float = 600,
             during=None) -> tuple[dict, str]:
    """``dag.test()`` in a subprocess; ``during(proc)`` runs while it does. Returns (result, output)."""
    with subprocess.Popen([sys.executable, "-m", "tests.airflow_run", dag_id, LOGICAL_DATE, json.dumps(conf)],
                          env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        if during is not None:
            during(proc)
        out, _ = proc.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith("DAG_TEST_RESULT ")]
    assert proc.returncode == 0 and lines, out[-6000:]
    return json.loads(lines[-1].split(" ", 1)[1]), out


# ------------------------------------------------------------------------------------ parsing only
def test_dagbag_imports_both_dags_with_the_expected_graph(airflow_env):
    script = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
out = {"errors": {k: str(v)[-500:] for k, v in bag.import_errors.items()}, "dags": {}}
for dag in bag.dags.values():
    out["dags"][dag.dag_id] = {"edges": sorted([t.task_id, d] for t in dag.tasks for d in t.downstream_task_ids),
                               "params": sorted(dag.params), "retries": {t.task_id: t.retries for t in dag.tasks},
                               "schedule": type(dag.timetable).__name__}
out["heavy_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "torch", "pipeline", "train"))
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", script, str(DAGS)], env=airflow_env, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["errors"] == {}
    assert set(out["dags"]) == {"jamba_data_pipeline", "jamba_train"}
    data = out["dags"]["jamba_data_pipeline"]
    chain = ["prepare", "crawl_filter", "quality", "dedup", "tokenize", "publish"]
    for a, b in zip(chain, chain[1:]):
        assert [a, b] in data["edges"]
    assert {d for _, d in data["edges"]} == set(chain[1:])       # nothing else, every stage after prepare
    assert {"config", "snapshot", "input_paths", "output_root", "ray_address"} <= set(data["params"])
    assert all(data["retries"][t] >= 1 for t in chain[1:5])
    train = out["dags"]["jamba_train"]
    assert train["edges"] == [["plan", "launch"], ["resolve_data", "launch"], ["resolve_data", "plan"]]
    assert train["retries"]["plan"] == 0                          # a plan that does not fit is final
    assert "asset" in train["schedule"].lower()
    # Parsing stays light: the scheduler never imports Ray, torch or the project for a DAG file.
    assert out["heavy_modules"] == []


def test_no_secrets_in_dag_code():
    text = "\n".join(p.read_text() for p in DAGS.rglob("*.py"))
    assert not re.search(r"(?i)(password|token|secret)\s*=\s*['\"][^'\"]+['\"]", text)
    assert "RAY_AUTH_MODE" not in text or "disabled" not in text


# ----------------------------------------------------------------------- the data DAG, on Ray
@pytest.fixture(scope="module")
def ray_head():
    with local_ray_cluster(head_cpus=2) as cluster:
        yield cluster


def airflow_ray_env(airflow_env: dict[str, str], cluster) -> dict[str, str]:
    """The token reaches Airflow only as the password of the ``jamba_ray`` connection."""
    port = int(cluster.dashboard_url.rsplit(":", 1)[1])
    conn = {"conn_type": "http", "host": "127.0.0.1", "port": port, "password": cluster.token}
    return {**airflow_env, "AIRFLOW_CONN_JAMBA_RAY": json.dumps(conn)}


def kill_stage_driver_once(run_dir: Path, stage: str, units: int, killed: dict, timeout: float = 300):
    """While the DAG runs: when ``stage`` has some but not all unit markers, SIGKILL its Ray job's driver."""
    markers = run_dir / "stages" / stage

    def during(proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            done = len(list(markers.glob("*.done.json"))) if markers.exists() else 0
            if 1 <= done < units:
                for p in psutil.process_iter(["pid", "cmdline"]):
                    cmd = p.info["cmdline"] or []
                    if cmd[1:3] == ["-m", "pipeline"] and "--until" in cmd and stage in cmd and str(run_dir) in cmd:
                        p.send_signal(signal.SIGKILL)
                        killed.update(pid=p.pid, markers=done)
                        return
            if done >= units:
                return  # too late to inject: the assertions on `killed` report it
            time.sleep(0.2)

    return during


@pytest.fixture(scope="module")
def dag_run(airflow_env, ray_head, config_path, tmp_path_factory):
    """The data DAG on the test corpus, with the crawl_filter job's driver killed mid-stage."""
    from pipeline.config import load_config
    from pipeline.sources import plan_units

    root = tmp_path_factory.mktemp("airflow_out")
    run_dir = root / config_path.stem / VERSION
    conf = {"config": str(config_path), "output_root": str(root)}
    killed: dict = {}
    units = len(plan_units(load_config(config_path)))
    started = time.monotonic()
    result, out = dag_test(airflow_ray_env(airflow_env, ray_head), "jamba_data_pipeline", conf,
                           during=kill_stage_driver_once(run_dir, "crawl_filter", units, killed))
    return {"result": result, "output": out, "run_dir": run_dir, "root": root, "conf": conf, "killed": killed,
            "units": units, "seconds": time.monotonic() - started}


def test_jobs_api_requires_the_token_and_a_retry_follows_a_running_job(ray_head, tmp_path):
    import requests
    from ray.job_submission import JobSubmissionClient

    sys.path.insert(0, str(DAGS))
    from jamba_ops.rayjobs import RayTarget, job_key, run_stage

    assert requests.get(f"{ray_head.dashboard_url}/api/jobs/", timeout=10).status_code == 401
    bad = {"Authorization": "Bearer " + "0" * 64}
    assert requests.get(f"{ray_head.dashboard_url}/api/jobs/", headers=bad, timeout=10).status_code == 403
    # An earlier attempt's job still running for the same (run directory, stage): followed, not duplicated.
    target = RayTarget(ray_head.dashboard_url, token=ray_head.token)
    client = JobSubmissionClient(target.address, headers=target.headers)
    key = job_key(str(tmp_path), "dedup")
    first = client.submit_job(entrypoint="python -c \"import time; time.sleep(3); print('first attempt done')\"",
                              metadata={"jamba_job_key": key, "jamba_stage": "dedup-probe"})
    lines: list[str] = []
    got = run_stage(["python", "-c", "print('second attempt')"], target, str(tmp_path), "dedup", try_number=2,
                    emit=lines.append)
    assert got == first and "first attempt done" in lines and "second attempt" not in lines
    assert [j.submission_id for j in client.list_jobs() if (j.metadata or {}).get("jamba_job_key") == key] == [first]


def jobs_by_stage(cluster) -> dict[str, list[str]]:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url, headers={"Authorization": f"Bearer {cluster.token}"})
    jobs: dict[str, list[str]] = {}
    for job in sorted(client.list_jobs(), key=lambda j: j.start_time or 0):
        stage = (job.metadata or {}).get("jamba_stage")
        if stage:
            jobs.setdefault(stage, []).append(str(job.status))
    return jobs


def stage_log_lines(run_dir: Path, stage: str) -> list[tuple[int, int]]:
    """(units to run, already complete) of every invocation of ``stage``, in order."""
    text = (run_dir / "logs" / "pipeline.log").read_text()
    return [(int(a), int(b)) for a, b in
            re.findall(rf"stage {stage}: (\d+) units to run, (\d+) already complete", text)]


@pytest.mark.slow
@pytest.mark.realdata
def test_killed_stage_job_is_retried_and_resumes(dag_run, ray_head):
    result, killed, run_dir = dag_run["result"], dag_run["killed"], dag_run["run_dir"]
    assert killed, "the crawl_filter job finished before a driver could be killed: nothing was injected"
    assert result["state"] == "success", dag_run["output"][-5000:]
    tasks = result["tasks"]
    assert {t: v["state"] for t, v in tasks.items()} == dict.fromkeys(
        ["prepare", "crawl_filter", "quality", "dedup", "tokenize", "publish"], "success")
    assert tasks["crawl_filter"]["try_number"] == 2                  # failed once, retried once
    assert all(tasks[t]["try_number"] == 1 for t in ("prepare", "quality", "dedup", "tokenize", "publish"))
    # Through the Jobs API: the killed job FAILED, its retry and every other stage SUCCEEDED.
    jobs = jobs_by_stage(ray_head)
    assert jobs["crawl_filter"] == ["FAILED", "SUCCEEDED"]
    assert all(jobs[s] == ["SUCCEEDED"] for s in ("quality", "dedup", "tokenize"))
    # The retry resumed: it skipped the units finished before the kill instead of redoing them.
    first, retry = stage_log_lines(run_dir, "crawl_filter")[:2]
    assert first == (dag_run["units"], 0)
    assert retry[1] >= killed["markers"] >= 1 and sum(retry) == dag_run["units"]
    assert "submitted Ray job" in dag_run["output"] and "stopped after stage crawl_filter" in dag_run["output"]


@pytest.mark.slow
@pytest.mark.realdata
def test_dag_output_equals_a_clean_run_and_is_published(dag_run, clean_run):
    from pipeline.shards import verify_run

    run_dir = dag_run["run_dir"]
    assert verify_run(run_dir) == []
    assert shard_digests(run_dir) == shard_digests(clean_run[0])
    ready = json.loads((run_dir / "_READY.json").read_text())
    assert ready["manifest_sha256"] == hashlib.sha256((run_dir / "manifest.json").read_bytes()).hexdigest()
    assert ready["version"] == VERSION and ready["shards"] == len(shard_digests(run_dir))
    events = dag_run["result"]["asset_events"]
    assert len(events) == 1 and events[0]["asset"] == "jamba_pretrain_shards"
    assert events[0]["extra"]["run_dir"] == str(run_dir) and events[0]["extra"]["manifest_sha256"] == \
        ready["manifest_sha256"]


@pytest.mark.slow
@pytest.mark.realdata
def test_rerun_of_the_same_logical_date_duplicates_nothing(dag_run, airflow_env, ray_head):
    run_dir, root = dag_run["run_dir"], dag_run["root"]
    before, ready_before = shard_digests(run_dir), (run_dir / "_READY.json").read_bytes()
    jobs_before = jobs_by_stage(ray_head)
    result, out = dag_test(airflow_ray_env(airflow_env, ray_head), "jamba_data_pipeline", dag_run["conf"])
    assert result["state"] == "success", out[-5000:]
    assert [p.name for p in (root / run_dir.parent.name).iterdir() if p.is_dir()] == [VERSION]
    assert shard_digests(run_dir) == before
    assert sorted(p.name for p in (run_dir / "shards").iterdir()) == sorted(Path(p).name for p, _ in before)
    assert (run_dir / "_READY.json").read_bytes() == ready_before
    # Every stage ran again as a Ray job and found all of its units complete.
    jobs = jobs_by_stage(ray_head)
    assert all(jobs[s] == jobs_before[s] + ["SUCCEEDED"] for s in ("crawl_filter", "quality", "dedup", "tokenize"))
    log = (run_dir / "logs" / "pipeline.log").read_text()
    map_stages = sorted(set(re.findall(r"stage (\w+): \d+ units to run", log)))
    assert {"crawl_filter", "dedup", "tokenize"} <= set(map_stages)
    for stage in map_stages:   # pack's units are the shards
        expected = len(before) if stage == "pack" else dag_run["units"]
        assert stage_log_lines(run_dir, stage)[-1] == (0, expected), stage


# ------------------------------------------------------------------------------- the training DAG
def train_conf(run_dir: Path, gpu_memory: str, checkpoint: Path) -> dict:
    # One CPU rank, one step of the tiny model (its 2,048-token vocabulary is the test run's): the launch is
    # under test here, not the trainer (tests/test_train.py).
    return {"train_config": "configs/train/tiny-cpu.yaml", "gpus": 1, "gpus_per_node": 1, "gpu_memory": gpu_memory,
            "launcher": "local", "workdir": str(ROOT), "data_runs": [str(run_dir)], "master_port": free_ports(1)[0],
            "extra_sets": ["model=configs/model/jamba-tiny.yaml", "data.seq_len=128", "steps=1", "parallel.ep_size=1",
                           f"checkpoint.dir={checkpoint}", "checkpoint.every=1"]}


@pytest.mark.slow
@pytest.mark.realdata
def test_train_dag_refuses_a_plan_that_does_not_fit(dag_run, airflow_env, tmp_path):
    result, out = dag_test(airflow_env, "jamba_train", train_conf(dag_run["run_dir"], "1GB", tmp_path / "ckpt"))
    assert result["state"] == "failed"
    states = {t: v["state"] for t, v in result["tasks"].items()}
    assert states == {"resolve_data": "success", "plan": "failed", "launch": "upstream_failed"}
    assert "DOES NOT FIT" in out and not (tmp_path / "ckpt").exists()


@pytest.mark.slow
@pytest.mark.realdata
def test_train_dag_launches_deepspeed_on_the_published_run(dag_run, airflow_env, tmp_path):
    ckpt = tmp_path / "ckpt"
    result, out = dag_test(airflow_env, "jamba_train", train_conf(dag_run["run_dir"], "80GB", ckpt))
    assert result["state"] == "success", out[-5000:]
    assert "fits" in out and "launching (local):" in out and "--module train" in out
    metrics = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1] and metrics[0]["loss"] > 0
    assert (ckpt / "latest").read_text().strip() == "step1" and (ckpt / "step1" / "mp_rank_00_model_states.pt").is_file()
