"""Dedup on real near-duplicates: CPython's standard library of two releases (Debian's 3.11 package and
this interpreter's), plus Debian's license texts (GPL-2/GPL-3, LGPL-2/2.1, GFDL-1.2/1.3, ...). Checked
against brute-force word 5-gram Jaccard over all pairs, for determinism across workers and input splits,
in incremental mode, and against datasketch's own MinHash."""

from __future__ import annotations

import json
import sysconfig
from itertools import combinations
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.dedup.graph import bucket_star_pairs, connected_components_local
from pipeline.dedup.minhash import MinHasher, lsh_params, normalize_words, shingle_hashes
from tests.conftest import ROOT, kill_run_when, real_data_unavailable, run_cli

pytestmark = pytest.mark.realdata


def _texts(directory: Path, pattern: str, prefix: str) -> list[dict]:
    return [{"id": f"{prefix}/{p.name}", "path": p.name, "text": p.read_text(errors="replace")}
            for p in sorted(directory.glob(pattern)) if p.is_file()]


@pytest.fixture(scope="session")
def near_duplicates() -> dict[str, list[dict]]:
    from pipeline.realdata import FetchError, debian_package

    try:
        # Debian splits the standard library over two packages
        debian_stdlib = [debian_package(pkg) / "root/usr/lib/python3.11"
                         for pkg in ("libpython3.11-stdlib", "libpython3.11-minimal")]
        licenses = debian_package("base-files") / "root/usr/share/common-licenses"
    except FetchError as exc:
        real_data_unavailable(str(exc))
    ours = Path(sysconfig.get_paths()["stdlib"])
    return {"debian": [doc for d in debian_stdlib for doc in _texts(d, "*.py", "debian-py311")],
            "local": _texts(ours, "*.py", "local-py311"),
            "licenses": [{**d, "path": d["path"] + ".txt"} for d in _texts(licenses, "*", "license")]}


