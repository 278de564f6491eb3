"""Dedup: exact and MinHash near-duplicate removal across the run, on Ray, in three phases.

1. ``dedup_signatures`` (map, one task per unit, streaming its documents): per document its node key
   (keeper priority), exact key and MinHash signature -> ``stages/dedup_signatures/<unit>.arrow``; its LSH
   band keys (plus the exact key as one more "band") -> ``<unit>.bands.arrow``, a partitioned file by
   ``key % partitions``.
2. the graph (global; steps of ``partitions`` tasks joined by an on-disk shuffle with bounded fan-in,
   ``pipeline.dedup.shuffle``; task bodies in ``pipeline.dedup.steps``; files under
   ``stages/dedup/graph/``): *candidates* (buckets -> star edges between document locations, verified by
   estimated Jaccard) -> *connected components* (alternating large-star / small-star rounds) -> *labels*
   -> *keepers* (each component keeps its member with the smallest node key; ``removed.parquet/part-k``)
   -> *removals* by unit range (``removals/part-r.arrow``). Every task writes a marker after its files, so
   an interrupted graph resumes at the first unfinished task of its last round; ``graph.done.json`` marks
   the phase complete and the intermediate files are then deleted.
3. ``dedup`` (map, one task per unit): the unit's documents minus its removals (one removal file per unit),
   with the ledger's ``exact_duplicate`` / ``near_duplicate`` drops.

The driver holds one small result per task of the current step, never data. The kept set does not depend
on the number of workers, the fan-in or how the input was split into files: the keeper order (node keys)
derives from document ids and scores, never from positions; positions only name the graph's nodes.
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
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path, read_json, write_json
from pipeline.audit import DropSampler
from pipeline.config import AuditConfig, DedupConfig
from pipeline.dedup.graph import node_key
from pipeline.dedup.minhash import MinHasher, band_keys, exact_key, lsh_params, scope_hash
from pipeline.dedup.shuffle import merge_plan, merge_task, write_ipc, write_partitioned
from pipeline.dedup.steps import (
    REASONS,
    IndexRunBands,
    candidates_step,
    collect_removals_step,
    keepers_step,
    labels_step,
    large_star_step,
    make_loc,
    removal_partition,
    small_star_step,
)
from pipeline.document import metadata_scores
from pipeline.ledger import Ledger
from pipeline.sources.base import Unit
from pipeline.stages.base import STAGES_DIR, MapStage

SIGNATURES = "dedup_signatures"
STAGE = "dedup"
READ_BATCH = 1024
MIB = 2**20


def dedup_params(cfg: DedupConfig) -> dict[str, Any]:
    """Everything that shapes signatures and keys; an index run must share it."""
    bands, rows = (cfg.bands, cfg.rows) if cfg.bands else lsh_params(cfg.threshold, cfg.num_perm)
    return {"num_perm": cfg.num_perm, "seed": cfg.seed, "ngram": cfg.ngram, "bands": bands, "rows": rows,
            "scope": cfg.scope, "exact": cfg.exact, "minhash": cfg.minhash, "partitions": cfg.partitions,
            "score_key": cfg.score_key, "cjk_shingles": cfg.cjk_shingles}


def removal_parts(cfg: DedupConfig, unit_count: int) -> int:
    """Removal files: one per range of units, as many as shuffle partitions (fewer for few units)."""
    return max(1, min(cfg.partitions, unit_count))


# ------------------------------------------------------------------------------------ phase 1
class DedupSignatureStage(MapStage):
    name = SIGNATURES

    def __init__(self, cfg: DedupConfig, input_stage: MapStage, unit_index: dict[str, int]):
        self.cfg = cfg
        self.params = dedup_params(cfg)
        self.input_stage = input_stage
        self.unit_index = unit_index

    def bands_path(self, run_dir: Path, unit: Unit) -> Path:
        return self.stage_dir(run_dir) / f"{unit.id}.bands.arrow"

    def unit_outputs(self, run_dir: Path, unit: Unit, result: dict[str, Any]) -> list[Path]:
        return [p for p in (self.output_path(run_dir, unit), self.bands_path(run_dir, unit)) if p.exists()]

    def output_path(self, run_dir: Path, unit: Unit) -> Path:
        return self.stage_dir(run_dir) / f"{unit.id}.arrow"

    def run_unit(self, unit: Unit, run_dir: Path) -> dict[str, Any]:
        p = self.params
        hasher = MinHasher(p["num_perm"], p["seed"], p["ngram"], p["cjk_shingles"])
        ids: list[str] = []
        scope_of_doc: list[int] = []       # the dedup scope's hash per document: its kind, or one for all
        scores, exact, sigs, has_sig = [], [], [], []
        # one batch of text at a time: what stays is per document (id, keys, signature), never the text
        source = pq.ParquetFile(self.input_stage.output_path(run_dir, unit))
        for batch in source.iter_batches(batch_size=READ_BATCH, columns=["id", "source_kind", "text", "metadata"]):
            ids += batch.column("id").to_pylist()
            scores.append(metadata_scores(batch.column("metadata").to_pylist(), p["score_key"]))
            batch_sigs = np.zeros((batch.num_rows, p["num_perm"]), dtype=np.uint64)
            batch_has = np.zeros(batch.num_rows, dtype=bool)
            batch_exact = np.zeros(batch.num_rows, dtype=np.uint64)
            for i, (kind, text) in enumerate(zip(batch.column("source_kind").to_pylist(),
                                                 batch.column("text").to_pylist())):
                scope = scope_hash(kind if p["scope"] == "kind" else "all")
                scope_of_doc.append(scope)
                batch_exact[i] = exact_key(text, scope)
                if p["minhash"]:
                    sig = hasher.signature(text)
                    if sig is not None:
                        batch_sigs[i], batch_has[i] = sig, True
            sigs.append(batch_sigs), has_sig.append(batch_has), exact.append(batch_exact)
        n = len(ids)
        score = np.concatenate(scores) if scores else np.zeros(0)
        sig_arr = np.concatenate(sigs) if sigs else np.zeros((0, p["num_perm"]), np.uint64)
        has = np.concatenate(has_sig) if has_sig else np.zeros(0, bool)
        exact_arr = np.concatenate(exact) if exact else np.zeros(0, np.uint64)
        scopes = np.array(scope_of_doc, dtype=np.uint64)
        nodes = node_key(ids, None if np.isnan(score).all() else score, indexed=False)
        loc = make_loc(0, self.unit_index[unit.id], np.arange(n, dtype=np.int64))
        keys, key_nodes, key_locs, key_exact = [], [], [], []
        if p["exact"]:
            keys.append(exact_arr), key_nodes.append(nodes), key_locs.append(loc), key_exact.append(np.ones(n, bool))
        if p["minhash"] and has.any():
            with_sig = np.flatnonzero(has)
            groups = [with_sig[scopes[with_sig] == s] for s in np.unique(scopes[with_sig])]
            bk = np.concatenate([band_keys(sig_arr[g], p["bands"], p["rows"], int(scopes[g[0]])) for g in groups])
            order = np.concatenate(groups)
            keys.append(bk.reshape(-1))
            key_nodes.append(np.repeat(nodes[order], p["bands"]))
            key_locs.append(np.repeat(loc[order], p["bands"]))
            key_exact.append(np.zeros(bk.size, bool))
        self._write_signatures(run_dir, unit, ids, nodes, exact_arr, sig_arr, has)
        key = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
        P = p["partitions"]
        write_partitioned(self.bands_path(run_dir, unit),
                          {"key": key, "node": np.concatenate(key_nodes) if keys else np.zeros(0, np.int64),
                           "loc": np.concatenate(key_locs) if keys else np.zeros(0, np.int64),
                           "exact": np.concatenate(key_exact) if keys else np.zeros(0, bool)},
                          (key % np.uint64(P)).astype(np.int64), P)
        return {"documents": n, "with_signature": int(has.sum())}

    def _write_signatures(self, run_dir, unit, ids, nodes, exact, sigs, has_sig) -> None:
        sig_col = pa.FixedSizeListArray.from_arrays(pa.array(sigs.reshape(-1), pa.uint64()), self.params["num_perm"])
        write_ipc(self.output_path(run_dir, unit),
                  pa.table({"id": pa.array(ids, pa.string()), "node": nodes, "exact": exact, "has_sig": has_sig,
                            "sig": sig_col}))


# ------------------------------------------------------------------------------------ phase 2
def _graph_task(fn, marker: str, *args) -> dict[str, Any]:
    """One graph task: its files, then its marker (a rerun skips it)."""
    started = time.perf_counter()
    result = fn(*args)
    result["seconds"] = round(time.perf_counter() - started, 4)
    write_json(Path(marker), result)
    return result


class GraphSteps:
    """Runs the graph's steps as Ray tasks, each task skipped when its marker exists; keeps per-step
    counts and the most maps / open files any task held."""

    def __init__(self, graph_dir: Path, run_dir: Path, memory: dict[str, int], log=None):
        self.dir = graph_dir
        self.root = str(run_dir)
        self.memory = memory
        self.log = log
        self.tasks = self.resumed = 0
        self.busy_seconds = 0.0
        self.step_seconds: dict[str, float] = {}
        self.max_maps = self.max_open_files = self.max_driver_refs = 0
        self._node_memory: int | None = None

    def run(self, name: str, kind: str, calls: list[tuple[Any, tuple]]) -> list[dict[str, Any]]:
        import ray

        step_dir = self.dir / name
        step_dir.mkdir(parents=True, exist_ok=True)
        remote = ray.remote(_graph_task).options(num_cpus=1, memory=self._declared(kind), max_retries=3)
        results: list[dict[str, Any] | None] = [None] * len(calls)
        pending: dict[Any, int] = {}
        for i, (fn, args) in enumerate(calls):
            marker = step_dir / f"task-{i:05d}.done.json"
            if marker.exists():
                results[i] = read_json(marker)
                self.resumed += 1
            else:
                pending[remote.remote(fn, str(marker), *args)] = i
        self.max_driver_refs = max(self.max_driver_refs, len(pending))
        while pending:
            refs = list(pending)
            done, _ = ray.wait(refs, num_returns=max(1, len(refs) // 8), timeout=2.0)
            for ref in done:
                results[pending.pop(ref)] = ray.get(ref)
            del done, refs
        self.tasks += len(calls)
        kind_of_step = name.split("/")[-1].split("-")[0]          # round-003/large -> large, bands/merge-1 -> merge
        for r in results:
            self.busy_seconds += r.get("seconds", 0.0)
            self.step_seconds[kind_of_step] = self.step_seconds.get(kind_of_step, 0.0) + r.get("seconds", 0.0)
            self.max_maps = max(self.max_maps, r.get("max_maps", 0))
            self.max_open_files = max(self.max_open_files, r.get("max_open_files", 0))
        return results  # type: ignore[return-value]

    def _declared(self, kind: str) -> int:
        """The estimate, capped below the largest node's memory (a task no node can hold would wait forever;
        ``dedup.task_memory`` + ``expected_docs`` refuse such a plan before any work)."""
        import ray

        if self._node_memory is None:
            self._node_memory = max((int(n["Resources"].get("memory", 0)) for n in ray.nodes() if n.get("Alive")),
                                    default=0)
        want = self.memory[kind]
        if self._node_memory and want > 0.8 * self._node_memory:
            if self.log:
                self.log.warning("dedup %s tasks are estimated at %.2f GiB, more than a node has; declaring %.2f GiB",
                                 kind, want / 2**30, 0.8 * self._node_memory / 2**30)
            return int(0.8 * self._node_memory)
        return want

    def shuffled(self, name: str, files: list[str], partitions: int, fan_in: int,
                 transforms: list | None = None) -> tuple[list[str], list | None]:
        """Merge ``files`` (partitioned) level by level until at most ``fan_in`` remain."""
        level = 0
        while len(files) > fan_in:
            level += 1
            out_dir = self.dir / name / f"merge-{level}"
            groups = [list(range(i, min(i + fan_in, len(files)))) for i in range(0, len(files), fan_in)]
            outs = [str(out_dir / f"part-{g:05d}.arrow") for g in range(len(groups))]
            self.run(f"{name}/merge-{level}", "merge",
                     [(merge_task, ([files[i] for i in grp], outs[g], partitions, self.root,
                                    None if transforms is None else [transforms[i] for i in grp]))
                      for g, grp in enumerate(groups)])
            files, transforms = outs, None
        return files, transforms

    def remove_data(self, name: str) -> None:
        """Delete a finished step's data files (its markers stay: a resume skips it without them)."""
        for path in (self.dir / name).rglob("*.arrow"):
            path.unlink(missing_ok=True)


