"""The dedup graph's steps, one partition each, from partitioned files to partitioned files.

Each function is the body of one Ray task: it reads partition ``k`` of its inputs (``shuffle``), computes
with the pure numpy functions of ``graph``, writes its outputs atomically and returns a small dict (stats,
the most maps and files it held). None keeps anything in memory beyond its partition, the signature
tables it reads (a bounded LRU), and — unavoidably — the edges of the largest cluster.

Locations (``run << 56 | unit << 32 | row``) are the graph's nodes; node keys only order keepers.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path
from pipeline.dedup.graph import bucket_star_pairs, edges_fingerprint, large_star, small_star, unique_edges
from pipeline.dedup.minhash import estimated_jaccard
from pipeline.dedup.shuffle import Columns, MapProbe, read_partition, write_ipc, write_partitioned

UNIT_BITS, RUN_SHIFT = 32, 56          # loc = run << 56 | unit << 32 | row
UNIT_MASK = (1 << (RUN_SHIFT - UNIT_BITS)) - 1
ROW_MASK = (1 << UNIT_BITS) - 1
INDEX_BIT = 1 << 62                    # graph.node_key's "new document" bit
REASON_EXACT, REASON_NEAR = 0, 1
REASONS = {REASON_EXACT: "exact_duplicate", REASON_NEAR: "near_duplicate"}
BAND_COLUMNS = ("key", "node", "loc", "exact")
EDGE_COLUMNS = ("u", "v")


def make_loc(run: int, unit: int, rows: np.ndarray) -> np.ndarray:
    return (np.int64(run) << RUN_SHIFT) | (np.int64(unit) << UNIT_BITS) | rows.astype(np.int64)


def node_partition(nodes: np.ndarray, partitions: int) -> np.ndarray:
    """The partition a node (location) belongs to: a multiplicative hash, so consecutive rows of one
    unit spread over all partitions."""
    with np.errstate(over="ignore"):
        mixed = nodes.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return ((mixed >> np.uint64(32)) % np.uint64(partitions)).astype(np.int64)


def removal_partition(units: np.ndarray, unit_count: int, partitions: int) -> np.ndarray:
    """Removals go to the partition of their unit's range, so the apply step of a unit reads one file."""
    return (units.astype(np.int64) * partitions // max(1, unit_count)).astype(np.int64)


class IndexRunBands:
    """Band rows of an earlier run (incremental mode): its documents outrank this run's (they were written
    as "new" when their run ran) and their locations carry the run number."""

    def __init__(self, run: int):
        self.run = run

    def __call__(self, cols: Columns) -> Columns:
        return {**cols, "node": cols["node"] & ~np.int64(INDEX_BIT),
                "loc": cols["loc"] | (np.int64(self.run) << RUN_SHIFT)}


# ------------------------------------------------------------------------------------ signatures by location
class SignatureFiles:
    """The signature files of the run (run 0) and of the index runs, read by location. Reads are grouped
    by file (one sort, each file opened once per call) and at most ``max_open`` files stay mapped."""

    def __init__(self, runs: list[list[str]], max_open: int = 16, probe: MapProbe | None = None):
        self.runs = runs              # runs[r][u] = path of unit u's signature file in run r
        self.max_open = max_open
        self.probe = probe
        self._open: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
        self.opened = 0

    def table(self, run: int, unit: int) -> pa.Table:
        key = (run, unit)
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        while len(self._open) >= self.max_open:
            self._open.popitem(last=False)
        table = pa.ipc.open_file(pa.memory_map(self.runs[run][unit])).read_all()
        self._open[key] = table
        self.opened += 1
        return table

    def rows(self, locs: np.ndarray, columns: tuple[str, ...]) -> dict[str, Any]:
        """The named columns at these locations (in their order): ``sig`` as a 2-D array, ``exact`` as
        uint64, ``id`` as a list. One pass over the files the locations touch, each opened once."""
        locs = np.asarray(locs, dtype=np.int64)
        group = locs >> UNIT_BITS                                 # (run, unit) in one number
        order = np.argsort(group, kind="stable")
        sorted_group = group[order]
        bounds = np.flatnonzero(np.r_[True, sorted_group[1:] != sorted_group[:-1], True]) if len(locs) else [0]
        out: dict[str, Any] = {"id": [None] * len(locs), "exact": np.zeros(len(locs), np.uint64), "sig": None}
        for s, e in zip(bounds[:-1], bounds[1:]):
            idx = order[s:e]
            g = int(sorted_group[s])
            table = self.table(g >> (RUN_SHIFT - UNIT_BITS), g & UNIT_MASK)
            take = pa.array(locs[idx] & ROW_MASK)
            for column in columns:
                taken = table.column(column).take(take)
                if column == "id":
                    for i, value in zip(idx.tolist(), taken.to_pylist()):
                        out["id"][i] = value
                elif column == "sig":
                    arr = taken.combine_chunks()
                    if out["sig"] is None:
                        out["sig"] = np.zeros((len(locs), arr.type.list_size), dtype=np.uint64)
                    out["sig"][idx] = arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), -1)
                else:
                    out[column][idx] = taken.to_numpy()
        if self.probe is not None:     # the LRU is at its fullest now: one look at /proc (~1 ms) per call
            self.probe.sample()
        if out["sig"] is None:
            out["sig"] = np.zeros((len(locs), 0), dtype=np.uint64)
        return {c: out[c] for c in columns}