def _write_jsonl(directory: Path, docs: list[dict], files: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for k in range(files):
        with open(directory / f"part-{k}.jsonl", "w") as fh:
            for doc in docs[k::files]:
                fh.write(json.dumps(doc) + "\n")
    return directory


def _pipeline_config(tmp: Path, name: str, data: Path, index: list[str] | None = None, **dedup) -> Path:
    cfg = {
        "sources": [{"name": "mixed", "kind": "code", "format": "jsonl", "paths": [str(data)],
                     "id_field": "id", "path_field": "path"}],
        "crawl_filter": {"code": {"max_line_length": 100000, "max_mean_line_length": 10000,
                                  "min_alphanum_fraction": 0.0}},
        "dedup": {"scope": "all", "partitions": 4, "index": index or [], **dedup},
        "tokenize": {"train": {"vocab_size": 512, "sample_mb": 0.5}, "shard_target_mb": 1},
        "run": {"unit_target_mb": 0.5},
    }
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return tmp / f"{name}.yaml"


def _run_pipeline(tmp: Path, name: str, data: Path, cpus: int = 2, index: list[str] | None = None,
                  until: str | None = None, **dedup) -> Path:
    config = _pipeline_config(tmp, name, data, index, **dedup)
    out = tmp / name
    proc = run_cli("run", str(config), "--output", str(out), "--num-cpus", str(cpus), "--no-progress",
                   *(["--until", until] if until else []))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _removed(run: Path) -> list[dict]:
    rows = pq.read_table(run / "stages/dedup/removed.parquet").to_pylist()
    return sorted(rows, key=lambda r: r["id"])


def _documents(run: Path, stage: str) -> dict[str, str]:
    docs = {}
    for path in sorted(p for p in (run / "stages" / stage).glob("*.parquet") if p.is_file()):
        table = pq.read_table(path, columns=["id", "text", "metadata"]).to_pylist()
        docs.update({json.loads(r["metadata"])["locator"]: r["text"] for r in table})
    return docs


@pytest.fixture(scope="module")
def dedup_run(near_duplicates, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dedup")
    docs = near_duplicates["debian"] + near_duplicates["local"] + near_duplicates["licenses"]
    return tmp, docs, _run_pipeline(tmp, "one-file", _write_jsonl(tmp / "in1", docs, 1))


def test_finds_near_duplicates_that_brute_force_finds(dedup_run):
    tmp, docs, run = dedup_run
    seen = _documents(run, "crawl_filter")                   # what entered dedup, by locator "id:<id>"
    shingles = {loc: set(shingle_hashes(normalize_words(text), 5).tolist()) for loc, text in seen.items()}
    from pipeline.document import document_id

    loc_of = {document_id("mixed", loc): loc for loc in seen}
    removed = _removed(run)
    cluster = {loc: loc for loc in seen}
    for row in removed:
        cluster[loc_of[row["id"]]] = loc_of[row["kept_id"]]
    best = dict.fromkeys(seen, 0.0)
    high, found = 0, 0
    for a, b in combinations(sorted(seen), 2):
        sa, sb = shingles[a], shingles[b]
        j = len(sa & sb) / max(1, len(sa | sb))
        best[a], best[b] = max(best[a], j), max(best[b], j)
        if j >= 0.9:
            high += 1
            found += cluster[a] == cluster[b]
    assert high >= 120, "the corpus should hold many near-duplicate pairs"
    print(f"pairs with Jaccard >= 0.9: {high}, found {found}; documents {len(seen)}, removed {len(removed)}")
    assert found / high >= 0.95, (found, high)
    false_removals = [loc_of[r["id"]] for r in removed if best[loc_of[r["id"]]] < 0.5]
    assert len(false_removals) < 0.01 * len(seen), false_removals
    stats = json.loads((run / "stats.json").read_text())
    assert stats["dedup"]["removed"] == len(removed) > 50
    assert sum(stats["stages"]["dedup"]["mixed"]["dropped"].values()) == len(removed)
    assert stats["dedup"]["cluster_size_histogram"]


def test_same_removed_set_whatever_the_workers_and_input_split(dedup_run):
    tmp, docs, run = dedup_run
    split = _run_pipeline(tmp, "three-files", _write_jsonl(tmp / "in3", docs, 3))
    one_cpu = _run_pipeline(tmp, "one-cpu", tmp / "in1", cpus=1)
    reference = _removed(run)
    assert _removed(split) == reference
    assert _removed(one_cpu) == reference


def test_fan_in_and_partitions_change_the_layout_not_the_removed_set(dedup_run):
    """16 partitions merged at fan-in 2 (every shuffle goes through merge levels, several units per
    removal file): the same removed set as 4 partitions read directly; no graph task held more than its
    fan-in of files mapped at once, and the driver held one reference per task of a step at most."""
    tmp, docs, run = dedup_run
    narrow = _run_pipeline(tmp, "fan-in-2", _write_jsonl(tmp / "in-fan", docs, 5), until="dedup", partitions=16,
                           fan_in=2)
    assert _removed(narrow) == _removed(run)
    summary = json.loads((narrow / "stages/dedup/graph.done.json").read_text())["shuffle"]
    units = len(list((narrow / "stages/dedup_signatures").glob("*.bands.arrow")))
    assert summary["band_merge_levels"] >= 2 and units >= 5
    assert 1 <= summary["max_maps_per_task"] <= 2 + 1      # fan-in, plus the file being written
    assert summary["max_driver_refs"] <= max(16, units)
    assert not (narrow / "stages/dedup/graph").exists()      # intermediate files are deleted once consumed


@pytest.mark.slow
def test_a_driver_killed_in_a_graph_round_resumes_to_the_same_removed_set(dedup_run):
    """SIGKILL the whole run (driver and its local Ray) once the first connected-components round has
    finished tasks, then the same command: it resumes the finished tasks and removes the same documents."""
    tmp, docs, run = dedup_run
    config = _pipeline_config(tmp, "killed", _write_jsonl(tmp / "in-killed", docs, 5), partitions=16, fan_in=4)
    out = tmp / "killed"
    round_markers = out / "stages/dedup/graph/round-001/small"
    killed = kill_run_when(["run", str(config), "--output", str(out), "--num-cpus", "2", "--no-progress",
                            "--until", "dedup"],
                           lambda: round_markers.exists() and any(round_markers.glob("task-*.done.json")), poll=0.05)
    assert killed, "the run ended before it could be killed in a graph round"
    assert not (out / "stages/dedup/graph.done.json").exists()
    resumed = _run_pipeline(tmp, "killed", tmp / "in-killed", until="dedup", partitions=16, fan_in=4)
    summary = json.loads((resumed / "stages/dedup/graph.done.json").read_text())["shuffle"]
    assert summary["resumed_tasks"] > 0
    assert _removed(resumed) == _removed(run)


def test_incremental_removes_only_new_documents_matching_the_index(near_duplicates, tmp_path):
    old = _run_pipeline(tmp_path, "old", _write_jsonl(tmp_path / "old-in", near_duplicates["debian"], 1))
    new_docs = near_duplicates["local"] + near_duplicates["licenses"]
    new = _run_pipeline(tmp_path, "new", _write_jsonl(tmp_path / "new-in", new_docs, 1), index=[str(old)])
    old_ids = set(_ids(old))
    new_ids = set(_ids(new))
    removed = _removed(new)
    assert removed and {r["id"] for r in removed} <= new_ids
    against_old = [r for r in removed if r["kept_id"] in old_ids]
    assert len(against_old) > 100                         # most of 3.11.7's stdlib matches 3.11.2's
    alone = _run_pipeline(tmp_path, "alone", tmp_path / "new-in")
    assert {r["id"] for r in _removed(alone)} < {r["id"] for r in removed}   # without the index: fewer


def _ids(run: Path) -> list[str]:
    return [r for p in sorted(p for p in (run / "stages/crawl_filter").glob("*.parquet") if p.is_file())
            for r in pq.read_table(p, columns=["id"]).column("id").to_pylist()]


def test_signatures_equal_datasketch_on_the_same_shingles(near_duplicates):
    from datasketch import MinHash

    hasher = MinHasher(num_perm=64, seed=7)
    for doc in near_duplicates["licenses"][:5] + near_duplicates["debian"][:5]:
        hashes = shingle_hashes(normalize_words(doc["text"]), 5)
        reference = MinHash(num_perm=64, seed=7, scheme="affine64", hashfunc=lambda x: x)
        reference.update_batch([int(h) for h in hashes])
        assert np.array_equal(hasher.signature_of_hashes(hashes), reference.hashvalues)


def test_estimated_jaccard_tracks_exact_jaccard(near_duplicates):
    hasher = MinHasher(num_perm=256)
    pairs = {d["path"]: d["text"] for d in near_duplicates["licenses"]}
    a, b = pairs["GPL-2.txt"], pairs["GPL-3.txt"]
    sa, sb = (set(shingle_hashes(normalize_words(t), 5).tolist()) for t in (a, b))
    exact = len(sa & sb) / len(sa | sb)
    estimate = float((hasher.signature(a) == hasher.signature(b)).mean())
    assert abs(estimate - exact) < 0.1


def test_lsh_parameters_come_from_datasketch():
    from datasketch.lsh import _optimal_param

    assert lsh_params(0.8, 112) == tuple(_optimal_param(0.8, 112, 0.5, 0.5))
    bands, rows = lsh_params(0.8, 112)
    assert bands * rows <= 112


def test_huge_bucket_gives_linear_star_edges():
    n = 100_000
    i, j = bucket_star_pairs(np.zeros(n, dtype=np.uint64), np.arange(n, dtype=np.int64)[::-1].copy())
    assert len(i) == n - 1 and set(np.unique(i).tolist()) == {n - 1}   # every member to the minimum node 0


def test_an_empty_partition_gives_no_pairs():
    """A shuffle partition no band key fell into (a small run with many partitions) once raised IndexError."""
    i, j = bucket_star_pairs(np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64))
    assert len(i) == len(j) == 0
    i, j = bucket_star_pairs(np.array([7], dtype=np.uint64), np.array([3], dtype=np.int64))
    assert len(i) == len(j) == 0


def test_connected_components_match_union_find():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(2, 300))
        u, v = rng.integers(0, n, 400), rng.integers(0, n, 400)
        u, v = u[u != v].astype(np.int64), v[u != v].astype(np.int64)
        parent = list(range(n))

        def find(x: int, parent: list[int] = parent) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for a, b in zip(u.tolist(), v.tolist()):
            ra, rb = find(a), find(b)
            parent[max(ra, rb)] = min(ra, rb)
        groups: dict[int, list[int]] = {}
        for x in set(u.tolist()) | set(v.tolist()):
            groups.setdefault(find(x), []).append(x)
        want = {x: min(g) for g in groups.values() for x in g}
        assert connected_components_local(u, v) == want


