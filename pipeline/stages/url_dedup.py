"""URL dedup: re-crawls of the same URL collapse to one document, across the run, on Ray, in three phases.

1. ``url_dedup_keys`` (map, one task per unit): per document with a URL its 64-bit URL key, crawl date,
   text length (characters, by pyarrow compute: no Python per text) and id, and its location
   (``run << 56 | unit << 32 | row``) -> ``stages/url_dedup_keys/<unit>.keys.arrow``, a partitioned file by
   ``key % partitions`` (``pipeline.dedup.shuffle``). Documents without a URL are counted, not keyed.
2. the reduce (global; ``run_url_reduce``; files under ``stages/url_dedup/reduce/``): the unit key files
   and those of the index runs are merged with bounded fan-in (``GraphSteps.shuffled``) until at most
   ``fan_in`` remain; one task per partition groups its rows by key, keeps each group's first row in the
   keeper order (``pipeline.dedup.urls.keeper_order``: index runs first) and writes the others of this run
   as removals (unit, row, reason, kept id) partitioned by unit range (``removal_partition``); those are
   merged again and collected into ``stages/url_dedup/removals/part-r.arrow`` sorted by (unit, row). Every
   task writes a marker after its files (``GraphSteps``), so an interrupted reduce resumes at its first
   unfinished task; ``reduce.done.json`` (the summary) marks the phase complete, after which the
   intermediate directory is deleted.
3. ``url_dedup`` (map, one task per unit): the unit's documents minus its removals (one removal file per
   unit), booked as ``url_duplicate`` / ``url_duplicate:index`` in the ledger, with a sample of the dropped
   documents (``pipeline.audit.DropSampler``; metadata adds the normalised URL and the kept id).

Memory: a reduce task holds one partition (about 1/partitions of the run's URL rows, 44 bytes each, plus
the sort); a merge task holds ``fan_in`` files mapped and one partition of them; the driver one small dict
per task of a step. The removed set depends only on URLs, dates, lengths and ids: not on the workers, the
partitions, the fan-in or how the input was cut into units.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path, read_json, write_json
from pipeline.audit import DropSampler, audit_metadata
from pipeline.config import AuditConfig, ConfigError, URLDedupConfig
from pipeline.dedup.shuffle import Columns, MapProbe, merge_plan, read_partition, write_ipc, write_partitioned
from pipeline.dedup.steps import RUN_SHIFT, UNIT_BITS, UNIT_MASK, make_loc, removal_partition
from pipeline.dedup.urls import (
    KEY_VERSION,
    id_parts,
    id_text,
    keeper_order,
    normalize_url,
    parse_crawl_date,
    url_key,
)
from pipeline.ledger import Ledger
from pipeline.sources.base import Unit
from pipeline.stages.base import STAGES_DIR, MapStage

KEYS = "url_dedup_keys"
STAGE = "url_dedup"
READ_BATCH = 1024
MIB = 2**20
KEY_COLUMNS = ("key", "date", "chars", "id_hi", "id_lo", "loc")
KEY_DTYPES = (np.uint64, np.int64, np.int64, np.uint64, np.uint32, np.int64)
ROW_BYTES = sum(np.dtype(t).itemsize for t in KEY_DTYPES)           # 44 bytes per document with a URL
REMOVAL_COLUMNS = ("unit", "row", "reason", "kept_hi", "kept_lo")
REASON_RUN, REASON_INDEX = 0, 1
REASONS = {REASON_RUN: "url_duplicate", REASON_INDEX: "url_duplicate:index"}
PARAMS = "params.json"
DONE = "reduce.done.json"


def key_params(cfg: URLDedupConfig) -> dict[str, Any]:
    """What shapes the key files; an index run must share it."""
    return {"key_version": KEY_VERSION, "partitions": cfg.partitions}


def write_key_params(run_dir: Path, cfg: URLDedupConfig, rows: int) -> None:
    """Written once every unit's key file exists (``rows``: documents keyed in all): from then on the run
    can be an index of later runs."""
    write_json(run_dir / STAGES_DIR / KEYS / PARAMS, {**key_params(cfg), "rows": int(rows)})


def removal_parts(cfg: URLDedupConfig, unit_count: int) -> int:
    """Removal files: one per range of units, as many as partitions (fewer for few units)."""
    return max(1, min(cfg.partitions, unit_count))


def check_url_index(cfg: URLDedupConfig, run_dir: Path | None = None) -> list[Path]:
    """The index runs' key files, or a one-line ``ConfigError`` naming the run and what is wrong."""
    ours = key_params(cfg)
    files: list[Path] = []
    for entry in cfg.index:
        index = Path(entry)
        if run_dir is not None and index.resolve() == Path(run_dir).resolve():
            raise ConfigError(f"url_dedup.index: {entry}: that is this run's own directory")
        params = index / STAGES_DIR / KEYS / PARAMS
        if not params.exists():
            raise ConfigError(f"url_dedup.index: {entry}: no URL keys there ({STAGES_DIR}/{KEYS}/{PARAMS} is "
                              f"missing; run it with url_dedup enabled through the url_dedup stage)")
        theirs = read_json(params)
        for name, value in ours.items():
            if theirs.get(name) != value:
                raise ConfigError(f"url_dedup.index: {entry}: built with {name}={theirs.get(name)!r}, this run "
                                  f"uses {value!r} (use an index of the same URL key version and partitions)")
        files += sorted(params.parent.glob("*.keys.arrow"))
    return files