def graph_memory(cfg: DedupConfig, documents: int) -> dict[str, int]:
    """Memory each kind of graph task declares to Ray: plan-dedup's estimate for this run's documents."""
    from pipeline.dedup.plan import plan_dedup

    plan = plan_dedup(max(1, documents), cfg)
    est = plan.task_memory
    floor = 64 * MIB
    return {"candidates": max(floor, est["candidates (per partition)"]),
            "components": max(floor, est["connected components (per partition)"]),
            "keepers": max(floor, est["keepers (per partition)"]),
            "merge": max(floor, est["merge (per task)"])}


def run_graph(run_dir: Path, units: list[Unit], cfg: DedupConfig, log=None, documents: int = 0) -> dict[str, Any]:
    """Phase 2 on Ray; resumable task by task (its marker ``graph.done.json`` is written last)."""
    out = run_dir / STAGES_DIR / STAGE
    marker = out / "graph.done.json"
    if marker.exists():
        return read_json(marker)
    started = time.perf_counter()
    P, F = cfg.partitions, cfg.fan_in
    root = str(run_dir)
    sig_dir = run_dir / STAGES_DIR / SIGNATURES
    ordered = sorted(units, key=lambda u: u.id)
    runs = [[str(sig_dir / f"{u.id}.arrow") for u in ordered]]
    band_files = [str(sig_dir / f"{u.id}.bands.arrow") for u in ordered]
    transforms: list = [None] * len(band_files)
    for r, index_dir in enumerate(cfg.index, start=1):
        index_sig = Path(index_dir) / STAGES_DIR / SIGNATURES
        check_index(index_sig, cfg)
        sig_files = sorted(p for p in index_sig.glob("*.arrow") if not p.name.endswith(".bands.arrow"))
        runs.append([str(p) for p in sig_files])
        band_files += [str(p.with_name(p.name[: -len(".arrow")] + ".bands.arrow")) for p in sig_files]
        transforms += [IndexRunBands(r)] * len(sig_files)
    steps = GraphSteps(out / "graph", run_dir, graph_memory(cfg, documents), log)
    import ray

    # One copy of the signature file list (O(units)) in the object store, not one per task's arguments.
    runs_ref = ray.put(runs)
    g = steps.dir

    def parts(step: str) -> list[str]:
        return [str(g / step / f"part-{k:05d}.arrow") for k in range(P)]

    bands, band_transforms = steps.shuffled("bands", band_files, P, F, transforms)
    edges, nodes = parts("candidates"), [str(g / "candidates" / f"nodes-{k:05d}.arrow") for k in range(P)]
    found = steps.run("candidates", "candidates",
                      [(candidates_step, (k, bands, band_transforms, runs_ref, P, cfg.threshold, cfg.verify, edges[k],
                                          nodes[k], root, F)) for k in range(P)])
    steps.remove_data("bands")
    stats = Counter()
    for r in found:
        stats.update({k: r.get(k, 0) for k in ("candidate_pairs", "edges", "rejected_by_verification",
                                                "node_key_ties")})
    previous, rounds, current_step = None, 0, "candidates"
    while True:
        if rounds >= cfg.max_rounds:
            raise RuntimeError(f"dedup: connected components did not converge in {cfg.max_rounds} rounds")
        rounds += 1
        name = f"round-{rounds:03d}"
        inputs, _ = steps.shuffled(f"{name}/large-in", edges, P, F)
        large = parts(f"{name}/large")
        steps.run(f"{name}/large", "components",
                  [(large_star_step, (k, inputs, P, large[k], root)) for k in range(P)])
        inputs, _ = steps.shuffled(f"{name}/small-in", large, P, F)
        small = parts(f"{name}/small")
        prints = steps.run(f"{name}/small", "components",
                           [(small_star_step, (k, inputs, P, small[k], root)) for k in range(P)])
        # the previous round's edges are consumed: free their disk (the candidates' node keys stay)
        if current_step == "candidates":
            for path in edges:
                Path(path).unlink(missing_ok=True)
        else:
            steps.remove_data(current_step)
        steps.remove_data(f"{name}/large")
        steps.remove_data(f"{name}/large-in")
        steps.remove_data(f"{name}/small-in")
        edges, current_step = small, name
        current = (sum(p["fingerprint"] for p in prints) % (1 << 64), sum(p["edges"] for p in prints))
        if current == previous:
            break
        previous = current
    edge_inputs, _ = steps.shuffled("labels-edges", edges, P, F)
    node_inputs, _ = steps.shuffled("labels-nodes", nodes, P, F)
    labelled = parts("labels")
    steps.run("labels", "components",
              [(labels_step, (k, edge_inputs, node_inputs, P, labelled[k], root)) for k in range(P)])
    unit_count, R = len(ordered), removal_parts(cfg, len(ordered))
    label_inputs, _ = steps.shuffled("keepers-in", labelled, P, F)
    outcomes = steps.run("keepers", "keepers",
                         [(keepers_step, (k, label_inputs, runs_ref, str(out), unit_count, R, root, F)) for k in range(P)])
    removal_inputs, _ = steps.shuffled("removals-in", parts("keepers"), R, F)
    steps.run("removals", "merge",
              [(collect_removals_step, (r, removal_inputs, str(out / "removals" / f"part-{r:05d}.arrow"), root))
               for r in range(R)])
    histogram = Counter()
    for o in outcomes:
        histogram.update(o["cluster_sizes"])
    summary = {"params": dedup_params(cfg), "index_runs": len(cfg.index),
               "candidate_pairs": stats["candidate_pairs"], "verified_edges": stats["edges"],
               "rejected_by_verification": stats["rejected_by_verification"],
               "node_key_ties": stats["node_key_ties"], "rounds": rounds,
               "clusters": sum(o["clusters"] for o in outcomes),
               "cluster_size_histogram": dict(sorted(histogram.items(), key=lambda kv: int(kv[0].split("-")[0]))),
               "removed": sum(o["removed"] for o in outcomes), "removed_exact": sum(o["exact"] for o in outcomes),
               "shuffle": {"fan_in": F, "partitions": P, "removal_files": R,
                           "band_merge_levels": len(merge_plan(len(band_files), F)) - 1,
                           "tasks": steps.tasks, "resumed_tasks": steps.resumed,
                           "task_seconds": round(steps.busy_seconds, 3),
                           "task_seconds_by_step": {k: round(v, 3) for k, v in sorted(steps.step_seconds.items())},
                           "max_driver_refs": steps.max_driver_refs, "max_maps_per_task": steps.max_maps,
                           "max_open_files_per_task": steps.max_open_files,
                           "max_signature_files_opened": max([o.get("signature_files_opened", 0)
                                                              for o in found + outcomes] or [0])},
               "seconds": round(time.perf_counter() - started, 3)}
    write_json(marker, summary)
    shutil.rmtree(steps.dir, ignore_errors=True)   # every intermediate file is consumed
    if log:
        log.info("dedup graph: %s", summary)
    return summary


