"""Consolidated shards through the real CLI and a real local Ray: tokenized documents packed across units
into shards of about ``shard_target_mb``; the same shards (names, bytes) with 1 or 2 CPUs, after a kill
during tokenize, and after shards or the plan are lost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.shards import Manifest
from tests.conftest import kill_run_when, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.realdata]
TARGET_MB = 0.15


def write_config(corpus, path: Path, num_cpus: int) -> Path:
    """46 reference pages (35 survive the filter) in 12 units and 10 stdlib modules in 2: 14 units."""
    config = {"run": {"num_cpus": num_cpus, "unit_target_mb": 0.1},
              "sources": [{"name": "reference", "kind": "book", "paths": [str(corpus.root / "quality/reference")]},
                          {"name": "stdlib", "kind": "code", "paths": [str(corpus.root / "code")]}],
              "crawl_filter": {"book": {"min_words": 100}},
              "dedup": {"enabled": False},
              "tokenize": {"train": {"vocab_size": 512, "sample_mb": 0.3}, "shard_target_mb": TARGET_MB}}
    path.write_text(yaml.safe_dump(config))
    return path


def run(config: Path, run_dir: Path) -> dict:
    proc = run_cli("run", str(config), "--output", str(run_dir), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run_dir / "stats.json").read_text())


def digests(run_dir: Path) -> list[tuple[str, str]]:
    return [(s.path, s.sha256) for s in Manifest.load(run_dir).shards]


@pytest.fixture(scope="module")
def two_cpu_run(corpus, tmp_path_factory):
    work = tmp_path_factory.mktemp("packed")
    config = write_config(corpus, work / "two.yaml", num_cpus=2)
    run(config, work / "run")
    return work / "run", config


def test_consolidated_shards_are_identical_with_1_and_2_cpus(two_cpu_run, corpus, tmp_path):
    two, _ = two_cpu_run
    one = tmp_path / "one"
    stats = run(write_config(corpus, tmp_path / "one.yaml", num_cpus=1), one)
    assert digests(one) == digests(two)
    assert (one / "manifest.json").read_bytes() == (two / "manifest.json").read_bytes()
    assert (one / "stages/pack/plan.json").read_bytes() == (two / "stages/pack/plan.json").read_bytes()
    # packed across units, about the target each
    manifest = Manifest.load(two)
    plan = json.loads((two / "stages/pack/plan.json").read_text())
    assert stats["units"] == 14 and stats["shards"] == len(manifest.shards) == len(plan["shards"]) < stats["units"]
    assert [Path(s.path).name for s in manifest.shards] == [f"shard-{i:06d}.arrow" for i in range(stats["shards"])]
    assert sorted(p.name for p in (two / "shards").iterdir()) == [Path(s.path).name for s in manifest.shards]
    target = TARGET_MB * 2**20
    assert all(0.95 * target <= s.bytes for s in manifest.shards[:-1])
    assert all(s.bytes <= 2 * target for s in manifest.shards)   # the largest document is about 0.1 MB
    assert any(len({uid for uid, _, _ in s["pieces"]}) >= 3 for s in plan["shards"])       # spans units
    assert any(a != 0 for s in plan["shards"] for _, a, _ in s["pieces"])                   # cuts inside a unit
    assert manifest.total_rows == sum(e["kept"] for e in stats["stages"]["tokenize"].values())
    assert run_cli("inspect", str(two)).stdout.count("verification: OK") == 1
    # the per-unit token files are gone once the shards are published
    assert not list((two / "stages/tokenize").glob("*.arrow"))


def test_rerun_of_a_packed_run_does_no_work(two_cpu_run, tmp_path):
    source, config = two_cpu_run
    run_dir = tmp_path / "again"
    shutil.copytree(source, run_dir)
    before = (run_dir / "manifest.json").read_bytes()
    stats = run(config, run_dir)
    assert stats["resumed_units"]["tokenize"] == stats["units"] and stats["resumed_units"]["pack"] == stats["shards"]
    assert "tokenize" not in stats["wall_seconds"] and "pack" not in stats["wall_seconds"]
    assert (run_dir / "manifest.json").read_bytes() == before


def test_lost_and_damaged_shards_are_repacked_identically(two_cpu_run, tmp_path):
    source, config = two_cpu_run
    expected = digests(source)
    run_dir = tmp_path / "damaged"
    shutil.copytree(source, run_dir)
    shards = Manifest.load(run_dir).shard_paths(run_dir)
    shards[1].unlink()
    shards[-1].write_bytes(shards[-1].read_bytes()[:500])
    stats = run(config, run_dir)
    assert digests(run_dir) == expected
    # only the units feeding those two shards were tokenized again, their token files deleted again
    plan = json.loads((run_dir / "stages/pack/plan.json").read_text())
    feeding = {uid for s in (plan["shards"][1], plan["shards"][-1]) for uid, _, _ in s["pieces"]}
    assert stats["units"] - stats["resumed_units"]["tokenize"] == len(feeding) < stats["units"]
    assert stats["resumed_units"]["pack"] == stats["shards"] - 2
    assert not list((run_dir / "stages/tokenize").glob("*.arrow"))
    # the plan, the manifest and some shards lost (as if killed while packing): the same shards again
    for path in [run_dir / "manifest.json", run_dir / "stages/pack/plan.json", *shards[2:4]]:
        path.unlink()
    (run_dir / "stages/pack" / f"{shards[0].stem}.done.json").unlink()
    stats = run(config, run_dir)
    assert digests(run_dir) == expected
    assert stats["resumed_units"]["pack"] == stats["shards"] - 3


def test_kill_during_tokenize_resumes_to_byte_identical_shards(two_cpu_run, tmp_path):
    source, config = two_cpu_run
    run_dir = tmp_path / "killed"
    markers = run_dir / "stages" / "tokenize"
    kill_run_when(["run", str(config), "--output", str(run_dir), "--no-progress"],
                  lambda: bool(list(markers.glob("*.done.json"))))
    assert list(markers.glob("*.done.json")), "the run finished or failed before it could be killed"
    assert not (run_dir / "manifest.json").exists()
    stats = run(config, run_dir)
    assert stats["resumed_units"]["tokenize"] >= 1
    assert digests(run_dir) == digests(source)
    assert (run_dir / "manifest.json").read_bytes() == (source / "manifest.json").read_bytes()
    assert not list(run_dir.rglob(".*.tmp"))
