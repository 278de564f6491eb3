"""Scale rehearsal on one machine: what grows with the number of units and with dedup's partitions.

The pipeline (crawl_filter -> dedup, or the whole run with ``--full``) on a real local Ray, over N small
real units: the demo corpus' books cut into 4,000-character documents, two per JSONL file, one file per
unit, replicated under distinct ids (``build_units``: each document five times, four near-duplicates to
remove, at every size). For each case, measured in a fresh driver process:

* driver peak RSS (sampled every 0.2 s from /proc/self/status, and VmHWM at the end);
* the most object references the driver held at once (Ray's reference table of the driver process —
  every object the driver owns or borrows; the previous dedup design held 2·P² per star round);
* the most memory maps and open files of the run's data that one graph task held (``dedup.shuffle`` in
  stats: merges, candidates, rounds, labels, keepers, removals);
* scheduling overhead per unit for each map stage: (wall × CPUs − the stage's busy seconds) / units;
* wall time per document.

    .venv/bin/python bench/scale.py --units 1000 5000 20000 --partitions 64
    .venv/bin/python bench/scale.py --units 1000 --partitions 64 256 1024
    .venv/bin/python bench/scale.py --units 1000 --partitions 64 256 1024 --baseline-rev ebb41a1  # old graph too

``--baseline-rev`` runs the same cases with the project at that git revision (a temporary worktree), side
by side. Results: ``--json`` (default bench/results/scale.json).
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

ROOT = Path(__file__).resolve().parent.parent
DOC_CHARS = 4000
DOCS_PER_UNIT = 2


# ------------------------------------------------------------------------------------------ the input
def book_chunks() -> list[str]:
    """The demo corpus' books (real text), cut into documents of about DOC_CHARS characters."""
    import gzip

    sys.path.insert(0, str(ROOT))
    from pipeline.realdata import build_demo_corpus

    corpus = build_demo_corpus(scale="demo")
    chunks = []
    for path in corpus.books:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8", errors="replace")
        chunks += [text[i:i + DOC_CHARS] for i in range(0, len(text) - DOC_CHARS, DOC_CHARS)]
    return chunks