# ------------------------------------------------------------------------------------ steps
def candidates_step(k: int, band_files: list[str], transforms: list, sig_runs: list[list[str]], partitions: int,
                    threshold: float, verify: bool, out_edges: str, out_nodes: str, root: str,
                    max_open: int) -> dict[str, Any]:
    """Partition k of all band rows -> buckets -> star edges between locations to each bucket's minimum,
    verified by estimated Jaccard -> edges (both directions) partitioned by their first node, and the
    (location, node key) of every node seen, partitioned by location."""
    probe = MapProbe(root)
    cols = read_partition(band_files, k, BAND_COLUMNS, transforms)
    key, node = cols["key"].astype(np.uint64), cols["node"].astype(np.int64)
    loc, is_exact = cols["loc"].astype(np.int64), cols["exact"].astype(bool)
    i, j = bucket_star_pairs(key, loc)
    stats: Counter = Counter(candidate_pairs=len(i))
    stats["node_key_ties"] = int(((node[i] == node[j]) & (loc[i] != loc[j])).sum())
    a, b = np.minimum(loc[i], loc[j]), np.maximum(loc[i], loc[j])
    exact_pair = is_exact[i]
    # one row per distinct edge; an exact-key bucket vouches for its pairs without verification
    order = np.lexsort((~exact_pair, b, a))
    a, b, exact_pair = a[order], b[order], exact_pair[order]
    first = np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])] if len(a) else np.zeros(0, bool)
    a, b, exact_pair = a[first], b[first], exact_pair[first]
    opened = 0
    if verify and len(a):
        check = ~exact_pair
        jac = np.ones(len(a))
        if check.any():
            files = SignatureFiles(sig_runs, max_open, probe)
            n = int(check.sum())
            sig = files.rows(np.r_[a[check], b[check]], ("sig",))["sig"]    # both ends in one pass
            jac[check] = estimated_jaccard(sig[:n], sig[n:])
            opened = files.opened
        ok = jac >= threshold
        stats["rejected_by_verification"] = int((~ok).sum())
        a, b = a[ok], b[ok]
    stats["edges"] = len(a)
    u, v = np.r_[a, b], np.r_[b, a]
    write_partitioned(out_edges, {"u": u, "v": v}, node_partition(u, partitions), partitions)
    # the keeper order (node key) of each node, looked up by location (sorted, no Python dict)
    seen, where = np.unique(loc, return_index=True)
    nodes = np.unique(u)
    keys = node[where[np.searchsorted(seen, nodes)]] if len(nodes) else np.zeros(0, np.int64)
    write_partitioned(out_nodes, {"loc": nodes, "key": keys}, node_partition(nodes, partitions), partitions)
    probe.sample()
    return {**stats, "band_rows": len(key), "signature_files_opened": opened, **probe.peak()}


def large_star_step(k: int, inputs: list[str], partitions: int, out: str, root: str) -> dict[str, Any]:
    """Edges in both directions, grouped by node -> large-star edges, keyed by their larger end."""
    probe = MapProbe(root)
    cols = read_partition(inputs, k, EDGE_COLUMNS)
    a, b = large_star(cols["u"].astype(np.int64), cols["v"].astype(np.int64))
    hi, lo = np.maximum(a, b), np.minimum(a, b)
    write_partitioned(out, {"u": hi, "v": lo}, node_partition(hi, partitions), partitions)
    probe.sample()
    return {"edges": len(hi), **probe.peak()}


def small_star_step(k: int, inputs: list[str], partitions: int, out: str, root: str) -> dict[str, Any]:
    """Edges as (larger, smaller), grouped by the larger end -> small-star edges, both directions, keyed by
    their first node; with the fingerprint of this partition's edges (convergence)."""
    probe = MapProbe(root)
    cols = read_partition(inputs, k, EDGE_COLUMNS)
    a, b = small_star(cols["u"].astype(np.int64), cols["v"].astype(np.int64))
    a, b = unique_edges(np.maximum(a, b), np.minimum(a, b))
    u, v = np.r_[a, b], np.r_[b, a]
    write_partitioned(out, {"u": u, "v": v}, node_partition(u, partitions), partitions)
    probe.sample()
    return {"fingerprint": edges_fingerprint(a, b), "edges": len(a), **probe.peak()}


