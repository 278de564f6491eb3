"""URL dedup: cost per document of its three phases on real pages, and a scale rehearsal of its reduce.

1. ``--web``: the web benchmark corpus (``fetch-web``: ~2,650 real pages, 13 WARCs) read twice, as two
   sources (a crawl and its re-crawl: every URL twice), through the real pipeline ``--until url_dedup`` on
   a local Ray with every crawl filter off (each extracted page reaches URL dedup). Per phase: busy seconds
   (the tasks' own time, from the markers and the reduce summary) per document entering URL dedup, in µs.
2. ``--scale N``: synthetic key files for N documents (``--units`` files, ~30 % of the documents re-crawls
   of another's URL, a few URLs crawled hundreds of times) written as phase 1 writes them, then
   ``run_url_reduce`` on a local Ray for each ``--partitions`` value: per task the rows it held, the bytes
   of its columns, its peak resident-memory growth (VmHWM reset per task), the most files it held mapped
   and open; the reduce's wall time. Memory per task should follow 1/partitions.

    .venv/bin/python bench/url_dedup.py --web --scale 10000000 --units 400 --partitions 16 64
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402


def bench_web(work: Path, cpus: int) -> dict:
    from pipeline.config import load_config
    from pipeline.realdata import build_web_corpus
    from pipeline.runner import PipelineRun

    corpus = build_web_corpus()
    off = {"enabled": False}
    sources = [{"name": name, "kind": "web", "paths": [str(corpus.root)]} for name in ("crawl", "recrawl")]
    cfg = {"run": {"num_cpus": cpus, "unit_target_mb": 2},
           "sources": sources,
           "crawl_filter": {"web": {s: off for s in ("url", "language", "gopher_repetition", "gopher_quality",
                                                     "c4", "fineweb", "badwords")}, "pii": off}}
    (work / "web.yaml").write_text(yaml.safe_dump(cfg))
    run_dir = work / "web-run"
    report = PipelineRun(load_config(work / "web.yaml"), run_dir, progress=False, until="url_dedup").run()

    def busy(stage: str) -> tuple[float, int]:
        markers = [json.loads(p.read_text()) for p in (run_dir / "stages" / stage).glob("*.done.json")
                   if p.name != "reduce.done.json"]
        return sum(m["task_seconds"] for m in markers), len(markers)

    summary = json.loads((run_dir / "stages/url_dedup/reduce.done.json").read_text())
    docs = summary["documents"]
    keys_s, units = busy("url_dedup_keys")
    apply_s, _ = busy("url_dedup")
    reduce_s = summary["shuffle"]["task_seconds"]
    warm_dir = work / "warm"                 # a copy: the pipeline run's own files stay as its markers list them
    shutil.rmtree(warm_dir, ignore_errors=True)
    shutil.copytree(run_dir / "stages/crawl_filter", warm_dir / "stages/crawl_filter")
    warm = _warm_phases(warm_dir, load_config(work / "web.yaml"))
    return {"documents": docs, "units": units, "removed": summary["removed"], "urls": summary["urls"],
            "mean_chars": warm.pop("mean_chars"),
            "pipeline_us_per_doc": {"keys": round(keys_s / docs * 1e6, 1), "reduce": round(reduce_s / docs * 1e6, 1),
                                    "apply": round(apply_s / docs * 1e6, 1)},
            "pipeline_busy_seconds": {"keys": round(keys_s, 3), "reduce": round(reduce_s, 3),
                                      "apply": round(apply_s, 3)},
            "warm_in_process_us_per_doc": warm,
            "reduce_tasks": summary["shuffle"]["tasks"], "wall_seconds": report.stats["wall_seconds"]}


def _warm_phases(run_dir: Path, config, repeats: int = 3) -> dict:
    """The three phases again in this process on the same units (imports done, files cached): the least
    CPU time (``process_time``: all threads, not the time the process waited for a core) of ``repeats`` per
    phase, the reduce as one task over all rows (partitions 1, no Ray)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.audit import DROPPED_DIR
    from pipeline.sources import plan_units
    from pipeline.stages.crawl_filter import CrawlFilterStage
    from pipeline.stages.url_dedup import (
        URLDedupApplyStage,
        URLKeyStage,
        collect_step,
        reduce_step,
        removal_parts,
    )

    units = plan_units(config)
    crawl = CrawlFilterStage(config)
    cfg = config.url_dedup.model_copy(update={"partitions": 1})
    index = {u.id: i for i, u in enumerate(sorted(units, key=lambda u: u.id))}
    docs = sum(pq.ParquetFile(crawl.output_path(run_dir, u)).metadata.num_rows for u in units)
    chars = sum(pc.sum(pc.utf8_length(pq.read_table(crawl.output_path(run_dir, u), columns=["text"])["text"])).as_py()
                or 0 for u in units)
    keys = URLKeyStage(cfg, crawl, index)
    apply = URLDedupApplyStage(cfg, crawl, index, config.audit)
    R = removal_parts(cfg, len(units))
    files = [str(keys.output_path(run_dir, u)) for u in sorted(units, key=lambda u: u.id)]
    reduced, removals = run_dir / "warm-reduce.arrow", run_dir / "stages/url_dedup/removals/part-00000.arrow"
    best: dict[str, float] = {}
    for _ in range(repeats):
        timings = {}
        t = time.process_time()
        for u in units:
            keys.run_unit(u, run_dir)
        timings["keys"] = time.process_time() - t
        t = time.process_time()
        reduce_step(0, files, None, cfg.keep, len(units), R, str(reduced), str(run_dir))
        collect_step(0, [str(reduced)], str(removals), str(run_dir))
        timings["reduce"] = time.process_time() - t
        t = time.process_time()
        for u in units:
            apply.run_unit(u, run_dir)
        timings["apply"] = time.process_time() - t
        # floors: reading what the keys phase reads, and copying the unit as the apply phase does
        t = time.process_time()
        for u in units:
            for batch in pq.ParquetFile(crawl.output_path(run_dir, u)).iter_batches(
                    batch_size=1024, columns=["id", "source", "metadata", "text"]):
                pc.utf8_length(batch.column("text"))
        timings["floor_read_keys_columns"] = time.process_time() - t
        t = time.process_time()
        for u in units:
            source = pq.ParquetFile(crawl.output_path(run_dir, u))
            with pq.ParquetWriter(run_dir / "copy.parquet", source.schema_arrow, compression="zstd") as writer:
                for batch in source.iter_batches(batch_size=1024):
                    writer.write_batch(batch)
        timings["floor_copy_unit"] = time.process_time() - t
        best = {k: min(v, best.get(k, v)) for k, v in timings.items()}
    assert (apply.stage_dir(run_dir) / DROPPED_DIR).exists()
    return {**{k: round(v / docs * 1e6, 1) for k, v in best.items()}, "mean_chars": round(chars / docs)}


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64: URL ids -> well-spread 64-bit keys."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def write_synthetic_keys(run_dir: Path, docs: int, units: int, partitions: int, seed: int = 0) -> list:
    """Key files as ``URLKeyStage`` writes them, for ``docs`` documents over ``units`` units."""
    from types import SimpleNamespace

    from pipeline.dedup.shuffle import write_partitioned
    from pipeline.dedup.steps import make_loc
    from pipeline.stages.url_dedup import KEYS

    rng = np.random.default_rng(seed)
    key_dir = run_dir / "stages" / KEYS
    key_dir.mkdir(parents=True, exist_ok=True)
    per_unit = -(-docs // units)
    out = []
    for u in range(units):
        n = min(per_unit, docs - u * per_unit)
        url = u * per_unit + np.arange(n)                 # a URL of its own, or
        again = rng.random(n) < 0.3                       # a re-crawl of any URL of the run
        url[again] = rng.integers(0, docs, int(again.sum()))
        hot = rng.random(n) < 0.001                       # a few URLs crawled very often
        url[hot] = rng.integers(0, 50, int(hot.sum()))
        key = _mix(url)
        cols = {"key": key, "date": rng.integers(1.6e15, 1.7e15, n).astype(np.int64),
                "chars": rng.integers(100, 100_000, n).astype(np.int64),
                "id_hi": rng.integers(0, 2**63, n, dtype=np.uint64), "id_lo": rng.integers(0, 2**32, n).astype(np.uint32),
                "loc": make_loc(0, u, np.arange(n, dtype=np.int64))}
        uid = f"synthetic-{u:05d}"
        write_partitioned(key_dir / f"{uid}.keys.arrow", cols, (key % np.uint64(partitions)).astype(np.int64),
                          partitions)
        out.append(SimpleNamespace(id=uid))
    return out


def bench_scale(work: Path, docs: int, units: int, partitions: list[int], fan_in: int) -> dict:
    import ray

    from pipeline.config import URLDedupConfig
    from pipeline.stages.url_dedup import run_url_reduce

    results = {}
    for P in partitions:
        run_dir = work / f"scale-P{P}"
        t = time.perf_counter()
        unit_list = write_synthetic_keys(run_dir, docs, units, P)
        written = time.perf_counter() - t
        cfg = URLDedupConfig(partitions=P, fan_in=fan_in)
        counts = {u.id: {"documents": -(-docs // units), "with_url": -(-docs // units)} for u in unit_list}
        t = time.perf_counter()
        summary = run_url_reduce(run_dir, unit_list, cfg, None, documents=counts)
        wall = time.perf_counter() - t
        sh = summary["shuffle"]
        results[str(P)] = {
            "partitions": P, "fan_in": fan_in, "units": units, "key_file_mb": round(sum(
                p.stat().st_size for p in (run_dir / "stages/url_dedup_keys").glob("*.arrow")) / 2**20, 1),
            "write_seconds": round(written, 2), "reduce_wall_seconds": round(wall, 2),
            "task_seconds_by_step": sh["task_seconds_by_step"], "tasks": sh["tasks"],
            "key_merge_levels": sh["key_merge_levels"], "max_reduce_rows": sh["max_reduce_rows"],
            "max_reduce_held_mib": round(sh["max_reduce_held_bytes"] / 2**20, 1),
            "max_reduce_rss_growth_mib": round(sh["max_reduce_rss_growth"] / 2**20, 1),
            "max_collect_rss_growth_mib": round(sh["max_collect_rss_growth"] / 2**20, 1),
            "max_reduce_peak_rss_mib": round(sh["max_reduce_peak_rss"] / 2**20, 1),
            "max_maps_per_task": sh["max_maps_per_task"], "max_open_files_per_task": sh["max_open_files_per_task"],
            "max_driver_refs": sh["max_driver_refs"], "removed": summary["removed"], "urls": summary["urls"],
            "duplicate_groups": summary["duplicate_groups"], "largest_group": summary["largest_group"]}
        print(json.dumps(results[str(P)]), flush=True)
        shutil.rmtree(run_dir)
    ray.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--web", action="store_true", help="per-phase cost on the web benchmark corpus")
    parser.add_argument("--scale", type=int, default=0, help="documents of the synthetic reduce rehearsal")
    parser.add_argument("--units", type=int, default=400)
    parser.add_argument("--partitions", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--fan-in", type=int, default=64)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--json", default=str(ROOT / "bench/results/url_dedup.json"))
    parser.add_argument("--work", help="work directory to keep (a rerun of --web resumes its pipeline run)")
    args = parser.parse_args()
    from pipeline.runner import init_ray

    init_ray(None, args.cpus)
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="url-dedup-bench-") as tmp:
        if args.work:
            tmp = args.work
            Path(tmp).mkdir(parents=True, exist_ok=True)
        if args.web:
            result["web"] = bench_web(Path(tmp), args.cpus)
            print(json.dumps(result["web"]), flush=True)
        if args.scale:
            result["scale"] = {"documents": args.scale,
                               **bench_scale(Path(tmp), args.scale, args.units, args.partitions, args.fan_in)}
    write_result(args.json, result)


if __name__ == "__main__":
    main()
