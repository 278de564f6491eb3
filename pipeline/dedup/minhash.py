"""Text -> normalised words -> word n-gram shingle hashes -> MinHash signature -> LSH band keys.

The signature is datasketch's ``MinHash`` with its ``affine64`` scheme (the MurmurHash3 finaliser on each
64-bit shingle hash, then ``a * h + b mod 2^64`` per permutation, permutations drawn by datasketch from the
seed), computed for all shingles of a document at once in numpy instead of datasketch's per-document
Python loop; tests check the two agree value for value. Shingle hashes are built from per-word xxh3-64
hashes combined over the ``n`` words of each window (no string per shingle is ever made).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import xxhash

_WORD = re.compile(r"\w+", re.UNICODE)      # runs of word characters: punctuation and spaces separate
_DIGIT = re.compile(r"\d", re.UNICODE)
_ROLL = np.uint64(0x9E3779B97F4A7C15)      # odd multiplier combining word hashes into a window hash
_SHINGLE_CHUNK = 8192                       # shingles per numpy block: bounds memory for book-length texts
_FMIX = (np.uint64(33), np.uint64(0xFF51AFD7ED558CCD), np.uint64(33), np.uint64(0xC4CEB9FE1A85EC53),
         np.uint64(33))


def normalize_words(text: str) -> list[str]:
    """Lower case, accents stripped (NFKD without combining marks), digits -> 0, punctuation -> space,
    whitespace runs collapsed: the words MinHash sees (datatrove's TextNormConfig defaults, in spirit)."""
    text = unicodedata.normalize("NFKD", text.lower())
    if not text.isascii():
        text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return _WORD.findall(_DIGIT.sub("0", text))


def fmix64(h: np.ndarray) -> np.ndarray:
    s1, m1, s2, m2, s3 = _FMIX
    h = h ^ (h >> s1)
    h = h * m1
    h = h ^ (h >> s2)
    h = h * m2
    return h ^ (h >> s3)


class _WordHashes(dict):
    """xxh3-64 of each word, computed once per process (words repeat across documents: Zipf)."""

    limit = 2_000_000

    def __missing__(self, word: str) -> int:
        if len(self) >= self.limit:
            self.clear()
        value = self[word] = xxhash.xxh3_64_intdigest(word)
        return value


_WORD_HASHES = _WordHashes()


def shingle_hashes(words: list[str], n: int, distinct: bool = True) -> np.ndarray:
    """64-bit hashes of the word n-grams, distinct unless ``distinct=False`` (a minimum does not care
    about repeats); a document shorter than n words is one shingle."""
    if not words:
        return np.zeros(0, dtype=np.uint64)
    word_hash = np.fromiter(map(_WORD_HASHES.__getitem__, words), dtype=np.uint64, count=len(words))
    width = min(n, len(words))
    windows = len(words) - width + 1
    with np.errstate(over="ignore"):
        acc = np.zeros(windows, dtype=np.uint64)
        for j in range(width):
            acc = acc * _ROLL + word_hash[j:j + windows]
        acc = fmix64(acc ^ np.uint64(width))
    return np.unique(acc) if distinct else acc


@dataclass(frozen=True)
class MinHasher:
    num_perm: int = 112
    seed: int = 1
    ngram: int = 5

    @cached_property
    def permutations(self) -> tuple[np.ndarray, np.ndarray]:
        from datasketch import MinHash

        a, b = MinHash(num_perm=self.num_perm, seed=self.seed, scheme="affine64").permutations
        return np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)

    def signature_of_hashes(self, hashes: np.ndarray) -> np.ndarray:
        """min over shingles of (a * fmix64(h) + b) mod 2^64, per permutation: uint64 [num_perm]."""
        a, b = self.permutations
        sig = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for start in range(0, len(hashes), _SHINGLE_CHUNK):
                phv = np.multiply.outer(fmix64(hashes[start:start + _SHINGLE_CHUNK]), a)
                phv += b
                np.minimum(sig, phv.min(axis=0), out=sig)
        return sig

    def signature(self, text: str) -> np.ndarray | None:
        """The document's signature, or None when it has no words (nothing to compare)."""
        hashes = shingle_hashes(normalize_words(text), self.ngram, distinct=False)
        return self.signature_of_hashes(hashes) if len(hashes) else None


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimising datasketch's weighted false positive + false negative probability."""
    from datasketch.lsh import _optimal_param

    return tuple(int(x) for x in _optimal_param(threshold, num_perm, 0.5, 0.5))


def band_keys(signatures: np.ndarray, bands: int, rows: int, scope_hash: int) -> np.ndarray:
    """uint64 [docs, bands]: one key per band of r signature values, salted by band index and scope, so a
    key identifies (scope, band, band values)."""
    docs = signatures.shape[0]
    sig = signatures[:, : bands * rows].reshape(docs, bands, rows)
    with np.errstate(over="ignore"):
        acc = np.full((docs, bands), np.uint64(scope_hash), dtype=np.uint64)
        acc = acc * _ROLL + np.arange(bands, dtype=np.uint64)[None, :]
        for j in range(rows):
            acc = fmix64(acc * _ROLL + sig[:, :, j])
    return acc


def exact_key(text: str, scope_hash: int) -> int:
    """64-bit hash of the normalised text within its scope (exact duplicates up to case, spacing and
    punctuation)."""
    return xxhash.xxh3_64_intdigest(" ".join(normalize_words(text)), seed=scope_hash)


def scope_hash(scope: str) -> int:
    return xxhash.xxh3_64_intdigest(scope)


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Fraction of equal signature values, row-wise for [k, num_perm] arrays."""
    return (a == b).mean(axis=-1)
