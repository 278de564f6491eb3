"""Selection by score: absolute threshold, global per-source percentile, GPT-3 Pareto sampling.

**Exact distributed percentile.** A score is a float32 in [0, 1]; for non-negative floats the order of
the IEEE-754 bit patterns is the order of the values, so an order statistic can be found by radix
selection on the 32-bit pattern: one pass counts documents per high 16 bits (sparse per unit, summed on
the driver), which locates the bucket holding rank ``k``; a second pass counts the low 16 bits inside that
one bucket, which gives the exact value. Two passes over the per-unit score files, memory 65,536 counters
per source on the driver, no sampling error: the threshold equals ``numpy.percentile`` over all scores
(``method="linear"``, the interpolation numpy uses by default).

**Keep rule.** ``keep_percent: X`` keeps the documents whose score is at least the ``100 - X`` percentile
of their source, so ties at the threshold are all kept (the kept share can exceed X by the tied mass). With
distinct scores the interpolated threshold lies between two neighbouring scores, so at least
``ceil((n - 1) X / 100)`` of the ``n`` documents are kept: X% to within one document.

**Pareto sampling** (GPT-3, and NeMo Curator's ``FastTextQualityFilter``): keep a document when a
Pareto(alpha) draw exceeds ``1 - score``. The draw is derived from a hash of (seed, document id), not from
a random stream, so the decision for a document does not depend on which worker or unit it lands in.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

import numpy as np

HIGH_BITS = 16
BUCKETS = 1 << HIGH_BITS


def score_keys(scores: np.ndarray) -> np.ndarray:
    """float32 scores in [0, 1] -> uint32 keys with the same order (-0.0 folded onto +0.0)."""
    scores = np.asarray(scores, dtype=np.float32)
    if scores.size and (np.isnan(scores).any() or scores.min() < 0):
        raise ValueError("scores must be non-negative numbers")
    return (scores + np.float32(0.0)).view(np.uint32)


def high_counts(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sparse histogram of the high 16 bits: (buckets, counts)."""
    buckets, counts = np.unique(keys >> HIGH_BITS, return_counts=True)
    return buckets.astype(np.int64), counts.astype(np.int64)


def low_counts(keys: np.ndarray, bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """Sparse histogram of the low 16 bits of the keys in one high bucket."""
    inside = keys[(keys >> HIGH_BITS) == bucket] & (BUCKETS - 1)
    values, counts = np.unique(inside, return_counts=True)
    return values.astype(np.int64), counts.astype(np.int64)


def dense(parts: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    total = np.zeros(BUCKETS, dtype=np.int64)
    for index, counts in parts:
        np.add.at(total, index, counts)
    return total


def locate(histogram: np.ndarray, rank: int) -> tuple[int, int]:
    """The bucket holding the ``rank``-th smallest item (0-based) and the rank within that bucket."""
    cumulative = np.cumsum(histogram)
    if rank < 0 or rank >= cumulative[-1]:
        raise ValueError(f"rank {rank} outside 0..{int(cumulative[-1]) - 1}")
    bucket = int(np.searchsorted(cumulative, rank, side="right"))
    before = int(cumulative[bucket - 1]) if bucket else 0
    return bucket, rank - before


def key_value(high: int, low: int) -> float:
    return float(np.array([(high << HIGH_BITS) | low], dtype=np.uint32).view(np.float32)[0])


def percentile_ranks(n: int, q: float) -> tuple[int, int, float]:
    """numpy's linear method: the two order statistics around ``(n - 1) q / 100`` and the weight between."""
    if n <= 0:
        raise ValueError("percentile of no scores")
    position = (n - 1) * q / 100.0
    lo = int(math.floor(position))
    hi = min(lo + 1, n - 1)
    return lo, hi, position - lo


def lerp(a: float, b: float, t: float) -> float:
    """numpy's ``_lerp``: exact at both ends, the same rounding as ``np.percentile``."""
    diff = b - a
    return b - diff * (1 - t) if t >= 0.5 else a + diff * t


def keep_percent_to_q(keep_percent: float) -> float:
    return 100.0 - keep_percent


# ------------------------------------------------------------------------------------------ Pareto
def pareto_draws(doc_ids: list[str], seed: int, alpha: float) -> np.ndarray:
    """One Pareto(alpha) draw per document (numpy's ``pareto``: Lomax, support [0, inf)), from its id."""
    uniforms = np.empty(len(doc_ids), dtype=np.float64)
    salt = f"{seed}\x00".encode()
    for i, doc_id in enumerate(doc_ids):
        h = int.from_bytes(hashlib.blake2b(salt + doc_id.encode(), digest_size=8).digest(), "little")
        uniforms[i] = ((h >> 11) + 1) / float(1 << 53)     # (0, 1]
    return uniforms ** (-1.0 / alpha) - 1.0


def pareto_keep(scores: np.ndarray, doc_ids: list[str], seed: int, alpha: float) -> np.ndarray:
    return pareto_draws(doc_ids, seed, alpha) > 1.0 - np.asarray(scores, dtype=np.float64)


# -------------------------------------------------------------------------------------- histograms
def score_histogram(scores: np.ndarray, bins: int) -> list[int]:
    """Counts over ``bins`` equal bins of [0, 1] (1.0 falls in the last bin)."""
    index = np.minimum((np.asarray(scores, dtype=np.float64) * bins).astype(np.int64), bins - 1)
    return np.bincount(index, minlength=bins).tolist()
