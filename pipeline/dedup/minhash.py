"""Text -> normalised words -> word n-gram shingle hashes -> MinHash signature -> LSH band keys.

Words are runs of word characters (``\\w+``), except in the scripts written without spaces between words
(``cjk_shingles="characters"``, the default): there every character is one token, so a Chinese or Thai
sentence gives n-grams of characters instead of being one "word" (see ``CHARACTER_SCRIPTS``).

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
# Scripts whose words are not separated by spaces: one token per character (letters and the marks written
# with them; their punctuation still separates). Per script:
#   Han, Hiragana, Katakana (Chinese, Japanese): unspaced, a word is 1-3 characters; the iteration marks
#     (々 〻 ゝ ヽ), 〆 〇 and the prolonged sound mark ー are characters of words, ・ and ゠ punctuation.
#   Thai, Lao, Khmer, Myanmar: unspaced within a phrase (spaces end phrases or sentences); their vowel signs
#     are marks, not word characters, so \w+ would even break runs there. Their punctuation (๏ ๚ ๛ ฿,
#     ၊ ။ ၌-၏, ។ ៕ ៖ ៘-៛) separates.
# Not listed, so they keep \w+ runs: Hangul (Korean puts spaces between words, a run is one eojeol),
# Tibetan (the tsheg ་ is punctuation: runs are syllables already), and every spaced script.
CHARACTER_SCRIPTS = {
    "Han": "\u2e80-\u2fd5\u3005-\u3007\u3021-\u3029\u3038-\u303b\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
           "\U00020000-\U0003134f",
    "Hiragana": "\u3041-\u3096\u309d-\u309f\U0001b001-\U0001b11f",
    "Katakana": "\u3031-\u3035\u30a1-\u30fa\u30fc-\u30ff\u31f0-\u31ff\uff66-\uff9f",
    "Thai": "\u0e01-\u0e3a\u0e40-\u0e4e\u0e50-\u0e59",
    "Lao": "\u0e81-\u0eae\u0eb0-\u0ecf\u0ed0-\u0edf",
    "Khmer": "\u1780-\u17d3\u17d7\u17dc-\u17dd\u17e0-\u17e9\u19e0-\u19ff",
    "Myanmar": "\u1000-\u1049\u1050-\u109f\ua9e0-\ua9fe\uaa60-\uaa7f",
}
_CHARACTER_CLASS = "".join(CHARACTER_SCRIPTS.values())


def _bmp_part(ranges: str) -> str:
    """The BMP ranges of a class body made of ``a-b`` ranges and single characters."""
    out, i = [], 0
    while i < len(ranges):
        lo, hi, i = (ranges[i], ranges[i + 2], i + 3) if ranges[i + 1:i + 2] == "-" else (ranges[i], ranges[i], i + 1)
        if ord(lo) <= 0xFFFF:
            out.append(lo if lo == hi else f"{lo}-{chr(min(ord(hi), 0xFFFF))}")
    return "".join(out)


# Does a text without astral characters hold any of those scripts? (~45 µs on a 9 K character page; the
# full class, astral ranges included, is checked range by range and costs twice that.)
_HAS_CHARACTER_BMP = re.compile(f"[{_bmp_part(_CHARACTER_CLASS)}]")
# a run of the other word characters, or one character of those scripts (runs first: the common case)
_WORD_OR_CHARACTER = re.compile(f"[^\\W{_CHARACTER_CLASS}]+|[{_CHARACTER_CLASS}]", re.UNICODE)
CJK_SHINGLES = ("characters", "words")


def _combining_class() -> str:
    """The BMP's combining marks (canonical combining class > 0) as a regex class, from this unicodedata.
    A class with astral ranges is checked range by range for every character (re keeps only the BMP in a
    bitmap), so astral marks are left to the per-character loop, for the rare text that has astral chars."""
    marks = [c for c in range(0x300, 0x10000) if unicodedata.combining(chr(c))]
    ranges, start = [], 0
    for i in range(1, len(marks) + 1):
        if i == len(marks) or marks[i] != marks[i - 1] + 1:
            ranges.append(f"{re.escape(chr(marks[start]))}-{re.escape(chr(marks[i - 1]))}")
            start = i
    return "".join(ranges)


_COMBINING_BMP = re.compile(f"[{_combining_class()}]+")
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


def strip_combining(text: str) -> str:
    """``text`` without its combining marks: ``"".join(ch for ch in text if not unicodedata.combining(ch))``,
    a regex substitution for the BMP (about 4x faster on a web page)."""
    text = _COMBINING_BMP.sub("", text)
    if _ASTRAL.search(text):
        text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return text
_DIGIT = re.compile(r"\d", re.UNICODE)
_ROLL = np.uint64(0x9E3779B97F4A7C15)      # odd multiplier combining word hashes into a window hash
_SHINGLE_CHUNK = 8192                       # shingles per numpy block: bounds memory for book-length texts
_FMIX = (np.uint64(33), np.uint64(0xFF51AFD7ED558CCD), np.uint64(33), np.uint64(0xC4CEB9FE1A85EC53),
         np.uint64(33))


def normalize_words(text: str, cjk_shingles: str = "characters") -> list[str]:
    """Lower case, accents stripped (NFKD without combining marks), digits -> 0, punctuation -> space,
    whitespace runs collapsed: the words MinHash sees (datatrove's TextNormConfig defaults, in spirit).
    With ``cjk_shingles="characters"`` each character of an unspaced script (``CHARACTER_SCRIPTS``) is a
    word of its own; ASCII text is split the same either way."""
    text = unicodedata.normalize("NFKD", text.lower())
    if text.isascii():
        return _WORD.findall(_DIGIT.sub("0", text))
    text = _COMBINING_BMP.sub("", text)
    astral = _ASTRAL.search(text) is not None
    if astral:
        text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = _DIGIT.sub("0", text)
    # Without a character of those scripts both regexes split alike; the quick test keeps that case (every
    # spaced script, accents and curly quotes included) at the cost of \w+.
    if cjk_shingles == "characters" and (astral or _HAS_CHARACTER_BMP.search(text)):
        return _WORD_OR_CHARACTER.findall(text)
    return _WORD.findall(text)


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
    cjk_shingles: str = "characters"   # or "words" (see normalize_words)

    def __post_init__(self):
        if self.cjk_shingles not in CJK_SHINGLES:
            raise ValueError(f"cjk_shingles must be one of {CJK_SHINGLES}, not {self.cjk_shingles!r}")

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
        hashes = shingle_hashes(normalize_words(text, self.cjk_shingles), self.ngram, distinct=False)
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
    punctuation). The same in both ``cjk_shingles`` modes (whole runs): joining characters instead would
    only add texts that differ in the spaces between CJK characters, which MinHash with character shingles
    already finds (estimated Jaccard 1), and would change every CJK document's key between the modes."""
    return xxhash.xxh3_64_intdigest(" ".join(normalize_words(text, "words")), seed=scope_hash)


def scope_hash(scope: str) -> int:
    return xxhash.xxh3_64_intdigest(scope)


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Fraction of equal signature values, row-wise for [k, num_perm] arrays."""
    return (a == b).mean(axis=-1)
