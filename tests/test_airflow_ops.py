"""The DAGs' helper package (airflow_dags/jamba_ops) without Airflow: run directories derive from the data
interval, never from the attempt; the resolved config is stable; publishing verifies and is idempotent;
commands are what the docs say."""

from __future__ import annotations

import hashlib
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "airflow_dags"))
from jamba_ops.launch import plan_command, ready_runs, train_command  # noqa: E402
from jamba_ops.rayjobs import RayTarget, job_key  # noqa: E402
from jamba_ops.runs import STAGES, dataset_version, plan_run, publish, stage_command  # noqa: E402

DAY = datetime(2024, 3, 1, tzinfo=timezone.utc)


@pytest.fixture
def base_config(tmp_path) -> Path:
    data = {"sources": [{"name": "cc", "kind": "web", "paths": ["/data/crawl/${JAMBA_SNAPSHOT}/segments"]},
                        {"name": "books", "kind": "book", "paths": ["/data/books"]}],
            "tokenize": {"train": {"vocab_size": 2048}}}
    path = tmp_path / "web.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_version_comes_from_the_snapshot_else_the_logical_date():
    assert dataset_version("CC-MAIN-2024-10", DAY) == "CC-MAIN-2024-10"
    assert dataset_version(None, DAY) == "2024-03-01"
    assert dataset_version("crawl 2024/10", None) == "crawl-2024-10"     # filesystem-safe
    with pytest.raises(ValueError):
        dataset_version(None, None)


def test_same_interval_same_run_and_config_bytes(base_config, tmp_path):
    first = plan_run(base_config, tmp_path / "out", "CC-MAIN-2024-10", DAY)
    config_bytes, mtime = Path(first.config).read_bytes(), Path(first.config).stat().st_mtime_ns
    again = plan_run(base_config, tmp_path / "out", "CC-MAIN-2024-10", DAY)
    assert again == first and first.run_dir == str((tmp_path / "out/web/CC-MAIN-2024-10").resolve())
    assert Path(first.config).read_bytes() == config_bytes and Path(first.config).stat().st_mtime_ns == mtime
    resolved = yaml.safe_load(config_bytes)
    assert resolved["sources"][0]["paths"] == ["/data/crawl/CC-MAIN-2024-10/segments"]
    other = plan_run(base_config, tmp_path / "out", None, datetime(2024, 3, 8, tzinfo=timezone.utc))
    assert other.run_dir != first.run_dir and other.version == "2024-03-08"


def test_input_paths_override_and_unknown_sources_are_refused(base_config, tmp_path):
    run = plan_run(base_config, tmp_path, None, DAY, {"books": ["/mnt/books-v2"]})
    assert yaml.safe_load(Path(run.config).read_text())["sources"][1]["paths"] == ["/mnt/books-v2"]
    with pytest.raises(ValueError, match="no source named 'nope'"):
        plan_run(base_config, tmp_path, None, DAY, {"nope": ["/x"]})


def test_stage_commands_stop_after_their_stage(base_config, tmp_path):
    run = plan_run(base_config, tmp_path, None, DAY)
    commands = [stage_command(run, s) for s in STAGES]
    assert [c[c.index("--until") + 1] for c in commands] == ["crawl_filter", "quality", "line_dedup", "tokenize"]
    assert all(c[:4] == ["python", "-m", "pipeline", "run"] and c[c.index("--output") + 1] == run.run_dir
               for c in commands)
    with pytest.raises(ValueError):
        stage_command(run, "publish")
    # A retry targets the same (run directory, stage) key; another stage or directory does not.
    assert job_key(run.run_dir, "dedup") == job_key(run.run_dir, "dedup") != job_key(run.run_dir, "tokenize")
    assert RayTarget("http://h:8265", token=None).headers == {}
    assert RayTarget("http://h:8265", token="t0k").headers == {"Authorization": "Bearer t0k"}


@pytest.mark.slow
@pytest.mark.realdata
def test_publish_verifies_marks_ready_and_refuses_a_corrupt_run(clean_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(clean_run[0], run_dir)
    ready = publish(run_dir, "2024-03-01")
    marker = (run_dir / "_READY.json").read_bytes()
    assert json.loads(marker) == ready
    assert ready["manifest_sha256"] == hashlib.sha256((run_dir / "manifest.json").read_bytes()).hexdigest()
    assert publish(run_dir, "2024-03-01") == ready and (run_dir / "_READY.json").read_bytes() == marker
    assert ready_runs([str(run_dir)]) == [str(run_dir)]
    # A flipped byte in one shard: verification fails and the (old) marker is not rewritten.
    shard = next((run_dir / "shards").glob("*.arrow"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        publish(run_dir, "2024-03-01")
    with pytest.raises(RuntimeError, match="not published"):
        ready_runs([str(tmp_path)])


def test_publish_refuses_a_run_whose_accounting_failed(clean_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(clean_run[0], run_dir)
    stats = json.loads((run_dir / "stats.json").read_text())
    stats.update(invariant_ok=False, violations=["crawl_filter/books: in=9 but kept+dropped+errored=8"])
    (run_dir / "stats.json").write_text(json.dumps(stats))
    with pytest.raises(RuntimeError, match=r"accounting invariant did not hold \(crawl_filter/books: in=9"):
        publish(run_dir, "2024-03-01")
    assert not (run_dir / "_READY.json").exists()


def test_training_commands():
    plan = plan_command("python", "configs/train/x.yaml", 128, "80GB", ["/r/a"], ["steps=10"])
    assert plan == ["python", "-m", "train", "plan", "--config", "configs/train/x.yaml", "--gpus", "128",
                    "--gpu-memory", "80GB", "--set", 'data.runs=["/r/a"]', "--set", "steps=10"]
    multi = train_command("deepspeed", "c.yaml", 8, "hosts", ["/r/a"], [])
    assert multi[:3] == ["deepspeed", "--hostfile", "hosts"] and "--num_gpus" not in multi
    single = train_command("deepspeed", "c.yaml", 8, None, [], [], master_port=29611)
    assert single == ["deepspeed", "--num_gpus", "8", "--master_port", "29611", "--module", "train", "--config",
                      "c.yaml"]
    assert yaml.safe_load(plan[-3].split("=", 1)[1]) == ["/r/a"]   # what the trainer's --set parses


def test_local_mode_streams_output_and_classifies_failures():
    from jamba_ops.rayjobs import StageFailed, run_stage

    lines: list[str] = []
    got = run_stage(["python", "-c", "print('unit 1'); print('unit 2')"], RayTarget(None), "/r", "dedup",
                    emit=lines.append)
    assert got == "local" and lines == ["unit 1", "unit 2"]
    for code, retryable in ((1, True), (2, False)):       # 2 = the pipeline's bad-configuration status
        with pytest.raises(StageFailed) as failed:
            run_stage(["python", "-c", f"raise SystemExit({code})"], RayTarget(None), "/r", "dedup", emit=print)
        assert failed.value.retryable is retryable
