"""The graph side of dedup, as pure numpy functions over one partition (the Ray code moves partitions).

Nodes are int64 keys whose order is the keeper priority (``node_key``), so a component's minimum is the
document to keep. Candidate edges come from LSH buckets as stars to each bucket's minimum (linear in the
bucket size, however large). Connected components use Kiveris et al.'s alternating *large-star* /
*small-star* rounds ("Connected Components in MapReduce and Beyond", SoCC 2014): each round is one shuffle
keyed by node and a per-node reduce, converging to stars around each component's minimum in O(log^2 n)
rounds, with no process holding more than its partition of the edges.
"""

from __future__ import annotations

import numpy as np

ID_BITS_NO_SCORE = 62
ID_BITS_WITH_SCORE = 46
SCORE_BITS = 16


def node_key(doc_ids: list[str], scores: np.ndarray | None, indexed: bool) -> np.ndarray:
    """int64 keys ordered by keeper priority: documents of the persisted index first (incremental mode),
    then the highest quality score (16-bit quantised), then the smallest document id (ids are hex digests,
    so their numeric prefix orders like the string)."""
    prefix = np.array([int(d[:16], 16) for d in doc_ids], dtype=np.uint64)
    new_bit = np.uint64(0 if indexed else 1) << np.uint64(62)
    if scores is None:
        return (new_bit | (prefix >> np.uint64(64 - ID_BITS_NO_SCORE))).astype(np.int64)
    clipped = np.clip(np.nan_to_num(scores, nan=0.0), 0.0, 1.0)
    rank = (np.uint64((1 << SCORE_BITS) - 1) - np.round(clipped * ((1 << SCORE_BITS) - 1)).astype(np.uint64))
    keys = new_bit | (rank << np.uint64(ID_BITS_WITH_SCORE)) | (prefix >> np.uint64(64 - ID_BITS_WITH_SCORE))
    return keys.astype(np.int64)


def _group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    if len(sorted_keys) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])


def bucket_star_pairs(bucket: np.ndarray, node: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices (i, j) into the inputs: for every bucket with several distinct nodes, each node j paired
    with the bucket's minimum node i."""
    if len(bucket) == 0:  # a shuffle partition no band key fell into (small runs, many partitions)
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    order = np.lexsort((node, bucket))
    b, n = bucket[order], node[order]
    keep = np.r_[True, (b[1:] != b[:-1]) | (n[1:] != n[:-1])]        # one entry per (bucket, node)
    order, b, n = order[keep], b[keep], n[keep]
    starts = _group_starts(b)
    sizes = np.diff(np.r_[starts, len(b)])
    head = np.repeat(starts, sizes)                                    # index of each entry's bucket minimum
    member = np.arange(len(b)) != head
    return order[head[member]], order[member]


def unique_edges(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(u) == 0:
        return u, v
    pairs = np.unique(np.stack([u, v], axis=1), axis=0)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


def _by_node(u: np.ndarray, v: np.ndarray):
    """Edges sorted by u, the start of each u's group, and m = min(u, its neighbours) per group."""
    order = np.argsort(u, kind="stable")
    u, v = u[order], v[order]
    starts = _group_starts(u)
    mins = np.minimum(np.minimum.reduceat(v, starts), u[starts])
    return u, v, starts, mins


def large_star(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Input: every edge in both directions (u, v), grouped here by u. For each u with m = min(u, N(u)):
    connect every neighbour v > u to m."""
    if len(u) == 0:
        return u, v
    u, v, starts, mins = _by_node(u, v)
    m = np.repeat(mins, np.diff(np.r_[starts, len(u)]))
    bigger = v > u
    return unique_edges(v[bigger], m[bigger])


def small_star(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Input: every edge once as (larger, smaller), grouped here by u = larger. For each u with
    m = min(N(u) + u): connect u and every such neighbour to m (except m itself)."""
    if len(u) == 0:
        return u, v
    u, v, starts, mins = _by_node(u, v)
    m = np.repeat(mins, np.diff(np.r_[starts, len(u)]))
    src = np.r_[v, u[starts]]
    dst = np.r_[m, mins]
    differ = src != dst
    return unique_edges(src[differ], dst[differ])


def edges_fingerprint(u: np.ndarray, v: np.ndarray) -> int:
    """Order-independent fingerprint of an edge set (to detect convergence)."""
    if len(u) == 0:
        return 0
    with np.errstate(over="ignore"):
        h = (u.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (v.astype(np.uint64) + np.uint64(0x632BE59BD9B4E019))
        h = h ^ (h >> np.uint64(29))
        return int(h.sum(dtype=np.uint64))


def connected_components_local(u: np.ndarray, v: np.ndarray, max_rounds: int = 100) -> dict[int, int]:
    """Single-process reference (tests): node -> component minimum, by the same star rounds."""
    a, b = unique_edges(np.minimum(u, v), np.maximum(u, v))
    for _ in range(max_rounds):
        before = edges_fingerprint(a, b), len(a)
        a, b = large_star(np.r_[a, b], np.r_[b, a])
        a, b = small_star(np.maximum(a, b), np.minimum(a, b))
        a, b = np.maximum(a, b), np.minimum(a, b)
        if (edges_fingerprint(a, b), len(a)) == before:
            break
    labels = {int(x): int(y) for x, y in zip(a, b)}
    for m in set(labels.values()):
        labels[m] = m
    return labels