# ------------------------------------------------------------------------------------ phase 1
class URLKeyStage(MapStage):
    name = KEYS

    def __init__(self, cfg: URLDedupConfig, input_stage: MapStage, unit_index: dict[str, int]):
        self.partitions = cfg.partitions
        self.input_stage = input_stage
        self.unit_index = unit_index

    def output_path(self, run_dir: Path, unit: Unit) -> Path:
        return self.stage_dir(run_dir) / f"{unit.id}.keys.arrow"

    def run_unit(self, unit: Unit, run_dir: Path) -> dict[str, Any]:
        keys: list[int] = []
        dates: list[int] = []
        rows: list[int] = []
        ids: list[str] = []
        chars: list[np.ndarray] = []
        without: Counter = Counter()
        base = 0
        source = pq.ParquetFile(self.input_stage.output_path(run_dir, unit))
        for batch in source.iter_batches(batch_size=READ_BATCH, columns=["id", "source", "metadata", "text"]):
            lengths = pc.utf8_length(batch.column("text")).to_numpy(zero_copy_only=False)
            batch_ids, sources = batch.column("id").to_pylist(), batch.column("source").to_pylist()
            keyed = []
            for i, meta in enumerate(batch.column("metadata").to_pylist()):
                fields = json.loads(meta)
                url = fields.get("url")
                normalized = normalize_url(url) if isinstance(url, str) else None
                if normalized is None:
                    without[sources[i]] += 1
                    continue
                keys.append(url_key(normalized))
                dates.append(parse_crawl_date(fields.get("crawl_date")))
                ids.append(batch_ids[i])
                keyed.append(i)
            rows += [base + i for i in keyed]
            chars.append(lengths[keyed].astype(np.int64))
            base += batch.num_rows
        id_hi, id_lo = id_parts(ids) if ids else (np.zeros(0, np.uint64), np.zeros(0, np.uint32))
        key = np.array(keys, dtype=np.uint64)
        columns = {"key": key, "date": np.array(dates, dtype=np.int64),
                   "chars": np.concatenate(chars) if chars else np.zeros(0, np.int64), "id_hi": id_hi,
                   "id_lo": id_lo, "loc": make_loc(0, self.unit_index[unit.id], np.array(rows, dtype=np.int64))}
        P = self.partitions
        write_partitioned(self.output_path(run_dir, unit), columns, (key % np.uint64(P)).astype(np.int64), P,
                          {"url_dedup.key_version": str(KEY_VERSION)})
        return {"documents": base, "with_url": len(keys), "without_url": base - len(keys),
                "without_url_by_source": dict(sorted(without.items()))}


