"""Line dedup: lines repeated across many documents (navigation, cookie banners, footers) removed from all
of them, on Ray, in three phases (the model of ``pipeline.stages.dedup``: map -> global -> apply map).

1. ``line_dedup_hashes`` (map, one task per unit): for every document of ``line_dedup.kinds``, its
   *distinct* line hashes (``pipeline.dedup.lines``: one vote per document), combined within the unit
   into (hash, documents) rows -> ``stages/line_dedup_hashes/<unit>.arrow``, a partitioned file by
   ``hash % partitions`` (``pipeline.dedup.shuffle``).
2. the reduce (global, ``run_line_reduce``): the unit files merged in levels of ``fan_in`` (``GraphSteps``
   of dedup, markers per task), then one task per partition sums the documents of each hash and writes
   the sorted hashes in at least ``min_documents`` documents to ``stages/line_dedup/frequent/part-k.arrow``;
   ``stages/line_dedup/reduce.done.json`` (the summary: distinct and frequent lines, a histogram of the
   counts, the shuffle's layout) is written last.
3. ``line_dedup`` (map, one task per unit): each document of those kinds without its frequent lines
   (each line looked up by binary search in the memory-mapped frequent part of its partition: at most
   ``partitions`` maps per task, released at the end of the unit; the frequent set is never loaded whole);
   a document left with no text is dropped as ``line_dedup_emptied``, one left with fewer than
   ``min_words_left`` words as ``line_dedup_too_short``; a document that lost no line is never dropped.
   Documents of other kinds pass through unchanged.

The frequent set is a function of the documents alone: partitions and fan-in change the layout of the
work, never which lines are removed.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path, read_json, write_json
from pipeline.config import AuditConfig, LineDedupConfig
from pipeline.dedup.lines import (
    count_bucket,
    count_words,
    document_line_hashes,
    drop_lines,
    line_hashes,
    merge_buckets,
    utf8_len,
)
from pipeline.dedup.shuffle import MapProbe, merge_plan, read_partition, write_ipc, write_partitioned
from pipeline.ledger import Ledger
from pipeline.sources.base import Unit
from pipeline.stages.base import STAGES_DIR, MapStage

HASHES = "line_dedup_hashes"
STAGE = "line_dedup"
FREQUENT_DIR = "frequent"
REDUCE_MARKER = "reduce.done.json"
HASH_COLUMNS = ("hash", "documents")
EMPTIED, TOO_SHORT = "line_dedup_emptied", "line_dedup_too_short"
READ_BATCH = 1024
MIB = 2**20


def frequent_path(run_dir: Path, k: int) -> Path:
    return run_dir / STAGES_DIR / STAGE / FREQUENT_DIR / f"part-{k:05d}.arrow"


def hash_partition(hashes: np.ndarray, partitions: int) -> np.ndarray:
    return (np.asarray(hashes, dtype=np.uint64) % np.uint64(partitions)).astype(np.int64)


def line_dedup_params(cfg: LineDedupConfig) -> dict[str, Any]:
    return {"kinds": sorted(cfg.kinds), "min_documents": cfg.min_documents, "min_words_left": cfg.min_words_left,
            "partitions": cfg.partitions, "fan_in": cfg.fan_in}


# ------------------------------------------------------------------------------------ phase 1
class LineHashStage(MapStage):
    name = HASHES

    def __init__(self, cfg: LineDedupConfig, input_stage: MapStage):
        self.cfg = cfg
        self.kinds = frozenset(cfg.kinds)
        self.input_stage = input_stage

    def output_path(self, run_dir: Path, unit: Unit) -> Path:
        return self.stage_dir(run_dir) / f"{unit.id}.arrow"

    def run_unit(self, unit: Unit, run_dir: Path) -> dict[str, Any]:
        started = time.perf_counter()
        votes: list[np.ndarray] = []
        documents = 0
        source = pq.ParquetFile(self.input_stage.output_path(run_dir, unit))
        for batch in source.iter_batches(batch_size=READ_BATCH, columns=["source_kind", "text"]):
            for kind, text in zip(batch.column("source_kind").to_pylist(), batch.column("text").to_pylist()):
                if kind in self.kinds:
                    votes.append(document_line_hashes(text))
                    documents += 1
        every = np.concatenate(votes) if votes else np.zeros(0, np.uint64)
        # a combiner: the unit's documents per hash (a footer of every page of the unit is one row, not N)
        hashes, counts = np.unique(every, return_counts=True)
        P = self.cfg.partitions
        rows = write_partitioned(self.output_path(run_dir, unit),
                                 {"hash": hashes.astype(np.uint64), "documents": counts.astype(np.uint32)},
                                 hash_partition(hashes, P), P)
        return {"documents": documents, "line_votes": int(len(every)), "rows": rows,
                "seconds": round(time.perf_counter() - started, 4)}


# ------------------------------------------------------------------------------------ phase 2
def reduce_step(k: int, inputs: list[str], out: str, root: str, min_documents: int) -> dict[str, Any]:
    """Partition k of every (merged) hash file -> documents per hash -> the sorted frequent hashes."""
    probe = MapProbe(root)
    cols = read_partition(inputs, k, HASH_COLUMNS)
    probe.sample()
    hashes = cols["hash"].astype(np.uint64, copy=False)
    docs = cols["documents"].astype(np.int64)
    del cols
    order = np.argsort(hashes, kind="stable")
    hashes, docs = hashes[order], docs[order]
    del order
    if len(hashes):
        starts = np.flatnonzero(np.r_[True, hashes[1:] != hashes[:-1]])
        distinct, counts = hashes[starts], np.add.reduceat(docs, starts)
    else:
        distinct, counts = np.zeros(0, np.uint64), np.zeros(0, np.int64)
    frequent = counts >= min_documents
    write_ipc(out, pa.table({"hash": pa.array(distinct[frequent], pa.uint64()),
                             "documents": pa.array(np.minimum(counts[frequent], 2**32 - 1), pa.uint32())}))
    probe.sample()
    return {"rows": int(len(hashes)), "distinct": int(len(distinct)), "frequent": int(frequent.sum()),
            "line_votes": int(docs.sum()),
            "frequent_votes": int(counts[frequent].sum()), "histogram": count_bucket(counts), **probe.peak()}


def reduce_memory(hash_bytes: int, units: int, cfg: LineDedupConfig) -> dict[str, int]:
    """Memory a reduce / merge task declares to Ray, from the bytes of the unit hash files (12 bytes a row):
    64 MiB for the process, plus four times its partition for a reduce (pieces, concatenation, sort order,
    sorted copies) and three times one partition of ``fan_in`` files for a merge. Measured at 10^8 line
    votes over 200 units, 16 partitions (``bench/line_dedup_scale.py``): a reduce task peaks at 219 MiB
    (declared 271), a merge task at 86 MiB anonymous (declared 114); at 64 partitions 77 / 46 (116 / 76)."""
    per_partition = hash_bytes / cfg.partitions
    base = 64 * MIB
    return {"reduce": int(base + 4 * per_partition),
            "merge": int(base + 3 * per_partition * min(units, cfg.fan_in) / max(1, units))}


def run_line_reduce(run_dir: Path, units: list[Unit], cfg: LineDedupConfig, log=None) -> dict[str, Any]:
    """Phase 2 on Ray: resumable task by task; ``reduce.done.json`` (the summary) is written last."""
    import ray

    from pipeline.stages.dedup import GraphSteps

    run_dir = Path(run_dir)
    out = run_dir / STAGES_DIR / STAGE
    marker = out / REDUCE_MARKER
    P, F = cfg.partitions, cfg.fan_in
    if marker.exists():
        if all(frequent_path(run_dir, k).exists() for k in range(P)):
            return read_json(marker)
        marker.unlink()                      # a frequent part went missing: redo what is not there
    started = time.perf_counter()
    hash_dir = run_dir / STAGES_DIR / HASHES
    files = [str(hash_dir / f"{u.id}.arrow") for u in sorted(units, key=lambda u: u.id)]
    hash_bytes = sum(Path(f).stat().st_size for f in files)
    if not ray.is_initialized():
        raise RuntimeError("run_line_reduce needs Ray (pipeline.runner.init_ray)")
    steps = GraphSteps(out / "graph", run_dir, reduce_memory(hash_bytes, len(files), cfg), log)
    inputs, _ = steps.shuffled("hashes", files, P, F)
    results = steps.run("reduce", "reduce", [(reduce_step, (k, inputs, str(frequent_path(run_dir, k)), str(run_dir),
                                                            cfg.min_documents)) for k in range(P)])
    summary = {"params": line_dedup_params(cfg),
               "distinct_lines": sum(r["distinct"] for r in results),
               "frequent_lines": sum(r["frequent"] for r in results),
               "line_votes": sum(r["line_votes"] for r in results),          # (document, distinct line) pairs
               "frequent_votes": sum(r["frequent_votes"] for r in results),  # of them, of a frequent line
               "count_histogram": merge_buckets([r["histogram"] for r in results]),
               "shuffle": {"partitions": P, "fan_in": F, "unit_files": len(files), "hash_bytes": hash_bytes,
                           "merge_levels": len(merge_plan(len(files), F)) - 1, "tasks": steps.tasks,
                           "resumed_tasks": steps.resumed, "task_seconds": round(steps.busy_seconds, 3),
                           "task_seconds_by_step": {k: round(v, 3) for k, v in sorted(steps.step_seconds.items())},
                           "max_driver_refs": steps.max_driver_refs, "max_maps_per_task": steps.max_maps,
                           "max_open_files_per_task": steps.max_open_files,
                           "declared_memory": reduce_memory(hash_bytes, len(files), cfg)},
               "seconds": round(time.perf_counter() - started, 3)}
    write_json(marker, summary, sort_keys=False)       # the histogram in count order
    shutil.rmtree(steps.dir, ignore_errors=True)       # merged files and task markers: consumed
    if log:
        log.info("line dedup reduce: %s", summary)
    return summary


# ------------------------------------------------------------------------------------ phase 3
class FrequentLines:
    """Membership in the frequent set: each partition's sorted hashes memory-mapped on first use (at most
    ``partitions`` maps), binary search; ``close()`` releases every map."""

    def __init__(self, run_dir: Path, partitions: int):
        self.run_dir = run_dir
        self.partitions = partitions
        self._open: dict[int, tuple[Any, np.ndarray]] = {}
        self.max_open = 0

    def _part(self, k: int) -> np.ndarray:
        if k not in self._open:
            source = pa.memory_map(str(frequent_path(self.run_dir, k)))
            column = pa.ipc.open_file(source).read_all().column("hash")
            hashes = (column.chunk(0).to_numpy() if column.num_chunks == 1     # zero-copy view of the map
                      else column.to_numpy() if column.num_chunks else np.zeros(0, np.uint64))
            self._open[k] = (source, hashes)
            self.max_open = max(self.max_open, len(self._open))
        return self._open[k][1]

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        """A mask: which of ``hashes`` (uint64) are frequent."""
        hashes = np.asarray(hashes, dtype=np.uint64)
        found = np.zeros(len(hashes), dtype=bool)
        if not len(hashes):
            return found
        part = hash_partition(hashes, self.partitions)
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(self.partitions + 1))
        for k in np.flatnonzero(np.diff(bounds)).tolist():
            idx = order[bounds[k]:bounds[k + 1]]
            table = self._part(k)
            if len(table):
                at = np.minimum(np.searchsorted(table, hashes[idx]), len(table) - 1)
                found[idx] = table[at] == hashes[idx]
        return found

    def close(self) -> None:
        for source, _ in self._open.values():
            source.close()
        self._open.clear()


class LineDedupApplyStage(MapStage):
    name = STAGE

    def __init__(self, cfg: LineDedupConfig, input_stage: MapStage, audit: AuditConfig | None = None):
        self.cfg = cfg
        self.kinds = frozenset(cfg.kinds)
        self.input_stage = input_stage
        self.audit = audit or AuditConfig()

    def run_unit(self, unit: Unit, run_dir: Path) -> dict[str, Any]:
        from pipeline.audit import DropSampler
        from pipeline.document import DOC_SCHEMA

        started = time.perf_counter()
        ledger = Ledger()
        sampler = DropSampler(self.audit.dropped_per_reason, self.audit.dropped_max_chars)
        frequent = FrequentLines(run_dir, self.cfg.partitions)
        probe = MapProbe(run_dir)
        totals = {"documents": 0, "edited": 0, "lines_removed": 0, "bytes_removed": 0}
        source = pq.ParquetFile(self.input_stage.output_path(run_dir, unit))
        try:
            with atomic_path(self.output_path(run_dir, unit)) as tmp, \
                    pq.ParquetWriter(tmp, DOC_SCHEMA, compression="zstd") as writer:
                for batch in source.iter_batches(batch_size=READ_BATCH):
                    table = self._apply(pa.Table.from_batches([batch]), frequent, ledger, sampler, totals)
                    writer.write_table(table.cast(DOC_SCHEMA))
            probe.sample()
        finally:
            frequent.close()
        sampler.write(self.dropped_path(run_dir, unit))
        self.write_quarantine(run_dir, unit, ledger)
        ledger.add_seconds(STAGE, unit.source, time.perf_counter() - started)
        return {"ledger": ledger.to_json(), **totals, "max_frequent_maps": frequent.max_open, **probe.peak()}

    def _apply(self, table: pa.Table, frequent: FrequentLines, ledger: Ledger, sampler,
               totals: dict[str, int]) -> pa.Table:
        ids, sources, kinds = (table.column(c).to_pylist() for c in ("id", "source", "source_kind"))
        texts = table.column("text").to_pylist()
        n = len(texts)
        keep = np.ones(n, dtype=bool)
        # every line of the batch's documents of the configured kinds, looked up at once
        split: dict[int, tuple[list[str], np.ndarray]] = {}
        pieces: list[np.ndarray] = []
        for i, (kind, text) in enumerate(zip(kinds, texts)):
            if kind in self.kinds:
                try:
                    lines, hashes, nonblank = line_hashes(text)
                except Exception as exc:  # noqa: BLE001 - one poison record, not the unit
                    keep[i] = False
                    nbytes = len(text.encode("utf-8", "replace"))
                    locator = json.loads(table.column("metadata")[i].as_py()).get("locator", "")
                    ledger.took(STAGE, sources[i], kind, 1, nbytes)
                    ledger.poison(STAGE, sources[i], kind, f"line_dedup:{type(exc).__name__}", nbytes, doc_id=ids[i],
                                  locator=locator, error=f"{type(exc).__name__}: {exc}")
                    continue
                split[i] = (lines, nonblank)
                pieces.append(hashes[nonblank])
        found = frequent.lookup(np.concatenate(pieces)) if pieces else np.zeros(0, bool)
        offsets = np.cumsum([0] + [len(p) for p in pieces])
        changed = False
        metadata = None
        for j, i in enumerate(split):
            lines, nonblank = split[i]
            remove = np.zeros(len(lines), dtype=bool)
            remove[nonblank] = found[offsets[j]:offsets[j + 1]]
            text = texts[i]
            src, kind = sources[i], kinds[i]
            nbytes = utf8_len(text)
            ledger.took(STAGE, src, kind, 1, nbytes)
            new, removed, removed_bytes = drop_lines(text, lines, remove)
            if not removed:
                ledger.kept(STAGE, src, kind, 1, nbytes)
                continue
            changed = True
            texts[i] = new
            for key, value in (("documents_edited", 1), ("lines_removed", removed), ("bytes_removed", removed_bytes)):
                ledger.tally(STAGE, src, STAGE, key, value)
            totals["edited"] += 1
            totals["lines_removed"] += removed
            totals["bytes_removed"] += removed_bytes
            reason = EMPTIED if not new.strip() else TOO_SHORT if count_words(new, self.cfg.min_words_left) < self.cfg.min_words_left else None
            if reason is None:
                ledger.kept(STAGE, src, kind, 1, nbytes - removed_bytes)
                continue
            keep[i] = False
            ledger.dropped(STAGE, src, kind, reason, 1, nbytes)
            ledger.tally(STAGE, src, STAGE, "bytes_dropped", nbytes - removed_bytes)   # what was left of it
            if metadata is None:
                metadata = table.column("metadata").to_pylist()
            meta = json.loads(metadata[i])
            meta.update(lines_removed=removed, bytes_removed=removed_bytes)
            sampler.offer(reason, ids[i], src, text, meta)   # the text as it came in: what the lines were
        for i, (src, kind) in enumerate(zip(sources, kinds)):
            if i not in split and kind not in self.kinds:   # other kinds pass through
                nbytes = utf8_len(texts[i])
                ledger.took(STAGE, src, kind, 1, nbytes)
                ledger.kept(STAGE, src, kind, 1, nbytes)
        if changed:
            table = table.set_column(table.schema.get_field_index("text"), "text", pa.array(texts, pa.large_string()))
        totals["documents"] += int(keep.sum())
        return table.filter(pa.array(keep)) if not keep.all() else table


def iter_frequent(run_dir: Path, partitions: int) -> Iterator[tuple[int, int]]:
    """(hash, documents) of every frequent line, partition by partition (for inspection and tests)."""
    for k in range(partitions):
        with pa.memory_map(str(frequent_path(run_dir, k))) as source:
            table = pa.ipc.open_file(source).read_all()
            yield from zip(table.column("hash").to_pylist(), table.column("documents").to_pylist())
            del table
