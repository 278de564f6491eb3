"""Dedup benchmarks, side by side in one run.

1. Signatures, one core: our vectorised MinHash vs datasketch's ``MinHash.update_batch`` per document
   (same normalised word 5-grams, as strings) vs datatrove's ``MinhashDedupSignature`` step (its own
   normalisation and word splitting, writing its signature files), on the same documents.
2. End to end: our pipeline's dedup (signatures + graph + removal, read from stats.json's wall seconds;
   the whole run also crawl-filters and tokenizes) vs datatrove's 4-stage MinHash
   (signatures, buckets, cluster, filter with ``LocalPipelineExecutor``), 2 workers each, on N documents;
   wall time and the peak resident memory of the largest single process (a worker).

Documents are built from real text (the demo corpus' books and CPython sources, fetched by
``python -m pipeline fetch-demo``): each is 25 random lines; a fifth of them are planted near-duplicates
(an earlier document with 1 % of its words replaced) and 5 % exact copies.

    .venv/bin/python bench/dedup.py --sig-docs 3000 --sizes 10000 100000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def line_pool() -> list[str]:
    from pipeline.realdata import build_demo_corpus

    corpus = build_demo_corpus(scale="demo")
    files = list(corpus.books) + [p for tree in corpus.code for p in Path(tree).rglob("*.py")]
    lines: set[str] = set()
    for path in files:
        for line in Path(path).read_text(errors="replace").splitlines():
            if len(line.strip()) >= 30:
                lines.add(line.strip())
    return sorted(lines)


def make_documents(n: int, pool: list[str], seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    docs: list[dict] = []
    for i in range(n):
        roll = rng.random()
        if docs and roll < 0.05:
            text = docs[int(rng.integers(len(docs)))]["text"]
        elif docs and roll < 0.25:
            words = docs[int(rng.integers(len(docs)))]["text"].split(" ")
            for k in rng.choice(len(words), size=max(1, len(words) // 100), replace=False):
                words[k] = f"edit{int(rng.integers(1_000_000))}"
            text = " ".join(words)
        else:
            text = "\n".join(pool[j] for j in rng.integers(len(pool), size=25))
        docs.append({"id": f"doc{i:08d}", "text": text})
    return docs


def bench_signatures(docs: list[dict], num_perm: int = 108, bands: int = 9) -> dict:
    from datasketch import MinHash
    from datatrove.data import Document
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature

    from pipeline.dedup.minhash import MinHasher, normalize_words

    texts = [d["text"] for d in docs]
    mb = sum(len(t.encode()) for t in texts) / 2**20
    hasher = MinHasher(num_perm=num_perm)
    hasher.permutations  # noqa: B018  (built once, outside the timing)
    t = time.perf_counter()
    for text in texts:
        hasher.signature(text)
    ours = time.perf_counter() - t

    t = time.perf_counter()
    for text in texts:
        words = normalize_words(text)
        shingles = {" ".join(words[i:i + 5]) for i in range(max(1, len(words) - 4))}
        m = MinHash(num_perm=num_perm)
        m.update_batch([s.encode() for s in shingles])
    datasketch = time.perf_counter() - t

    with tempfile.TemporaryDirectory() as tmp:
        step = MinhashDedupSignature(output_folder=tmp, config=MinhashConfig(num_buckets=bands,
                                                                             hashes_per_bucket=num_perm // bands))
        documents = [Document(text=d["text"], id=d["id"]) for d in docs]
        t = time.perf_counter()
        step.run(iter(documents), rank=0, world_size=1)
        datatrove = time.perf_counter() - t
    n = len(texts)
    return {"documents": n, "mb": round(mb, 2), "num_perm": num_perm,
            "ours_docs_per_s": n / ours, "datasketch_docs_per_s": n / datasketch,
            "datatrove_docs_per_s": n / datatrove, "ours_mb_per_s": mb / ours,
            "ratio_vs_datasketch": datasketch / ours, "ratio_vs_datatrove": datatrove / ours}


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time of a command and the peak RSS of its largest single descendant process."""
    import psutil

    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peak = {"max_process_rss": 0, "driver_rss": 0, "max_process_anon": 0}
    done = threading.Event()

    def poll() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                for p in procs:
                    try:
                        rss = p.memory_info().rss
                    except psutil.Error:
                        continue
                    key = "driver_rss" if p.pid == proc.pid else "max_process_rss"
                    peak[key] = max(peak[key], rss)
                    if p.pid != proc.pid:
                        peak["max_process_anon"] = max(peak["max_process_anon"], _anon_rss(p.pid))
            except psutil.Error:
                pass
            time.sleep(0.2)

    thread = threading.Thread(target=poll, daemon=True)
    started = time.perf_counter()
    thread.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - started
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return {"wall_s": wall, "max_worker_rss_mib": peak["max_process_rss"] / 2**20,
            "max_worker_anon_rss_mib": peak["max_process_anon"] / 2**20,
            "driver_rss_mib": peak["driver_rss"] / 2**20, "output": out}