# ------------------------------------------------------------------------------------ phase 2
class IndexRunKeys:
    """Key rows of an earlier run: their locations carry the run number (never removed; they rank first)."""

    def __init__(self, run: int):
        self.run = run

    def __call__(self, cols: Columns) -> Columns:
        return {**cols, "loc": cols["loc"] | (np.int64(self.run) << RUN_SHIFT)}


class TaskMemory:
    """A task's peak resident memory above what its process held when it started (Linux: the peak is reset
    through /proc/self/clear_refs, so a reused Ray worker reports this task alone; zeros elsewhere)."""

    def __init__(self) -> None:
        self.start = 0
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.start = self._status("VmRSS")
        except OSError:
            pass

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def growth(self) -> int:
        return max(0, self.peak() - self.start)

    def peak(self) -> int:
        """The process's peak resident memory during the task (the worker's own included)."""
        try:
            return self._status("VmHWM")
        except OSError:
            return 0


def _typed(cols: Columns, names: tuple[str, ...], dtypes: tuple) -> list[np.ndarray]:
    return [cols[n].astype(t, copy=False) for n, t in zip(names, dtypes)]


def reduce_step(k: int, inputs: list[str], transforms: list | None, keep: str, unit_count: int,
                removal_files: int, out: str, root: str) -> dict[str, Any]:
    """Partition k of every key file -> groups by URL key -> each group's keeper stays, this run's other
    rows become removals (unit, row, reason, kept id), partitioned by unit range."""
    memory, probe = TaskMemory(), MapProbe(root)
    cols = read_partition(inputs, k, KEY_COLUMNS, transforms)
    key, date, chars, id_hi, id_lo, loc = _typed(cols, KEY_COLUMNS, KEY_DTYPES)
    del cols
    held = sum(a.nbytes for a in (key, date, chars, id_hi, id_lo, loc))
    is_index = (loc >> RUN_SHIFT) != 0
    order = keeper_order(keep, key, is_index, date, chars, id_hi, id_lo, loc)
    key, loc, is_index, id_hi, id_lo = key[order], loc[order], is_index[order], id_hi[order], id_lo[order]
    held += order.nbytes
    del order, date, chars
    n = len(key)
    first = np.r_[True, key[1:] != key[:-1]] if n else np.zeros(0, bool)
    starts = np.flatnonzero(first)
    group = np.cumsum(first) - 1
    sizes = np.diff(np.r_[starts, n])
    new_rows = np.add.reduceat((~is_index).astype(np.int64), starts) if n else np.zeros(0, np.int64)
    removed = ~first & ~is_index
    keeper = starts[group[removed]]
    reason = np.where(is_index[keeper], REASON_INDEX, REASON_RUN).astype(np.int8)
    r_loc = loc[removed]
    unit, row = (r_loc >> UNIT_BITS) & UNIT_MASK, r_loc & (np.int64(1 << UNIT_BITS) - 1)
    write_partitioned(out, {"unit": unit, "row": row, "reason": reason, "kept_hi": id_hi[keeper],
                            "kept_lo": id_lo[keeper]},
                      removal_partition(unit, unit_count, removal_files), removal_files)
    probe.sample()
    ours = new_rows > 0                               # groups holding a document of this run
    histogram = Counter(_size_bucket(int(s)) for s in sizes[ours & (sizes > 1)])
    return {"rows": n, "index_rows": int(is_index.sum()), "urls": int(ours.sum()),
            "duplicate_groups": int((ours & (sizes > 1)).sum()), "removed": int(removed.sum()),
            "removed_index": int((reason == REASON_INDEX).sum()), "group_sizes": dict(histogram),
            "largest_group": int(sizes.max()) if n else 0, "held_bytes": int(held),
            "peak_rss_growth": memory.growth(), "peak_rss": memory.peak(), **probe.peak()}


