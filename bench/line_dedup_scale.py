"""Scale rehearsal of line dedup's reduce and apply memory, on synthetic line hashes.

    python bench/line_dedup_scale.py --votes 100000000 --units 200 --partitions 16 64 --out /tmp/ld-scale

Each unit's votes (document, distinct line) are a mix of boilerplate (``--boilerplate`` of them drawn from a
pool of 10^6 lines with a Zipf law, as navigation and footers are) and lines of their own (random 64-bit
hashes), combined per unit and written exactly as ``LineHashStage`` writes them (``write_partitioned`` by
hash % partitions). For each partition count it then runs

* the reduce on Ray (``run_line_reduce``: merges with fan-in, one task per partition), wall time;
* one reduce task body and one merge task body alone, each in a fresh process, for their peak RSS (the
  memory a task really holds, not counting the interpreter and imports: the baseline process is subtracted);
* the apply's lookups for one unit's worth of line hashes against the frequent files (``FrequentLines``) in
  a fresh process: maps held, anonymous memory (what the task owns) and file-backed memory (pages of the
  memory-mapped frequent parts it touched; the page cache's, shared and reclaimable).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

POOL = 1_000_000


def unit_votes(u: int, votes: int, boilerplate: float) -> np.ndarray:
    from pipeline.dedup.minhash import fmix64

    rng = np.random.default_rng(1000 + u)
    common = int(votes * boilerplate)
    with np.errstate(over="ignore"):
        pool = fmix64(np.minimum(rng.zipf(1.3, common), POOL).astype(np.uint64) + np.uint64(0x51ED))
    own = rng.integers(0, 2**64 - 1, votes - common, dtype=np.uint64, endpoint=True)
    return np.concatenate([pool, own])


def write_units(run: Path, units: int, votes: int, boilerplate: float, partitions: int) -> int:
    from pipeline.dedup.shuffle import write_partitioned
    from pipeline.stages.line_dedup import HASHES, hash_partition

    rows = 0
    out = run / "stages" / HASHES
    out.mkdir(parents=True, exist_ok=True)
    for u in range(units):
        hashes, counts = np.unique(unit_votes(u, votes // units, boilerplate), return_counts=True)
        rows += write_partitioned(out / f"scale-{u:05d}.arrow", {"hash": hashes, "documents": counts.astype(np.uint32)},
                                  hash_partition(hashes, partitions), partitions)
    return rows


def child(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; its last line of output is a JSON dict, to which the peak RSS
    above a baseline process (the same imports, no work) is added."""
    prelude = (f"import json, resource, sys; sys.path.insert(0, {str(ROOT)!r})\n"
               "import numpy as np, pyarrow as pa\n"
               "from pipeline.stages.line_dedup import reduce_step, FrequentLines\n"
               "from pipeline.dedup.shuffle import merge_task\n")
    peak = "print(json.dumps({**out, 'max_rss_kib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))"
    base = subprocess.run([sys.executable, "-c", prelude + "out = {}\n" + peak], capture_output=True, text=True,
                          check=True)
    proc = subprocess.run([sys.executable, "-c", prelude + code + "\n" + peak], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["task_peak_mib"] = round((result["max_rss_kib"] - json.loads(base.stdout)["max_rss_kib"]) / 1024, 1)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--votes", type=int, default=10**8)
    ap.add_argument("--units", type=int, default=200)
    ap.add_argument("--boilerplate", type=float, default=0.3)
    ap.add_argument("--partitions", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--fan-in", type=int, default=64)
    ap.add_argument("--apply-lines", type=int, default=2_000_000, help="line hashes of one unit looked up")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from pipeline.config import LineDedupConfig
    from pipeline.runner import init_ray
    from pipeline.sources.base import Unit
    from pipeline.stages.line_dedup import HASHES, frequent_path, reduce_memory, run_line_reduce

    init_ray(None, args.cpus)
    units = [Unit(f"scale-{u:05d}", "scale", "web") for u in range(args.units)]
    report = {"votes": args.votes, "units": args.units, "boilerplate": args.boilerplate, "fan_in": args.fan_in}
    for P in args.partitions:
        run = args.out / f"p{P}"
        started = time.perf_counter()
        rows = write_units(run, args.units, args.votes, args.boilerplate, P)
        files = [str(run / "stages" / HASHES / f"{u.id}.arrow") for u in units]
        hash_bytes = sum(Path(f).stat().st_size for f in files)
        entry = {"rows_after_unit_combine": rows, "hash_file_bytes": hash_bytes,
                 "write_seconds": round(time.perf_counter() - started, 1)}
        cfg = LineDedupConfig(partitions=P, fan_in=args.fan_in)
        started = time.perf_counter()
        summary = run_line_reduce(run, units, cfg)
        entry["reduce_wall_seconds"] = round(time.perf_counter() - started, 1)
        entry.update({k: summary[k] for k in ("distinct_lines", "frequent_lines", "line_votes")})
        entry["shuffle"] = {k: summary["shuffle"][k] for k in ("merge_levels", "tasks", "max_maps_per_task",
                                                               "max_open_files_per_task", "declared_memory")}
        entry["frequent_file_bytes"] = sum(frequent_path(run, k).stat().st_size for k in range(P))
        # one reduce task body alone: partition 0 of every unit file (what the merged files hold too)
        entry["reduce_task"] = child(f"out = reduce_step(0, {files!r}, {str(run / 'probe.arrow')!r}, {str(run)!r}, 3)\n"
                                     "out.pop('histogram')")
        entry["merge_task"] = child(f"out = merge_task({files[:args.fan_in]!r}, {str(run / 'merge.arrow')!r}, {P}, "
                                    f"{str(run)!r})")
        entry["apply_lookup"] = child(
            f"from pathlib import Path\nfrom pipeline.dedup.minhash import fmix64\n"
            f"rng = np.random.default_rng(7)\n"
            f"h = np.concatenate([fmix64(np.minimum(rng.zipf(1.3, {args.apply_lines // 3}), {POOL}).astype(np.uint64)"
            f" + np.uint64(0x51ED)), rng.integers(0, 2**64 - 1, {args.apply_lines - args.apply_lines // 3}, "
            f"dtype=np.uint64, endpoint=True)])\n"
            f"f = FrequentLines(Path({str(run)!r}), {P})\n"
            f"found = f.lookup(h)\n"
            f"status = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
            f"maps = sum(1 for line in open('/proc/self/maps') if 'frequent/part-' in line)\n"
            f"out = {{'lines': len(h), 'frequent': int(found.sum()), 'maps_held': maps, 'max_open': f.max_open, "
            f"'rss_anon_mib': int(status['RssAnon'].split()[0]) // 1024, "
            f"'rss_file_mib': int(status['RssFile'].split()[0]) // 1024}}\n"
            f"f.close()\n"
            f"out['maps_after_close'] = sum(1 for line in open('/proc/self/maps') if 'frequent/part-' in line)")
        entry["estimate"] = reduce_memory(hash_bytes, args.units, cfg)
        report[f"partitions_{P}"] = entry
        print(json.dumps({P: entry}, indent=1), flush=True)
        for path in (run / "stages" / HASHES).glob("*.arrow"):
            path.unlink()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