def test_config_errors_name_the_key(tmp_path):
    from pipeline.config import ConfigError, parse_config

    base = {"sources": [{"name": "s", "kind": "book", "paths": [str(ROOT)]}]}
    with pytest.raises(ConfigError, match=r"dedup: .*bands and rows: give both or neither"):
        parse_config({**base, "dedup": {"bands": 4}})
    with pytest.raises(ConfigError, match=r"dedup.threshold: .*less than 1"):
        parse_config({**base, "dedup": {"threshold": 1.5}})


def test_plan_dedup_scales_and_recommends_partitions():
    from pipeline.config import DedupConfig
    from pipeline.dedup.plan import parse_size, plan_dedup

    small, large = plan_dedup(10**6, DedupConfig()), plan_dedup(10**8, DedupConfig())
    assert sum(large.disk.values()) == pytest.approx(100 * sum(small.disk.values()), rel=0.01)
    wide = plan_dedup(10**8, DedupConfig(partitions=256))
    assert wide.task_memory["candidates (per partition)"] < large.task_memory["candidates (per partition)"] / 15
    # the recommendation brings the widest task under the budget
    budget = parse_size("1GiB")
    advice = plan_dedup(10**8, DedupConfig(), task_budget=budget).recommended_partitions
    fitted = plan_dedup(10**8, DedupConfig(partitions=advice), task_budget=budget)
    assert max(fitted.task_memory["candidates (per partition)"],
               fitted.task_memory["connected components (per partition)"]) <= budget
    proc = run_cli("plan-dedup", "--docs", "1000000")
    assert proc.returncode == 0 and "signatures" in proc.stdout and "fewest partitions within the per-task budget" in proc.stdout