def collect_step(r: int, inputs: list[str], out: str, root: str) -> dict[str, Any]:
    """Partition r of the removals (a range of units) -> one file sorted by (unit, row) for the apply step."""
    memory, probe = TaskMemory(), MapProbe(root)
    cols = read_partition(inputs, r, REMOVAL_COLUMNS)
    unit, row, reason, kept_hi, kept_lo = _typed(cols, REMOVAL_COLUMNS,
                                                 (np.int64, np.int64, np.int8, np.uint64, np.uint32))
    order = np.lexsort((row, unit))
    write_ipc(out, pa.table({"unit": unit[order], "row": row[order], "reason": reason[order],
                             "kept_hi": kept_hi[order], "kept_lo": kept_lo[order]}))
    probe.sample()
    return {"removals": len(order), "peak_rss_growth": memory.growth(), **probe.peak()}


def _size_bucket(size: int) -> str:
    low = 2
    while low * 2 <= size:
        low *= 2
    return str(size) if size < 4 else f"{low}-{2 * low - 1}"


def reduce_memory(rows: int, cfg: URLDedupConfig) -> dict[str, int]:
    """Bytes each kind of task declares to Ray for ``rows`` key rows in all (this run's and the index's):
    a reduce holds its partition's columns, the sort permutation and the sorted copies (~3x); a merge one
    partition of its inputs plus the batch it writes (2x)."""
    per_partition = -(-max(1, rows) // cfg.partitions)
    floor = 64 * MIB
    return {"reduce": max(floor, 3 * per_partition * (ROW_BYTES + 8)),
            "merge": max(floor, 2 * per_partition * ROW_BYTES),
            "collect": max(floor, 3 * per_partition * 29)}


def _removal_files(run_dir: Path, count: int) -> list[Path]:
    return [run_dir / STAGES_DIR / STAGE / "removals" / f"part-{r:05d}.arrow" for r in range(count)]


def run_url_reduce(run_dir: Path, units: list[Unit], cfg: URLDedupConfig, log=None,
                   documents: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Phase 2 on Ray; ``documents`` is phase 1's results per unit (counts of documents with and without a
    URL, for the summary and the memory each task declares). Resumable task by task; its summary is
    written last, as ``stages/url_dedup/reduce.done.json``, and returned."""
    from pipeline.stages.dedup import GraphSteps

    run_dir = Path(run_dir)
    out = run_dir / STAGES_DIR / STAGE
    marker = out / DONE
    ordered = sorted(units, key=lambda u: u.id)
    R = removal_parts(cfg, len(ordered))
    removals = _removal_files(run_dir, R)
    if marker.exists() and all(p.exists() for p in removals):
        return read_json(marker)
    started = time.perf_counter()
    P, F = cfg.partitions, cfg.fan_in
    index_files = check_url_index(cfg, run_dir)
    key_dir = run_dir / STAGES_DIR / KEYS
    files = [str(key_dir / f"{u.id}.keys.arrow") for u in ordered]
    transforms: list = [None] * len(files)
    for r, index_dir in enumerate(cfg.index, start=1):
        theirs = sorted((Path(index_dir) / STAGES_DIR / KEYS).glob("*.keys.arrow"))
        files += [str(p) for p in theirs]
        transforms += [IndexRunKeys(r)] * len(theirs)
    results = documents or {}
    with_url = sum(r.get("with_url", 0) for r in results.values())
    index_rows = sum(int(read_json(Path(d) / STAGES_DIR / KEYS / PARAMS).get("rows", 0)) for d in cfg.index)
    steps = GraphSteps(out / "reduce", run_dir, reduce_memory(with_url + index_rows, cfg), log)
    merged, merged_transforms = steps.shuffled("keys", files, P, F, transforms)
    parts = [str(steps.dir / "reduce" / f"part-{k:05d}.arrow") for k in range(P)]
    reduced = steps.run("reduce", "reduce",
                        [(reduce_step, (k, merged, merged_transforms, cfg.keep, len(ordered), R, parts[k],
                                        str(run_dir))) for k in range(P)])
    steps.remove_data("keys")
    inputs, _ = steps.shuffled("removals-in", parts, R, F)
    collected = steps.run("collect", "collect",
                          [(collect_step, (r, inputs, str(removals[r]), str(run_dir))) for r in range(R)])
    histogram: Counter = Counter()
    for result in reduced:
        histogram.update(result["group_sizes"])
    without: Counter = Counter()
    for result in results.values():
        without.update(result.get("without_url_by_source", {}))
    summary = {
        "params": {**key_params(cfg), "keep": cfg.keep, "fan_in": F}, "index_runs": len(cfg.index),
        "documents": sum(r.get("documents", 0) for r in results.values()), "with_url": with_url,
        "without_url": sum(without.values()), "without_url_by_source": dict(sorted(without.items())),
        "urls": sum(r["urls"] for r in reduced), "duplicate_groups": sum(r["duplicate_groups"] for r in reduced),
        "removed": sum(r["removed"] for r in reduced), "removed_index": sum(r["removed_index"] for r in reduced),
        "index_rows": sum(r["index_rows"] for r in reduced),
        "largest_group": max([r["largest_group"] for r in reduced] or [0]),
        "group_size_histogram": dict(sorted(histogram.items(), key=lambda kv: int(kv[0].split("-")[0]))),
        "shuffle": {"partitions": P, "fan_in": F, "removal_files": R, "key_files": len(files),
                    "index_key_files": len(index_files),
                    "key_merge_levels": len(merge_plan(len(files), F)) - 1, "tasks": steps.tasks,
                    "resumed_tasks": steps.resumed, "task_seconds": round(steps.busy_seconds, 3),
                    "task_seconds_by_step": {k: round(v, 3) for k, v in sorted(steps.step_seconds.items())},
                    "max_driver_refs": steps.max_driver_refs, "max_maps_per_task": steps.max_maps,
                    "max_open_files_per_task": steps.max_open_files,
                    "max_reduce_rows": max([r["rows"] for r in reduced] or [0]),
                    "max_reduce_held_bytes": max([r["held_bytes"] for r in reduced] or [0]),
                    "max_reduce_rss_growth": max([r["peak_rss_growth"] for r in reduced] or [0]),
                    "max_reduce_peak_rss": max([r["peak_rss"] for r in reduced] or [0]),
                    "max_collect_rss_growth": max([r["peak_rss_growth"] for r in collected] or [0])},
        "seconds": round(time.perf_counter() - started, 3)}
    write_json(marker, summary)
    shutil.rmtree(steps.dir, ignore_errors=True)   # every intermediate file is consumed
    if log:
        log.info("url dedup reduce: %s", summary)
    return summary


# ------------------------------------------------------------------------------------ phase 3
class URLDedupApplyStage(MapStage):
    name = STAGE

    def __init__(self, cfg: URLDedupConfig, input_stage: MapStage, unit_index: dict[str, int],
                 audit: AuditConfig | None = None):
        self.input_stage = input_stage
        self.unit_index = unit_index
        self.removal_files = removal_parts(cfg, len(unit_index))
        self.audit = audit or AuditConfig(dropped_per_reason=0)

    def removed_rows(self, run_dir: Path, unit: Unit) -> dict[str, np.ndarray]:
        """The unit's removals (row, reason, kept id), sorted by row, from the one file of its unit range."""
        index = self.unit_index[unit.id]
        part = int(removal_partition(np.array([index]), len(self.unit_index), self.removal_files)[0])
        with pa.memory_map(str(_removal_files(run_dir, part + 1)[part])) as source:
            table = pa.ipc.open_file(source).read_all()
            units = table.column("unit").to_numpy()
            lo, hi = int(np.searchsorted(units, index)), int(np.searchsorted(units, index, side="right"))
            found = {name: np.array(table.column(name).to_numpy()[lo:hi], copy=True)
                     for name in ("row", "reason", "kept_hi", "kept_lo")}
            del table, units
        return found

    def run_unit(self, unit: Unit, run_dir: Path) -> dict[str, Any]:
        from pipeline.document import DOC_SCHEMA

        started = time.perf_counter()
        removed = self.removed_rows(run_dir, unit)
        rows = removed["row"]
        counts: dict[tuple[str, str, int], list[int]] = {}
        sampler = DropSampler(self.audit.dropped_per_reason, self.audit.dropped_max_chars)
        kept_total = base = 0
        source = pq.ParquetFile(self.input_stage.output_path(run_dir, unit))
        with atomic_path(self.output_path(run_dir, unit)) as tmp, \
                pq.ParquetWriter(tmp, DOC_SCHEMA, compression="zstd") as writer:
            for batch in source.iter_batches(batch_size=READ_BATCH):
                n = batch.num_rows
                lo, hi = int(np.searchsorted(rows, base)), int(np.searchsorted(rows, base + n))
                local = (rows[lo:hi] - base).astype(np.int64)
                code = np.full(n, -1, dtype=np.int8)
                code[local] = removed["reason"][lo:hi]
                booked = pa.table({"s": batch.column("source"), "k": batch.column("source_kind"),
                                   "c": pa.array(code), "b": pc.binary_length(batch.column("text"))})
                grouped = booked.group_by(["s", "k", "c"]).aggregate([("b", "sum"), ("b", "count")]).to_pydict()
                for s, k, c, nbytes, count in zip(grouped["s"], grouped["k"], grouped["c"], grouped["b_sum"],
                                                  grouped["b_count"]):
                    cell = counts.setdefault((s, k, c), [0, 0])
                    cell[0] += count
                    cell[1] += nbytes
                taken = pa.array(local)
                for j, (i, doc_id, src) in enumerate(zip(local.tolist(), batch.column("id").take(taken).to_pylist(),
                                                         batch.column("source").take(taken).to_pylist())):
                    self._offer(sampler, batch, i, doc_id, src, int(removed["reason"][lo + j]),
                                int(removed["kept_hi"][lo + j]), int(removed["kept_lo"][lo + j]))
                keep = code < 0
                kept_total += int(keep.sum())
                writer.write_table(pa.Table.from_batches([batch]).filter(pa.array(keep)).cast(DOC_SCHEMA))
                base += n
        sampler.write(self.dropped_path(run_dir, unit))
        ledger = Ledger()
        for (s, k, c), (count, nbytes) in sorted(counts.items()):
            ledger.took(STAGE, s, k, count, nbytes)
            if c < 0:
                ledger.kept(STAGE, s, k, count, nbytes)
            else:
                ledger.dropped(STAGE, s, k, REASONS[c], count, nbytes)
        ledger.add_seconds(STAGE, unit.source, time.perf_counter() - started)
        return {"ledger": ledger.to_json(), "documents": kept_total, "removed": len(rows)}

    @staticmethod
    def _offer(sampler: DropSampler, batch: pa.RecordBatch, i: int, doc_id: str, source: str, reason: int,
               kept_hi: int, kept_lo: int) -> None:
        """One dropped document to the audit sample; its text and metadata are read only if it enters."""
        def metadata() -> dict[str, Any]:
            meta = audit_metadata(json.loads(batch.column("metadata")[i].as_py()))
            url = meta.get("url")
            return {**meta, "normalized_url": normalize_url(url) if isinstance(url, str) else None,
                    "kept_id": id_text(kept_hi, kept_lo)}

        sampler.offer(REASONS[reason], doc_id, source, lambda: batch.column("text")[i].as_py(), metadata)
