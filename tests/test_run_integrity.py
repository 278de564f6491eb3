"""Run integrity: markers checked against their outputs, versions that shape the outputs pinned per run,
no manifest from a run whose accounting fails (real CLI, real local Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.realdata]


@pytest.fixture()
def books_config(corpus, tmp_path) -> Path:
    config = {"run": {"num_cpus": 2, "unit_target_mb": 0.3},
              "sources": [{"name": "books", "kind": "book", "paths": [str(corpus.root / "books")]}],
              "crawl_filter": {"book": {"min_words": 100}},
              "tokenize": {"train": {"vocab_size": 512, "sample_mb": 0.5}}}
    path = tmp_path / "books.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_marker_whose_output_went_missing_is_redone(books_config, tmp_path):
    run = tmp_path / "run"
    proc = run_cli("run", str(books_config), "--output", str(run), "--until", "crawl_filter", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    outputs = sorted((run / "stages/crawl_filter").glob("*.parquet"))
    assert len(outputs) >= 2
    marker = json.loads(outputs[0].with_name(outputs[0].name.replace(".parquet", ".done.json")).read_text())
    assert marker["outputs"] == [{"path": f"stages/crawl_filter/{outputs[0].name}", "bytes": outputs[0].stat().st_size,
                                  "sha256": marker["outputs"][0]["sha256"]}] and len(marker["outputs"][0]["sha256"]) == 64
    before = {p.name: p.read_bytes() for p in outputs}
    outputs[0].unlink()
    outputs[1].write_bytes(outputs[1].read_bytes()[:100])  # a truncated output, as after a disk problem
    proc = run_cli("run", str(books_config), "--output", str(run), "--until", "crawl_filter", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 unit(s) have a completion marker but missing or changed outputs" in (run / "logs/pipeline.log").read_text()
    assert {p.name: p.read_bytes() for p in sorted((run / "stages/crawl_filter").glob("*.parquet"))} == before


def test_resuming_with_other_library_versions_is_refused(books_config, tmp_path):
    run = tmp_path / "run"
    proc = run_cli("run", str(books_config), "--output", str(run), "--until", "crawl_filter", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads((run / "run.json").read_text())
    assert {"jamba-pretrain", "datatrove", "resiliparse", "trafilatura", "tokenizers", "spacy"} <= set(info["versions"])
    real = info["versions"]["resiliparse"]
    info["versions"]["resiliparse"] = "1.9.0"
    (run / "run.json").write_text(json.dumps(info))
    proc = run_cli("run", str(books_config), "--output", str(run), "--no-progress")
    assert proc.returncode == 1
    message = proc.stderr.strip().splitlines()[-1]
    assert f"resiliparse 1.9.0 -> {real}" in message and "use a new --output directory" in message


def test_no_manifest_from_a_run_whose_accounting_fails(books_config, tmp_path):
    run = tmp_path / "run"
    proc = run_cli("run", str(books_config), "--output", str(run), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run / "manifest.json").exists()
    # A tokenize marker that books one document too few (its shards untouched): the invariant fails.
    marker_path = sorted((run / "stages/tokenize").glob("*.done.json"))[0]
    marker = json.loads(marker_path.read_text())
    for row in marker["ledger"]["counts"]:
        if row[3] == "kept" and row[5] > 0:
            row[5] -= 1
            break
    marker_path.write_text(json.dumps(marker))
    proc = run_cli("run", str(books_config), "--output", str(run), "--no-progress")
    assert proc.returncode == 1 and "accounting invariant violated" in proc.stderr
    assert not (run / "manifest.json").exists()
    assert json.loads((run / "stats.json").read_text())["invariant_ok"] is False
