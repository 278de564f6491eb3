"""Scale rehearsal of line dedup's reduce and apply memory, on synthetic line hashes.

    python bench/line_dedup_scale.py --votes 100000000 --units 200 --partitions 16 64 --out /tmp/ld-scale

Each unit's votes (document, distinct line) are a mix of boilerplate (``--boilerplate`` of them drawn from a
pool of 10^6 lines with a Zipf law, as navigation and footers are) and lines of their own (random 64-bit
hashes), combined per unit and written exactly as ``LineHashStage`` writes them (``write_partitioned`` by
hash % partitions). For each partition count it then runs

* the reduce on Ray (``run_line_reduce``: merges with fan-in, one task per partition), wall time;
* one reduce task body and one merge task body alone, each in a fresh process, for their peak resident
  memory above the interpreter and imports: anonymous (what the task owns) and file-backed (pages of
  memory-mapped inputs it touched: the page cache's, shared and reclaimable);
* the apply's lookups for one unit's worth of line hashes (a third of them frequent) against the frequent
  files (``FrequentLines``), in a fresh process: maps held, and the same two peaks; with ``--frequent N``
  also against a synthetic frequent set of N lines (the reduce's output of a much larger corpus).
"""

from __future__ import annotations

import argparse
import json
import shutil
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
    """Run ``code`` in a fresh interpreter; its result is the dict ``out`` it leaves, plus the peak anonymous
    and file-backed resident memory above what the process held before ``code`` ran (the interpreter and
    imports), sampled every 2 ms from /proc/self/status."""
    prelude = (f"import json, sys, threading, time; sys.path.insert(0, {str(ROOT)!r})\n"
               "import numpy as np, pyarrow as pa\n"
               "from pipeline.stages.line_dedup import reduce_step, FrequentLines\n"
               "from pipeline.dedup.shuffle import merge_task\n"
               "def _rss():\n"
               "    st = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
               "    return int(st['RssAnon'].split()[0]), int(st['RssFile'].split()[0])\n"
               "_base = _rss(); _peak = list(_base)\n"
               "def _sample():\n"
               "    while True:\n"
               "        a, f = _rss(); _peak[0] = max(_peak[0], a); _peak[1] = max(_peak[1], f); time.sleep(0.002)\n"
               "threading.Thread(target=_sample, daemon=True).start()\n")
    report = ("time.sleep(0.01)\n"
              "out.update(peak_anon_mib=round((_peak[0] - _base[0]) / 1024, 1), "
              "peak_file_mib=round((_peak[1] - _base[1]) / 1024, 1))\n"
              "print(json.dumps(out))")
    proc = subprocess.run([sys.executable, "-c", prelude + code + "\n" + report], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_frequent(run: Path, count: int, partitions: int) -> int:
    """A frequent set of ``count`` random hashes, written as the reduce writes it (sorted, per partition)."""
    import pyarrow as pa

    from pipeline.dedup.shuffle import write_ipc
    from pipeline.stages.line_dedup import frequent_path, hash_partition

    rng = np.random.default_rng(99)
    hashes = np.unique(rng.integers(0, 2**64 - 1, count, dtype=np.uint64, endpoint=True))
    part = hash_partition(hashes, partitions)
    for k in range(partitions):
        mine = hashes[part == k]
        write_ipc(frequent_path(run, k), pa.table({"hash": pa.array(mine, pa.uint64()),
                                                   "documents": pa.array(np.full(len(mine), 3, np.uint32))}))
    return len(hashes)


APPLY = """from pathlib import Path
rng = np.random.default_rng(7)
table = pa.ipc.open_file(pa.memory_map({part0!r})).read_all().column('hash').to_numpy()
hits = table[rng.integers(0, len(table), {hits})] if len(table) else np.zeros(0, np.uint64)   # frequent lines
del table
h = np.concatenate([hits, rng.integers(0, 2**64 - 1, {lines} - len(hits), dtype=np.uint64, endpoint=True)])
f = FrequentLines(Path({run!r}), {P})
found = f.lookup(h)
maps = sum(1 for line in open('/proc/self/maps') if 'frequent/part-' in line)
out = {{'lines': len(h), 'found': int(found.sum()), 'maps_held': maps, 'max_open': f.max_open}}
f.close()
out['maps_after_close'] = sum(1 for line in open('/proc/self/maps') if 'frequent/part-' in line)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--votes", type=int, default=10**8)
    ap.add_argument("--units", type=int, default=200)
    ap.add_argument("--boilerplate", type=float, default=0.3)
    ap.add_argument("--partitions", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--fan-in", type=int, default=64)
    ap.add_argument("--apply-lines", type=int, default=2_000_000, help="line hashes of one unit looked up")
    ap.add_argument("--frequent", type=int, default=0, help="also look up against a frequent set this large")
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
        entry["apply_lookup"] = child(APPLY.format(part0=str(frequent_path(run, 0)), hits=args.apply_lines // 3,
                                                   lines=args.apply_lines, run=str(run), P=P))
        if args.frequent:      # the same lookups against a large frequent set
            big = args.out / f"big-p{P}"
            entry["large_frequent_set"] = write_frequent(big, args.frequent, P)
            entry["large_frequent_bytes"] = sum(frequent_path(big, k).stat().st_size for k in range(P))
            entry["apply_lookup_large"] = child(APPLY.format(part0=str(frequent_path(big, 0)), hits=args.apply_lines // 3,
                                                             lines=args.apply_lines, run=str(big), P=P))
            shutil.rmtree(big)
        entry["estimate"] = reduce_memory(hash_bytes, args.units, cfg)
        report[f"partitions_{P}"] = entry
        print(json.dumps({P: entry}, indent=1), flush=True)
        for path in (run / "stages" / HASHES).glob("*.arrow"):
            path.unlink()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
