"""``pipeline run --until STAGE`` (one scheduler task per stage): it stops after the stage, publishes nothing,
and ``quality`` is a no-op when quality scoring is disabled."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.realdata]


@pytest.fixture(scope="module")
def small_config(corpus, tmp_path_factory) -> Path:
    # Code and books only: no language-ID model to load, so the runs stay short; quality is disabled.
    data = {"run": {"unit_target_mb": 0.1, "num_cpus": 2},
            "sources": [{"name": "books", "kind": "book", "paths": [str(corpus.root / "books")]},
                        {"name": "stdlib", "kind": "code", "paths": [str(corpus.root / "code")]}],
            "tokenize": {"train": {"vocab_size": 1024, "sample_mb": 1}, "shard_target_mb": 0.25}}
    path = tmp_path_factory.mktemp("until") / "small.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_until_quality_with_quality_disabled_stops_after_crawl_filter(small_config, tmp_path):
    # (Stopping after every stage and resuming to identical shards, through Ray jobs: tests/test_airflow_dags.py.)
    run_dir = tmp_path / "run"
    proc = run_cli("run", str(small_config), "--output", str(run_dir), "--no-progress", "--until", "quality")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stopped after stage quality" in proc.stdout
    assert sorted(p.name for p in (run_dir / "stages").iterdir()) == ["crawl_filter"]   # no quality_* stage
    markers = list((run_dir / "stages/crawl_filter").glob("*.done.json"))
    assert len(markers) >= 2 and "already complete: crawl_filter 0)" in proc.stdout
    assert not (run_dir / "manifest.json").exists() and not (run_dir / "stats.json").exists()
    assert not list(run_dir.glob("shards/*.arrow"))


def test_until_rejects_an_unknown_stage(small_config, tmp_path):
    proc = run_cli("run", str(small_config), "--output", str(tmp_path / "r"), "--until", "publish")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
