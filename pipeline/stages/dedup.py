"""Dedup: exact and MinHash near-duplicate removal across the run, on Ray, in three phases.

1. ``dedup_signatures`` (map, one task per unit): per document its node key (keeper priority), exact key
   and MinHash signature -> ``stages/dedup_signatures/<unit>.arrow``; its LSH band keys (plus the exact key
   as one more "band") -> ``<unit>.bands.arrow``, sorted by shuffle partition (``key % partitions``).
2. the graph (global, ``partitions`` tasks per step, outputs under ``stages/dedup/``):
   *candidates*: partition k of every unit's bands -> buckets -> star edges between document locations
   (unique per document) to each bucket's minimum -> verified by estimated Jaccard from the two signatures
   (memory-mapped, random access) -> *connected components*: alternating large-star / small-star rounds,
   each a Ray shuffle of edge partitions keyed by node -> *labels* (node -> component) -> *keepers*: each
   component keeps its member with the smallest node key; removed documents with their keeper, cluster
   and estimated Jaccard, written to ``removed.parquet/part-k`` and
   ``removals/part-k.arrow`` (unit, row) for phase 3. ``graph.done.json`` marks it complete.
3. ``dedup`` (map, one task per unit): the unit's documents minus its removals, with the ledger's
   ``exact_duplicate`` / ``near_duplicate`` drops.

No task holds more than one partition of band keys or edges (plus the largest cluster's edges), and the
kept set does not depend on the number of workers or on how the input was split into files: the keeper
order (node keys) derives from document ids and scores, never from positions; positions only name the
graph's nodes.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path, read_json, write_json
from pipeline.config import DedupConfig
from pipeline.dedup.graph import (
    bucket_star_pairs,
    edges_fingerprint,
    large_star,
    node_key,
    small_star,
    unique_edges,
)
from pipeline.dedup.minhash import MinHasher, band_keys, estimated_jaccard, exact_key, lsh_params, scope_hash
from pipeline.document import metadata_scores
from pipeline.ledger import Ledger
from pipeline.sources.base import Unit
from pipeline.stages.base import STAGES_DIR, MapStage

SIGNATURES = "dedup_signatures"
STAGE = "dedup"
UNIT_BITS, RUN_SHIFT = 32, 56          # loc = run << 56 | unit << 32 | row
INDEX_BIT = 1 << 62                   # graph.node_key's "new document" bit
REASON_EXACT, REASON_NEAR = 0, 1
REASONS = {REASON_EXACT: "exact_duplicate", REASON_NEAR: "near_duplicate"}


def dedup_params(cfg: DedupConfig) -> dict[str, Any]:
    """Everything that shapes signatures and keys; an index run must share it."""
    bands, rows = (cfg.bands, cfg.rows) if cfg.bands else lsh_params(cfg.threshold, cfg.num_perm)
    return {"num_perm": cfg.num_perm, "seed": cfg.seed, "ngram": cfg.ngram, "bands": bands, "rows": rows,
            "scope": cfg.scope, "exact": cfg.exact, "minhash": cfg.minhash, "partitions": cfg.partitions,
            "score_key": cfg.score_key}


def make_loc(run: int, unit: int, rows: np.ndarray) -> np.ndarray:
    return (np.int64(run) << RUN_SHIFT) | (np.int64(unit) << UNIT_BITS) | rows.astype(np.int64)


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
        hasher = MinHasher(p["num_perm"], p["seed"], p["ngram"])
        table = pq.read_table(self.input_stage.output_path(run_dir, unit),
                              columns=["id", "source_kind", "text", "metadata"])
        ids = table.column("id").to_pylist()
        n = len(ids)
        scores = metadata_scores(table.column("metadata").to_pylist(), p["score_key"])
        if np.isnan(scores).all():
            scores = None
        nodes = node_key(ids, scores, indexed=False)
        sigs = np.zeros((n, p["num_perm"]), dtype=np.uint64)
        has_sig = np.zeros(n, dtype=bool)
        exact = np.zeros(n, dtype=np.uint64)
        scopes = np.zeros(n, dtype=np.uint64)
        for i, (kind, text) in enumerate(zip(table.column("source_kind").to_pylist(),
                                             table.column("text").to_pylist())):
            scopes[i] = scope_hash(kind if p["scope"] == "kind" else "all")
            exact[i] = exact_key(text, int(scopes[i]))
            if p["minhash"]:
                sig = hasher.signature(text)
                if sig is not None:
                    sigs[i], has_sig[i] = sig, True
        rows = np.arange(n, dtype=np.int64)
        loc = make_loc(0, self.unit_index[unit.id], rows)
        keys, key_nodes, key_locs, key_exact = [], [], [], []
        if p["exact"]:
            keys.append(exact), key_nodes.append(nodes), key_locs.append(loc), key_exact.append(np.ones(n, bool))
        if p["minhash"] and has_sig.any():
            with_sig = np.flatnonzero(has_sig)
            bk = np.concatenate([band_keys(sigs[with_sig[scopes[with_sig] == s]], p["bands"], p["rows"], int(s))
                                 for s in np.unique(scopes[with_sig])])
            order = np.concatenate([with_sig[scopes[with_sig] == s] for s in np.unique(scopes[with_sig])])
            keys.append(bk.reshape(-1))
            key_nodes.append(np.repeat(nodes[order], p["bands"]))
            key_locs.append(np.repeat(loc[order], p["bands"]))
            key_exact.append(np.zeros(bk.size, bool))
        self._write_signatures(run_dir, unit, ids, nodes, exact, sigs, has_sig)
        self._write_bands(run_dir, unit, keys, key_nodes, key_locs, key_exact)
        return {"documents": n, "with_signature": int(has_sig.sum())}

    def _write_signatures(self, run_dir, unit, ids, nodes, exact, sigs, has_sig) -> None:
        sig_col = pa.FixedSizeListArray.from_arrays(pa.array(sigs.reshape(-1), pa.uint64()), self.params["num_perm"])
        table = pa.table({"id": pa.array(ids, pa.string()), "node": nodes, "exact": exact, "has_sig": has_sig,
                          "sig": sig_col})
        with atomic_path(self.output_path(run_dir, unit)) as tmp, pa.OSFile(str(tmp), "wb") as sink, \
                pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)

    def _write_bands(self, run_dir, unit, keys, nodes, locs, exact) -> None:
        P = self.params["partitions"]
        key = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
        part = (key % np.uint64(P)).astype(np.int64)
        order = np.argsort(part, kind="stable")
        offsets = np.searchsorted(part[order], np.arange(P + 1)).tolist()
        table = pa.table({"key": key[order],
                          "node": (np.concatenate(nodes) if nodes else np.zeros(0, np.int64))[order],
                          "loc": (np.concatenate(locs) if locs else np.zeros(0, np.int64))[order],
                          "exact": (np.concatenate(exact) if exact else np.zeros(0, bool))[order]})
        table = table.replace_schema_metadata({"partition_offsets": json.dumps(offsets)})
        path = self.bands_path(run_dir, unit)
        with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, \
                pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)


# ------------------------------------------------------------------------------------ phase 2
class SignatureFiles:
    """Memory-mapped signature files of the run (run 0) and of the index runs, addressed by loc."""

    def __init__(self, runs: list[list[str]]):
        self.runs = runs              # runs[r][u] = path of unit u's signature file in run r
        self._open: dict[tuple[int, int], pa.Table] = {}

    def table(self, run: int, unit: int) -> pa.Table:
        if (run, unit) not in self._open:
            self._open[(run, unit)] = pa.ipc.open_file(pa.memory_map(self.runs[run][unit])).read_all()
        return self._open[(run, unit)]

    def _gather(self, locs: np.ndarray, column: str):
        run, unit = locs >> RUN_SHIFT, (locs >> UNIT_BITS) & ((1 << (RUN_SHIFT - UNIT_BITS)) - 1)
        row = locs & ((1 << UNIT_BITS) - 1)
        out = [None] * len(locs)
        group = run * (1 << 24) + unit
        for g in np.unique(group):
            idx = np.flatnonzero(group == g)
            col = self.table(int(run[idx[0]]), int(unit[idx[0]])).column(column)
            taken = col.take(pa.array(row[idx]))
            for i, value in zip(idx, taken.to_pylist() if column == "id" else _as_numpy(taken, column)):
                out[i] = value
        return out

    def signatures(self, locs: np.ndarray) -> np.ndarray:
        rows = self._gather(locs, "sig")
        return np.stack(rows) if rows else np.zeros((0, 0), np.uint64)

    def ids(self, locs: np.ndarray) -> list[str]:
        return self._gather(locs, "id")

    def exact(self, locs: np.ndarray) -> np.ndarray:
        return np.array(self._gather(locs, "exact"), dtype=np.uint64)


def _as_numpy(arr: pa.ChunkedArray, column: str):
    arr = arr.combine_chunks()
    if column == "sig":
        return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), -1)
    return arr.to_numpy(zero_copy_only=False)


def _split(u: np.ndarray, v: np.ndarray, by: np.ndarray, P: int) -> list[tuple[np.ndarray, np.ndarray]]:
    part = by % P
    return [(u[part == k], v[part == k]) for k in range(P)]


def candidates_task(k: int, band_files: list[tuple[int, str]], sig_runs: list[list[str]], P: int,
                    threshold: float, verify: bool):
    """Partition k of all band keys -> verified star edges, partitioned for the first large-star round, and
    the (node, loc) table of the nodes seen, partitioned by node."""
    keys, nodes, locs, exact = [], [], [], []
    for run, path in band_files:
        table = pa.ipc.open_file(pa.memory_map(path)).read_all()
        offsets = json.loads(table.schema.metadata[b"partition_offsets"])
        part = table.slice(offsets[k], offsets[k + 1] - offsets[k])
        keys.append(part.column("key").to_numpy())
        node = part.column("node").to_numpy()
        # documents of an index run outrank this run's (they were written as "new" when their run ran)
        nodes.append(node & ~np.int64(INDEX_BIT) if run else node)
        loc = part.column("loc").to_numpy()
        locs.append(loc | (np.int64(run) << RUN_SHIFT))
        exact.append(part.column("exact").to_numpy(zero_copy_only=False))
    key, node, loc, is_exact = (np.concatenate(x) if x else np.zeros(0) for x in (keys, nodes, locs, exact))
    node, loc = node.astype(np.int64), loc.astype(np.int64)
    # Graph nodes are locations, unique by construction (run, unit, row): two documents can never be one
    # node, whatever their keys. The keeper order (node key) travels beside them to the keepers step.
    i, j = bucket_star_pairs(key.astype(np.uint64), loc)
    stats = Counter(candidate_pairs=len(i))
    stats["node_key_ties"] = int(((node[i] == node[j]) & (loc[i] != loc[j])).sum())
    a, b = np.minimum(loc[i], loc[j]), np.maximum(loc[i], loc[j])
    exact_pair = is_exact[i].astype(bool)
    # one row per distinct edge; an exact-key bucket vouches for its pairs without verification
    order = np.lexsort((~exact_pair, b, a))
    a, b, exact_pair = a[order], b[order], exact_pair[order]
    first = np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])] if len(a) else np.zeros(0, bool)
    a, b, exact_pair = a[first], b[first], exact_pair[first]
    if verify and len(a):
        files = SignatureFiles(sig_runs)
        check = ~exact_pair
        jac = np.ones(len(a))
        if check.any():
            jac[check] = estimated_jaccard(files.signatures(a[check]), files.signatures(b[check]))
        ok = jac >= threshold
        stats["rejected_by_verification"] = int((~ok).sum())
        a, b = a[ok], b[ok]
    stats["edges"] = len(a)
    edge_parts = _split(np.r_[a, b], np.r_[b, a], np.r_[a, b], P)               # both directions, by first
    priority = dict(zip(loc.tolist(), node.tolist()))
    nl_locs = np.unique(np.r_[a, b]) if len(a) else np.zeros(0, np.int64)
    nl_keys = np.array([priority[int(x)] for x in nl_locs], dtype=np.int64)
    nodeloc_parts = _split(nl_locs, nl_keys, nl_locs, P)
    return (*edge_parts, *nodeloc_parts, dict(stats))


def _concat(parts: tuple) -> tuple[np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return (np.concatenate([p[0] for p in parts]).astype(np.int64),
            np.concatenate([p[1] for p in parts]).astype(np.int64))


def large_star_task(P: int, *parts):
    u, v = _concat(parts)
    a, b = large_star(u, v)
    hi, lo = np.maximum(a, b), np.minimum(a, b)
    return tuple(_split(hi, lo, hi, P))


def small_star_task(P: int, *parts):
    u, v = _concat(parts)
    a, b = small_star(u, v)
    a, b = unique_edges(np.maximum(a, b), np.minimum(a, b))
    return (*_split(np.r_[a, b], np.r_[b, a], np.r_[a, b], P), (edges_fingerprint(a, b), len(a)))


def labels_task(P: int, n_nodeloc: int, *parts):
    """Converged stars (both directions, by first node; after the first ``n_nodeloc`` parts, which are the
    (loc, node key) table of this partition) -> (loc, node key, label) rows, partitioned by label."""
    nodeloc_parts, edge_parts = parts[:n_nodeloc], parts[n_nodeloc:]
    u, v = _concat(edge_parts)
    order = np.argsort(u, kind="stable")
    u, v = u[order], v[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]]) if len(u) else np.zeros(0, np.int64)
    node = u[starts]
    label = np.minimum(np.minimum.reduceat(v, starts), node) if len(u) else node
    nl_locs, nl_keys = _concat(nodeloc_parts)
    lookup = dict(zip(nl_locs.tolist(), nl_keys.tolist()))
    key = np.array([lookup[int(x)] for x in node], dtype=np.int64)
    part = label % P
    return tuple((node[part == k], key[part == k], label[part == k]) for k in range(P))


def keepers_task(k: int, out_dir: str, sig_runs: list[list[str]], *parts) -> dict[str, Any]:
    """Rows (loc, node key, label) of the components whose label is in partition k -> removed docs. Each
    component keeps its member with the smallest node key (index runs first, then the best score, then
    the smallest id); equal keys (the same id twice) fall back to the smaller location."""
    loc = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    key = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    label = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int64)
    order = np.lexsort((loc, key, label))
    loc, key, label = loc[order], key[order], label[order]
    first = np.r_[True, label[1:] != label[:-1]] if len(label) else np.zeros(0, bool)
    group = np.cumsum(first) - 1
    keeper_loc, keeper_key = loc[first][group], key[first][group]
    sizes = Counter(group.tolist())
    removed = ~first & ((loc >> RUN_SHIFT) == 0)                   # documents of an index run stay
    r_loc, k_loc, r_cluster = loc[removed], keeper_loc[removed], keeper_key[removed]
    files = SignatureFiles(sig_runs)
    jac = estimated_jaccard(files.signatures(r_loc), files.signatures(k_loc)) if len(r_loc) else np.zeros(0)
    reason = np.where(files.exact(r_loc) == files.exact(k_loc), REASON_EXACT, REASON_NEAR) if len(r_loc) \
        else np.zeros(0, np.int64)
    ids, kept_ids = files.ids(r_loc), files.ids(k_loc)
    cluster = [f"{int(x):016x}" for x in r_cluster]  # the keeper's key: independent of the input layout
    order = sorted(range(len(ids)), key=ids.__getitem__)
    removed_table = pa.table({"id": pa.array([ids[i] for i in order], pa.string()),
                              "kept_id": pa.array([kept_ids[i] for i in order], pa.string()),
                              "cluster_id": pa.array([cluster[i] for i in order], pa.string()),
                              "estimated_jaccard": pa.array(jac[order] if len(order) else [], pa.float64())})
    out = Path(out_dir)
    with atomic_path(out / "removed.parquet" / f"part-{k:05d}.parquet") as tmp:
        pq.write_table(removed_table, tmp)
    unit = (r_loc >> UNIT_BITS) & ((1 << (RUN_SHIFT - UNIT_BITS)) - 1)
    row = r_loc & ((1 << UNIT_BITS) - 1)
    by_unit = np.lexsort((row, unit))
    removals = pa.table({"unit": unit[by_unit], "row": row[by_unit], "reason": reason[by_unit].astype(np.int8)})
    with atomic_path(out / "removals" / f"part-{k:05d}.arrow") as tmp, pa.OSFile(str(tmp), "wb") as sink, \
            pa.ipc.new_file(sink, removals.schema) as writer:
        writer.write_table(removals)
    return {"removed": int(removed.sum()), "clusters": len(sizes),
            "cluster_sizes": dict(Counter(_size_bucket(s) for s in sizes.values())),
            "exact": int((reason == REASON_EXACT).sum())}


def _size_bucket(size: int) -> str:
    low = 2
    while low * 2 <= size:
        low *= 2
    return str(size) if size < 4 else f"{low}-{2 * low - 1}"


def run_graph(run_dir: Path, units: list[Unit], cfg: DedupConfig, log=None) -> dict[str, Any]:
    """Phase 2 on Ray; resumable as a whole (its marker is written last)."""
    import ray

    out = run_dir / STAGES_DIR / STAGE
    marker = out / "graph.done.json"
    if marker.exists():
        return read_json(marker)
    started = time.perf_counter()
    P = cfg.partitions
    sig_dir = run_dir / STAGES_DIR / SIGNATURES
    runs = [[str(sig_dir / f"{u.id}.arrow") for u in sorted(units, key=lambda u: u.id)]]
    band_files = [(0, str(sig_dir / f"{u.id}.bands.arrow")) for u in units]
    for r, index_dir in enumerate(cfg.index, start=1):
        index_sig = Path(index_dir) / STAGES_DIR / SIGNATURES
        check_index(index_sig, cfg)
        sig_files = sorted(p for p in index_sig.glob("*.arrow") if not p.name.endswith(".bands.arrow"))
        runs.append([str(p) for p in sig_files])
        band_files += [(r, str(p.with_name(p.name[: -len(".arrow")] + ".bands.arrow"))) for p in sig_files]
    opts = {"num_cpus": 1, "max_retries": 3}
    cand = ray.remote(candidates_task).options(num_returns=2 * P + 1, **opts)
    results = [cand.remote(k, band_files, runs, P, cfg.threshold, cfg.verify) for k in range(P)]
    stats = Counter()
    for r in results:
        stats.update(ray.get(r[2 * P]))
    edges = [[r[k] for r in results] for k in range(P)]           # edges[k]: partition k from every task
    nodelocs = [[r[P + k] for r in results] for k in range(P)]
    ls = ray.remote(large_star_task).options(num_returns=P, **opts)
    ss = ray.remote(small_star_task).options(num_returns=P + 1, **opts)
    previous, rounds = None, 0
    while rounds < cfg.max_rounds:
        rounds += 1
        outs = [ls.remote(P, *edges[k]) for k in range(P)]
        outs = [ss.remote(P, *[o[k] for o in outs]) for k in range(P)]
        edges = [[o[k] for o in outs] for k in range(P)]
        fingerprints = ray.get([o[P] for o in outs])
        current = (sum(f for f, _ in fingerprints) % (1 << 64), sum(n for _, n in fingerprints))
        if current == previous:
            break
        previous = current
    else:
        raise RuntimeError(f"dedup: connected components did not converge in {cfg.max_rounds} rounds")
    lab = ray.remote(labels_task).options(num_returns=P, **opts)
    labelled = [lab.remote(P, len(nodelocs[k]), *nodelocs[k], *edges[k]) for k in range(P)]
    keep = ray.remote(keepers_task).options(**opts)
    outcomes = ray.get([keep.remote(k, str(out), runs, *[lab_out[k] for lab_out in labelled]) for k in range(P)])
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
               "seconds": round(time.perf_counter() - started, 3)}
    write_json(marker, summary)
    if log:
        log.info("dedup graph: %s", summary)
    return summary


def check_index(index_sig: Path, cfg: DedupConfig) -> None:
    params_file = index_sig / "params.json"
    if not params_file.exists():
        raise ValueError(f"dedup.index: {index_sig.parent.parent} has no dedup signatures (run it with dedup on)")
    theirs, ours = read_json(params_file), dedup_params(cfg)
    for key in ("num_perm", "seed", "ngram", "bands", "rows", "scope", "exact", "minhash", "partitions"):
        if theirs.get(key) != ours[key]:
            raise ValueError(f"dedup.index: {index_sig.parent.parent} was built with {key}={theirs.get(key)!r}, "
                             f"this run uses {ours[key]!r}")


# ------------------------------------------------------------------------------------ phase 3
class DedupApplyStage(MapStage):
    name = STAGE

    def __init__(self, input_stage: MapStage, unit_index: dict[str, int], partitions: int):
        self.input_stage = input_stage
        self.unit_index = unit_index
        self.partitions = partitions

    def removed_rows(self, run_dir: Path, unit: Unit) -> dict[int, int]:
        index = self.unit_index[unit.id]
        rows: dict[int, int] = {}
        for k in range(self.partitions):
            table = pa.ipc.open_file(pa.memory_map(str(self.stage_dir(run_dir) / "removals" / f"part-{k:05d}.arrow"))).read_all()
            units = table.column("unit").to_numpy()
            lo, hi = np.searchsorted(units, index), np.searchsorted(units, index, side="right")
            for r, why in zip(table.column("row").to_numpy()[lo:hi], table.column("reason").to_numpy()[lo:hi]):
                rows[int(r)] = int(why)
        return rows

    def run_unit(self, unit: Unit, run_dir: Path) -> dict[str, Any]:
        from pipeline.document import DOC_SCHEMA

        started = time.perf_counter()
        removed = self.removed_rows(run_dir, unit)
        ledger = Ledger()
        table = pq.read_table(self.input_stage.output_path(run_dir, unit))
        texts = table.column("text").to_pylist()
        keep = np.ones(table.num_rows, dtype=bool)
        for row, (source, kind, text) in enumerate(zip(table.column("source").to_pylist(),
                                                       table.column("source_kind").to_pylist(), texts)):
            nbytes = len(text.encode("utf-8", "surrogatepass"))
            ledger.took(STAGE, source, kind, 1, nbytes)
            if row in removed:
                keep[row] = False
                ledger.dropped(STAGE, source, kind, REASONS[removed[row]], 1, nbytes)
            else:
                ledger.kept(STAGE, source, kind, 1, nbytes)
        with atomic_path(self.output_path(run_dir, unit)) as tmp:
            pq.write_table(table.filter(pa.array(keep)).cast(DOC_SCHEMA), tmp, compression="zstd")
        ledger.add_seconds(STAGE, unit.source, time.perf_counter() - started)
        return {"ledger": ledger.to_json(), "documents": int(keep.sum()), "removed": len(removed)}