def labels_step(k: int, edge_inputs: list[str], node_inputs: list[str], partitions: int, out: str,
                root: str) -> dict[str, Any]:
    """Converged stars (both directions, by first node) and the node keys of this partition's nodes ->
    (location, node key, label) rows, keyed by label."""
    probe = MapProbe(root)
    edges = read_partition(edge_inputs, k, EDGE_COLUMNS)
    u, v = edges["u"].astype(np.int64), edges["v"].astype(np.int64)
    order = np.argsort(u, kind="stable")
    u, v = u[order], v[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]]) if len(u) else np.zeros(0, np.int64)
    node = u[starts]
    label = np.minimum(np.minimum.reduceat(v, starts), node) if len(u) else node
    keys = read_partition(node_inputs, k, ("loc", "key"))
    kl, kk = keys["loc"].astype(np.int64), keys["key"].astype(np.int64)
    sort = np.argsort(kl, kind="stable")
    kl, kk = kl[sort], kk[sort]
    key = kk[np.searchsorted(kl, node)] if len(node) else np.zeros(0, np.int64)
    write_partitioned(out, {"loc": node, "key": key, "label": label}, node_partition(label, partitions), partitions)
    probe.sample()
    return {"nodes": len(node), **probe.peak()}


def keepers_step(k: int, inputs: list[str], sig_runs: list[list[str]], out_dir: str, unit_count: int,
                 removal_parts: int, root: str, max_open: int) -> dict[str, Any]:
    """Rows (location, node key, label) of the components whose label is in partition k -> removed
    documents. Each component keeps its member with the smallest node key (index runs first, then the best
    score, then the smallest id); equal keys (the same id twice) fall back to the smaller location."""
    probe = MapProbe(root)
    cols = read_partition(inputs, k, ("loc", "key", "label"))
    loc, key, label = (cols[c].astype(np.int64) for c in ("loc", "key", "label"))
    order = np.lexsort((loc, key, label))
    loc, key, label = loc[order], key[order], label[order]
    first = np.r_[True, label[1:] != label[:-1]] if len(label) else np.zeros(0, bool)
    group = np.cumsum(first) - 1
    keeper_loc, keeper_key = loc[first][group], key[first][group]
    sizes = np.bincount(group) if len(group) else np.zeros(0, np.int64)
    removed = ~first & ((loc >> RUN_SHIFT) == 0)                   # documents of an index run stay
    r_loc, k_loc, r_cluster = loc[removed], keeper_loc[removed], keeper_key[removed]
    files = SignatureFiles(sig_runs, max_open, probe)
    n = len(r_loc)
    both = files.rows(np.r_[r_loc, k_loc], ("id", "exact", "sig"))            # removed and keepers, one pass
    jac = estimated_jaccard(both["sig"][:n], both["sig"][n:]) if n else np.zeros(0)
    reason = np.where(both["exact"][:n] == both["exact"][n:], REASON_EXACT, REASON_NEAR).astype(np.int64)
    ids, kept_ids = both["id"][:n], both["id"][n:]
    cluster = [f"{int(x):016x}" for x in r_cluster]  # the keeper's key: independent of the input layout
    by_id = sorted(range(len(ids)), key=ids.__getitem__)
    removed_table = pa.table({"id": pa.array([ids[i] for i in by_id], pa.string()),
                              "kept_id": pa.array([kept_ids[i] for i in by_id], pa.string()),
                              "cluster_id": pa.array([cluster[i] for i in by_id], pa.string()),
                              "estimated_jaccard": pa.array(jac[by_id] if len(by_id) else [], pa.float64())})
    out = Path(out_dir)
    with atomic_path(out / "removed.parquet" / f"part-{k:05d}.parquet") as tmp:
        pq.write_table(removed_table, tmp)
    unit, row = (r_loc >> UNIT_BITS) & UNIT_MASK, r_loc & ROW_MASK
    write_partitioned(out / "graph" / "keepers" / f"part-{k:05d}.arrow",
                      {"unit": unit, "row": row, "reason": reason.astype(np.int8)},
                      removal_partition(unit, unit_count, removal_parts), removal_parts)
    probe.sample()
    histogram = Counter(_size_bucket(int(s)) for s in sizes)
    return {"removed": int(removed.sum()), "clusters": len(sizes), "cluster_sizes": dict(histogram),
            "exact": int((reason == REASON_EXACT).sum()), "signature_files_opened": files.opened, **probe.peak()}


def collect_removals_step(r: int, inputs: list[str], out: str, root: str) -> dict[str, Any]:
    """Partition r of the removals (a range of units) -> one file sorted by (unit, row) for the apply step."""
    probe = MapProbe(root)
    cols = read_partition(inputs, r, ("unit", "row", "reason"))
    order = np.lexsort((cols["row"], cols["unit"]))
    table = pa.table({"unit": cols["unit"][order].astype(np.int64), "row": cols["row"][order].astype(np.int64),
                      "reason": cols["reason"][order].astype(np.int8)})
    write_ipc(out, table)
    probe.sample()
    return {"removals": table.num_rows, **probe.peak()}


def _size_bucket(size: int) -> str:
    low = 2
    while low * 2 <= size:
        low *= 2
    return str(size) if size < 4 else f"{low}-{2 * low - 1}"