def _anon_rss(pid: int) -> int:
    """Anonymous resident memory (RSS without memory-mapped file pages, which the kernel can drop)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


DATATROVE_SCRIPT = """
import sys
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                               MinhashDedupFilter, MinhashDedupSignature)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
data, work, tasks = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = MinhashConfig(num_buckets=9, hashes_per_bucket=12)
def reader():
    return JsonlReader(data, glob_pattern="*.jsonl")
LocalPipelineExecutor([reader(), MinhashDedupSignature(f"{work}/sigs", config=cfg)], tasks=tasks, workers=tasks,
                      logging_dir=f"{work}/logs/1").run()
LocalPipelineExecutor([MinhashDedupBuckets(f"{work}/sigs", f"{work}/buckets", config=cfg)], tasks=9, workers=tasks,
                      logging_dir=f"{work}/logs/2").run()
LocalPipelineExecutor([MinhashDedupCluster(f"{work}/buckets", f"{work}/remove_ids", config=cfg)], tasks=1,
                      logging_dir=f"{work}/logs/3").run()
LocalPipelineExecutor([reader(), MinhashDedupFilter(f"{work}/remove_ids"), JsonlWriter(f"{work}/out")],
                      tasks=tasks, workers=tasks, logging_dir=f"{work}/logs/4").run()
"""


def bench_end_to_end(n: int, pool: list[str], tmp: Path, datatrove: bool = True) -> dict:
    import yaml

    docs = make_documents(n, pool, seed=n)
    # ~4 MB input files, packed two to a unit: the same unit size at every N, so a worker's memory
    # should not grow with N
    files = max(2, sum(len(d["text"]) for d in docs) // (4 * 2**20))
    data = tmp / f"data-{n}"
    data.mkdir()
    for k in range(files):
        with open(data / f"part-{k}.jsonl", "w") as fh:
            for doc in docs[k::files]:
                fh.write(json.dumps(doc) + "\n")
    cfg = {"sources": [{"name": "bench", "kind": "code", "format": "jsonl", "paths": [str(data)], "id_field": "id"}],
           "crawl_filter": {"code": {"max_line_length": 100000, "max_mean_line_length": 100000,
                                     "min_alphanum_fraction": 0.0, "autogenerated_markers": False,
                                     "minified": False}},
           "dedup": {"partitions": 8},
           "tokenize": {"train": {"vocab_size": 1024, "sample_mb": 1}},
           "run": {"unit_target_mb": 8.0}}
    (tmp / f"cfg-{n}.yaml").write_text(yaml.safe_dump(cfg))
    run_dir = tmp / f"run-{n}"
    ours = measure([sys.executable, "-m", "pipeline", "run", str(tmp / f"cfg-{n}.yaml"), "--output", str(run_dir),
                    "--num-cpus", "2", "--no-progress"], env={"JAMBA_RAY_DASHBOARD": "0"})
    stats = json.loads((run_dir / "stats.json").read_text())
    wall = stats["wall_seconds"]
    dedup_s = wall.get("dedup_signatures", 0) + wall.get("dedup_graph", 0) + wall.get("dedup", 0)
    row = {"documents": n, "ours_dedup_wall_s": dedup_s, "ours_run_wall_s": ours["wall_s"],
           "ours_stage_wall_s": {k: v for k, v in wall.items() if k.startswith("dedup")},
           "ours_removed": stats["dedup"]["removed"], "ours_max_worker_rss_mib": ours["max_worker_rss_mib"],
           "ours_max_worker_anon_rss_mib": ours["max_worker_anon_rss_mib"],
           "ours_driver_rss_mib": ours["driver_rss_mib"]}
    if datatrove:
        theirs = measure([sys.executable, "-c", DATATROVE_SCRIPT, str(data), str(tmp / f"dt-{n}"), "2"])
        kept_theirs = sum(1 for p in (tmp / f"dt-{n}" / "out").glob("*.jsonl*") for _ in _lines(p))
        row.update({"datatrove_wall_s": theirs["wall_s"], "datatrove_removed": n - kept_theirs,
                    "datatrove_max_process_rss_mib": max(theirs["max_worker_rss_mib"], theirs["driver_rss_mib"]),
                    "ratio_wall_datatrove_over_ours_dedup": theirs["wall_s"] / dedup_s})
    return row


def _lines(path: Path):
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        yield from fh


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sig-docs", type=int, default=3000)
    parser.add_argument("--sizes", type=int, nargs="*", default=[10000, 100000])
    parser.add_argument("--datatrove-max", type=int, default=100000, help="largest size also run with datatrove")
    parser.add_argument("--out", default=str(ROOT / "bench/results/dedup.json"))
    args = parser.parse_args()
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    pool = line_pool()
    result = {"command": " ".join(["python", "bench/dedup.py", *sys.argv[1:]]), "line_pool": len(pool)}
    result["signatures"] = bench_signatures(make_documents(args.sig_docs, pool))
    print(json.dumps(result["signatures"], indent=2), flush=True)
    result["end_to_end"] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            row = bench_end_to_end(n, pool, Path(tmp), datatrove=n <= args.datatrove_max)
            print(json.dumps(row, indent=2), flush=True)
            result["end_to_end"].append(row)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