def build_units(directory: Path, units: int, chunks: list[str] | None = None, copies: int = 5) -> Path:
    """``units`` JSONL files of DOCS_PER_UNIT documents each, every document present ``copies`` times
    (the first as is, the others near-duplicates: their own first line), so the share of duplicates is
    the same at every size. Beyond the pool of passages, a document joins the first half of one passage
    to the second half of another (Jaccard ~1/3 with either: a distinct document)."""
    chunks = chunks if chunks is not None else book_chunks()
    directory.mkdir(parents=True, exist_ok=True)
    half = DOC_CHARS // 2
    for u in range(units):
        lines = []
        for d in range(DOCS_PER_UNIT):
            n = u * DOCS_PER_UNIT + d
            group, copy = divmod(n, copies)
            wrap, base = divmod(group, len(chunks))
            text = chunks[base] if wrap == 0 else chunks[base][:half] + chunks[(base + 7919 * wrap) % len(chunks)][half:]
            if copy:
                text = f"Replica {copy} of passage {group}.\n{text}"
            lines.append(json.dumps({"id": f"doc-{n:08d}", "text": text}))
        (directory / f"unit-{u:06d}.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def scale_config(data: Path, partitions: int, fan_in: int, full: bool) -> dict:
    unit_bytes = DOCS_PER_UNIT * DOC_CHARS * 1.1
    return {"run": {"num_cpus": 2, "unit_target_mb": 1.5 * unit_bytes / 2**20},
            "sources": [{"name": "books", "kind": "book", "format": "jsonl", "paths": [str(data)], "id_field": "id"}],
            "crawl_filter": {"book": {"min_words": 10, "language": {"enabled": False}}},
            "dedup": {"partitions": partitions, "fan_in": fan_in},
            "tokenize": {"train": {"vocab_size": 1024, "sample_mb": 2}, "shard_target_mb": 8}}


# ------------------------------------------------------------------------------------------ one case
class DriverSampler(threading.Thread):
    """Samples this process's RSS and Ray reference table while the run goes on."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_rss = 0
        self.peak_refs = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            time.sleep(0.2)

    def sample(self) -> None:
        self.peak_rss = max(self.peak_rss, _status_kib("VmRSS") * 1024)
        try:
            import ray

            if ray.is_initialized():
                worker = ray._private.worker.global_worker
                self.peak_refs = max(self.peak_refs, len(worker.core_worker.get_all_reference_counts()))
        except Exception:  # noqa: BLE001 - a sample lost at start-up or shutdown
            pass


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def run_case(config_path: Path, out: Path, until: str | None) -> dict:
    """In this (fresh) process: one pipeline run with the driver sampled; what stats.json says."""
    import yaml

    from pipeline.config import parse_config
    from pipeline.runner import PipelineRun, init_ray

    config = parse_config(yaml.safe_load(config_path.read_text()))
    sampler = DriverSampler()
    sampler.start()
    started = time.perf_counter()
    init_ray(None, config.run.num_cpus)
    report = PipelineRun(config, out, progress=False, until=until).run()
    wall = time.perf_counter() - started
    sampler.stop.set()
    sampler.join()
    sampler.sample()
    stats = report.stats
    graph = json.loads((out / "stages/dedup/graph.done.json").read_text())
    cpus = config.run.num_cpus
    overhead, documents = {}, 0
    for stage, seconds in stats.get("wall_seconds", {}).items():
        markers = [json.loads(m.read_text()) for m in (out / "stages" / stage).glob("*.done.json")
                   if m.name != "graph.done.json"]
        busy = sum(m.get("task_seconds", 0.0) for m in markers)
        if markers and busy:
            overhead[stage] = round((seconds * cpus - busy) / len(markers) * 1000, 2)   # ms per unit
        if stage == "dedup_signatures":
            documents = sum(m.get("documents", 0) for m in markers)
    return {"units": report.units, "documents": documents, "wall_s": round(wall, 2),
            "s_per_1k_docs": round(wall / max(1, documents) * 1000, 3),
            "driver_peak_rss_mb": round(sampler.peak_rss / 2**20, 1),
            "driver_hwm_mb": round(_status_kib("VmHWM") / 1024, 1), "driver_peak_refs": sampler.peak_refs,
            "graph_seconds": graph.get("seconds"), "shuffle": graph.get("shuffle"), "removed": graph.get("removed"),
            "rounds": graph.get("rounds"), "overhead_ms_per_unit": overhead,
            "wall_seconds": stats.get("wall_seconds")}


def one_case(args) -> None:
    result = run_case(Path(args.config), Path(args.out), args.until)
    Path(args.result).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------ the sweep
def case(project: Path, data: Path, work: Path, units: int, partitions: int, fan_in: int, full: bool,
         label: str) -> dict:
    import yaml

    config = scale_config(data, partitions, fan_in, full)
    if label != "ours":
        config["dedup"].pop("fan_in")            # the baseline has no such key
    cfg_path = work / f"{label}-{units}-{partitions}.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    out = work / f"{label}-{units}-{partitions}"
    result_path = work / f"{label}-{units}-{partitions}.json"
    cmd = [sys.executable, str(ROOT / "bench/scale.py"), "--one", "--config", str(cfg_path), "--out", str(out),
           "--result", str(result_path)] + ([] if full else ["--until", "dedup"])
    env = {**os.environ, "JAMBA_RAY_DASHBOARD": "0", "PYTHONPATH": str(project)}
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"label": label, "units": units, "partitions": partitions, "error": proc.stderr[-2000:]}
    result = json.loads(result_path.read_text())
    subprocess.run(["rm", "-rf", str(out)])
    return {"label": label, "partitions": partitions, "fan_in": fan_in if label == "ours" else None, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--partitions", type=int, nargs="+", default=[64])
    parser.add_argument("--fan-in", type=int, default=64)
    parser.add_argument("--full", action="store_true", help="the whole run (tokenize and shards), not until dedup")
    parser.add_argument("--baseline-rev", help="also run each case with the project at this git revision")
    parser.add_argument("--baseline-max-partitions", type=int, default=256,
                        help="the baseline only up to this many partitions (its graph grows with P^2)")
    parser.add_argument("--baseline-max-units", type=int, default=5000, help="the baseline only up to this many units")
    parser.add_argument("--json", default=str(ROOT / "bench/results/scale.json"))
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--until", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one_case(args)
    work = Path(tempfile.mkdtemp(prefix="jamba-scale-"))
    baseline = None
    if args.baseline_rev:
        baseline = work / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(baseline), args.baseline_rev],
                       check=True)
    chunks = book_chunks()
    rows = []
    try:
        for units in args.units:
            data = build_units(work / f"in-{units}", units, chunks)
            for partitions in args.partitions:
                projects = [("ours", ROOT)]
                if baseline and partitions <= args.baseline_max_partitions and units <= args.baseline_max_units:
                    projects.append(("baseline", baseline))
                for label, project in projects:
                    row = case(project, data, work, units, partitions, args.fan_in, args.full, label)
                    rows.append(row)
                    print(json.dumps({k: row.get(k) for k in ("label", "units", "partitions", "wall_s",
                                                               "driver_peak_rss_mb", "driver_peak_refs",
                                                               "graph_seconds", "overhead_ms_per_unit", "error")}),
                          flush=True)
                    if row.get("shuffle"):
                        print("   shuffle:", json.dumps(row["shuffle"]), flush=True)
    finally:
        if baseline:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)])
        subprocess.run(["rm", "-rf", str(work)])
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "cases": rows}, indent=1))


if __name__ == "__main__":
    main()