def check_index(index_sig: Path, cfg: DedupConfig) -> None:
    params_file = index_sig / "params.json"
    if not params_file.exists():
        raise ValueError(f"dedup.index: {index_sig.parent.parent} has no dedup signatures (run it with dedup on)")
    theirs, ours = read_json(params_file), dedup_params(cfg)
    # an index from before cjk_shingles existed split CJK text into whole runs ("words")
    theirs.setdefault("cjk_shingles", "words")
    for key in ("num_perm", "seed", "ngram", "bands", "rows", "scope", "exact", "minhash", "partitions",
                "cjk_shingles"):
        if theirs.get(key) != ours[key]:
            raise ValueError(f"dedup.index: {index_sig.parent.parent} was built with {key}={theirs.get(key)!r}, "
                             f"this run uses {ours[key]!r}")


# ------------------------------------------------------------------------------------ phase 3
class DedupApplyStage(MapStage):
    name = STAGE

    def __init__(self, input_stage: MapStage, unit_index: dict[str, int], removal_files: int,
                 audit: AuditConfig | None = None):
        self.audit = audit or AuditConfig(dropped_per_reason=0)
        self.input_stage = input_stage
        self.unit_index = unit_index
        self.removal_files = removal_files

    def removed_rows(self, run_dir: Path, unit: Unit) -> dict[int, int]:
        """The unit's removed rows -> reason, from the one removal file of its unit range."""
        index = self.unit_index[unit.id]
        part = int(removal_partition(np.array([index]), len(self.unit_index), self.removal_files)[0])
        path = self.stage_dir(run_dir) / "removals" / f"part-{part:05d}.arrow"
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
            units = table.column("unit").to_numpy()
            lo, hi = np.searchsorted(units, index), np.searchsorted(units, index, side="right")
            rows = table.column("row").to_numpy()[lo:hi].tolist()
            why = table.column("reason").to_numpy()[lo:hi].tolist()
            del table, units
        return dict(zip(rows, why))

    def run_unit(self, unit: Unit, run_dir: Path) -> dict[str, Any]:
        from pipeline.document import DOC_SCHEMA

        started = time.perf_counter()
        removed = self.removed_rows(run_dir, unit)
        ledger = Ledger()
        kept_total = 0
        sampler = DropSampler(self.audit.dropped_per_reason, self.audit.dropped_max_chars)
        source = pq.ParquetFile(self.input_stage.output_path(run_dir, unit))
        with atomic_path(self.output_path(run_dir, unit)) as tmp, \
                pq.ParquetWriter(tmp, DOC_SCHEMA, compression="zstd") as writer:
            row = 0
            for batch in source.iter_batches(batch_size=READ_BATCH):
                keep = np.ones(batch.num_rows, dtype=bool)
                for i, (src, kind, text) in enumerate(zip(batch.column("source").to_pylist(),
                                                          batch.column("source_kind").to_pylist(),
                                                          batch.column("text").to_pylist())):
                    nbytes = len(text.encode("utf-8", "surrogatepass"))
                    ledger.took(STAGE, src, kind, 1, nbytes)
                    if row + i in removed:
                        keep[i] = False
                        ledger.dropped(STAGE, src, kind, REASONS[removed[row + i]], 1, nbytes)
                        sampler.offer(REASONS[removed[row + i]], batch.column("id")[i].as_py(), src, text,
                                      lambda i=i, b=batch: json.loads(b.column("metadata")[i].as_py()))
                    else:
                        ledger.kept(STAGE, src, kind, 1, nbytes)
                row += batch.num_rows
                kept_total += int(keep.sum())
                writer.write_table(pa.Table.from_batches([batch]).filter(pa.array(keep)).cast(DOC_SCHEMA))
        sampler.write(self.dropped_path(run_dir, unit))
        ledger.add_seconds(STAGE, unit.source, time.perf_counter() - started)
        return {"ledger": ledger.to_json(), "documents": kept_total, "removed": len(removed)}