def test_a_run_over_its_declared_task_memory_is_refused_before_any_work(tmp_path):
    from pipeline.config import ConfigError, DedupConfig
    from pipeline.dedup.plan import check_budget

    dump = {"expected_docs": 3_000_000_000, "task_memory": "2GiB"}
    plan = check_budget(DedupConfig(partitions=1600, **dump))
    assert plan is not None and max(plan.task_memory.values()) <= 2 * 2**30
    with pytest.raises(ConfigError, match=r"dedup: 64 partitions need 49\.\d\d GiB per task .*set dedup.partitions >= 1599"):
        check_budget(DedupConfig(partitions=64, **dump))
    assert check_budget(DedupConfig(partitions=64)) is None  # nothing declared, nothing to check
    books = tmp_path / "books"
    books.mkdir()
    (books / "a.txt").write_text("text " * 100)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"sources": [{"name": "b", "kind": "book", "paths": [str(books)]}],
                                                     "dedup": {"partitions": 64, **dump}}))
    proc = run_cli("run", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "run"))
    assert proc.returncode == 2 and "set dedup.partitions >= 1599" in proc.stderr
    assert not (tmp_path / "run").exists()
    shipped = yaml.safe_load((ROOT / "configs/pipeline/web-books-code.yaml").read_text())["dedup"]
    assert check_budget(DedupConfig(**shipped)) is not None  # the production template fits its own budget


@pytest.mark.slow
@pytest.mark.realdata
def test_repeated_ids_in_the_input_lose_only_the_exact_copy(corpus, tmp_path):
    """Repeated id_field values: a record repeated verbatim (id and text), and a record reusing doc-5's id
    with doc-7's text. The run completes (it once crashed in the graph phase); each text is kept once: the
    verbatim copy is removed, and the reused-id record is an exact copy of doc-7 (documents sharing an id
    are still separate graph nodes, so it is found), while doc-5 itself is kept."""
    book = (corpus.root / "books/austen-persuasion.txt").read_text()
    paras = [p for p in book.split("\n\n") if len(p) > 400][:30]
    with open(tmp_path / "records.jsonl", "w") as fh:
        for i, para in enumerate(paras):
            fh.write(json.dumps({"id": f"doc-{i}", "text": para}) + "\n")
        fh.write(json.dumps({"id": "doc-3", "text": paras[3]}) + "\n")
        fh.write(json.dumps({"id": "doc-5", "text": paras[7]}) + "\n")
    config = {"run": {"num_cpus": 2},
              "sources": [{"name": "j", "kind": "book", "format": "jsonl", "paths": [str(tmp_path / "records.jsonl")],
                           "id_field": "id"}],
              "crawl_filter": {"book": {"min_words": 10, "language": {"enabled": False}}},
              "tokenize": {"train": {"vocab_size": 300, "sample_mb": 0.2}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    proc = run_cli("run", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "run"), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    dedup = json.loads((tmp_path / "run/stats.json").read_text())["stages"]["dedup"]["j"]
    assert (dedup["in"], dedup["kept"], dedup["dropped"]) == (32, 30, {"exact_duplicate": 2})
    kept = [t for f in sorted((tmp_path / "run/stages/dedup").glob("j-*.parquet"))
            for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
    assert sorted(kept) == sorted(paras)
