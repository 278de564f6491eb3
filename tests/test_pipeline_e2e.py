"""End to end through the real CLI on the real test corpus with a real local Ray (2 CPUs): shards decode
back to the kept text, accounting holds, reruns resume, and a killed run resumes to identical shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.shards import Manifest, ShardReader
from pipeline.tokenizer import load_tokenizer
from tests.conftest import kill_run_when, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.realdata]


def shard_digests(run_dir: Path) -> list[tuple[str, str]]:
    return [(s.path, s.sha256) for s in Manifest.load(run_dir).shards]


def test_run_produces_verified_shards_from_all_three_kinds(clean_run):
    run_dir, proc = clean_run
    manifest = Manifest.load(run_dir)
    kinds_with_tokens = {t["kind"] for t in manifest.totals.values() if t["tokens"] > 0}
    assert kinds_with_tokens == {"web", "book", "code"}
    assert "accounting: OK" in proc.stdout and str(run_dir / "shards") in proc.stdout
    inspect = run_cli("inspect", str(run_dir))
    assert inspect.returncode == 0, inspect.stdout + inspect.stderr
    assert "verification: OK" in inspect.stdout
    assert manifest.tokenizer["vocab_size"] == 2048


def test_shards_decode_back_to_the_kept_text(clean_run):
    run_dir, _ = clean_run
    def documents(stage: str) -> dict[str, str]:
        docs: dict[str, str] = {}
        for path in sorted(p for p in (run_dir / "stages" / stage).glob("*.parquet") if p.is_file()):
            table = pq.read_table(path, columns=["id", "text"]).to_pydict()
            docs.update(zip(table["id"], table["text"]))
        return docs

    deduped, selected = documents("dedup"), documents("url_dedup")      # dedup reads url_dedup's output
    removed = pq.read_table(run_dir / "stages/dedup/removed.parquet").column("id").to_pylist()
    assert set(selected) - set(deduped) == set(removed) and set(deduped) <= set(selected)
    kept = documents("line_dedup")                     # what tokenize reads: dedup's output minus frequent lines
    assert set(kept) <= set(deduped)
    manifest = Manifest.load(run_dir)
    tokenizer = load_tokenizer(run_dir / manifest.tokenizer["path"])
    eos = manifest.tokenizer["eos_id"]
    seen = set()
    for shard in manifest.shard_paths(run_dir):
        with ShardReader(shard) as reader:
            for doc_id, _kind, tokens in reader.documents():
                assert tokens[-1] == eos and eos not in tokens[:-1]
                assert tokenizer.decode(tokens[:-1].tolist(), skip_special_tokens=False) == kept[doc_id]
                seen.add(doc_id)
    assert seen == set(kept) and len(seen) > 10


def test_every_document_is_accounted_for(clean_run):
    run_dir, _ = clean_run
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["invariant_ok"] and stats["violations"] == []
    stages = stats["stages"]
    assert list(stages) == ["read", "crawl_filter", "quality", "url_dedup", "dedup", "line_dedup", "tokenize"]
    for stage, sources in stages.items():
        for source, e in sources.items():
            assert e["in"] == e["kept"] + sum(e["dropped"].values()) + sum(e["errored"].values()), (stage, source)
    for source, e in stages["crawl_filter"].items():
        assert stages["read"][source]["kept"] == e["in"]
        assert stages["quality"].get(source, {"in": 0})["in"] == e["kept"]
        assert stages["url_dedup"].get(source, {"in": 0})["in"] == stages["quality"].get(source, {"kept": 0})["kept"]
        assert stages["dedup"].get(source, {"in": 0})["in"] == stages["url_dedup"].get(source, {"kept": 0})["kept"]
        assert stages["line_dedup"].get(source, {"in": 0})["in"] == stages["dedup"].get(source, {"kept": 0})["kept"]
        assert stages["tokenize"].get(source, {"in": 0})["in"] == stages["line_dedup"].get(source, {"kept": 0})["kept"]
    # The multilingual handbook sample (fr, de) is mostly dropped by language ID, with that reason.
    assert stages["crawl_filter"]["debian-handbook"]["dropped"].get("language_id", 0) > 0
    # WARC request records are counted, not silently skipped.
    assert stages["read"]["python-docs"]["dropped"]["warc_request"] > 0
    total_rows = Manifest.load(run_dir).total_rows
    assert total_rows == sum(e["kept"] for e in stages["tokenize"].values())


def test_quality_scores_select_by_global_percentile_and_reach_the_shards(clean_run):
    run_dir, _ = clean_run
    stats = json.loads((run_dir / "stats.json").read_text())
    quality, booked = stats["quality"], stats["stages"]["quality"]
    # The exact distributed threshold of each web source is numpy's percentile over all its scores.
    scores: dict[str, list[float]] = {}
    for path in (run_dir / "stages/quality_score").glob("*.scores.arrow"):
        table = pa.ipc.open_file(pa.memory_map(str(path))).read_all().to_pydict()
        for source, score in zip(table["source"], table["score"]):
            scores.setdefault(source, []).append(score)
    for source in ("python-docs", "debian-handbook"):
        values = np.asarray(scores[source], dtype=np.float64)   # float32 scores; interpolated in float64
        assert quality["sources"][source]["threshold"] == pytest.approx(float(np.percentile(values, 20)), abs=1e-12)
        kept = int((values >= quality["sources"][source]["threshold"]).sum())
        assert booked[source]["kept"] == kept
        assert booked[source]["dropped"].get("quality_below_percentile", 0) == len(values) - kept
        assert kept >= np.ceil((len(values) - 1) * 0.8 - 1e-9)
        assert sum(quality["sources"][source]["histogram"]) == len(values)
    assert booked["python-docs"]["dropped"]["quality_below_percentile"] >= 1
    assert booked["books"]["kept"] == booked["books"]["in"]            # keep: scored, none dropped
    assert "threshold" not in quality["sources"]["stdlib"] and quality["sources"]["stdlib"]["scored"] == 0
    # Books read as reference-quality text, the docs' web pages less so.
    assert quality["sources"]["books"]["mean_score"] > quality["sources"]["python-docs"]["mean_score"]
    # Scores travel into the shards: web and books scored, code exempt (null).
    by_kind: dict[str, list[float]] = {}
    for shard in Manifest.load(run_dir).shard_paths(run_dir):
        with ShardReader(shard) as reader:
            kinds = [k for _, k, _ in reader.documents()]
            for kind, score in zip(kinds, reader.quality_scores()):
                by_kind.setdefault(kind, []).append(float(score))
    assert all(0 <= s <= 1 for s in by_kind["web"] + by_kind["book"])
    assert all(np.isnan(s) for s in by_kind["code"])


def test_rerun_resumes_everything_and_changes_nothing(clean_run, config_path):
    run_dir, _ = clean_run
    before = shard_digests(run_dir)
    proc = run_cli("run", str(config_path), "--output", str(run_dir), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["resumed_units"]["crawl_filter"] == stats["units"] == stats["resumed_units"]["tokenize"]
    assert shard_digests(run_dir) == before


def test_a_different_config_in_the_same_directory_is_refused(clean_run, tmp_path, config_path):
    run_dir, _ = clean_run
    other = yaml.safe_load(config_path.read_text())
    other["tokenize"]["shard_target_mb"] = 1
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(other))
    proc = run_cli("run", str(tmp_path / "c.yaml"), "--output", str(run_dir))
    assert proc.returncode == 1
    assert "holds a run of a different configuration" in proc.stderr


def test_killed_run_resumes_to_identical_shards(clean_run, config_path, tmp_path):
    run_dir = tmp_path / "killed"
    markers = run_dir / "stages" / "crawl_filter"
    kill_run_when(["run", str(config_path), "--output", str(run_dir), "--no-progress"],
                  lambda: bool(list(markers.glob("*.done.json"))), poll=0.05)
    assert list(markers.glob("*.done.json")), "the run finished or failed before it could be killed"
    assert not (run_dir / "manifest.json").exists()

    resumed = run_cli("run", str(config_path), "--output", str(run_dir), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["resumed_units"]["crawl_filter"] >= 1
    assert shard_digests(run_dir) == shard_digests(clean_run[0])
    assert not list(run_dir.rglob(".*.tmp"))


def test_inspect_decodes_documents(clean_run):
    run_dir, _ = clean_run
    proc = run_cli("inspect", str(run_dir), "--decode", "2", "--max-chars", "80")
    assert proc.returncode == 0
    assert proc.stdout.count("\n--- ") == 2
