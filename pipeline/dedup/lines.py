"""Line-level dedup across documents (CCNet / Dolma BFF style), the pure part: which lines are the same
line, their 64-bit hashes, each document's votes, and the removal of the frequent lines from a text.

* **Lines** are the pieces of ``text.split("\\n")``: a removed line takes one newline with it, every other
  line (blank ones included) keeps its place and its bytes.
* **Normalisation** (what makes two lines the same line): lower case, digits -> ``0`` (so "© 2001-2023"
  and "© 2001-2024" footers match, and dates, counters, page numbers), runs of whitespace -> one space,
  stripped. A line that normalises to nothing is blank: never hashed, never counted, never removed.
* **Hash**: xxh3-64 of the normalised line's UTF-8 (seeded; a 64-bit value, the same on every machine and
  Python version; collisions ~ lines² / 2⁶⁵: 3 × 10⁻⁶ expected at 10⁷ distinct lines). The whole text is
  normalised at once and split afterwards (the three rules never create or remove a ``\\n``), so hashing a
  document is one regex pass plus one C call per line, and the hashes come back as one numpy array.
* **Votes**: a document counts each distinct line once (``document_line_hashes``), so the reduce's count of
  a hash is the number of documents that contain the line.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection

import numpy as np
import xxhash

HASH_SEED = 0x6C696E65        # "line": a seed of our own, so that these hashes are not xxh3's defaults
_hash = functools.partial(xxhash.xxh3_64_intdigest, seed=HASH_SEED)
_DIGIT = re.compile(r"\d")


def _bmp_ranges(test) -> str:
    """A regex class of the non-ASCII BMP characters passing ``test``, as ranges (sre checks a BMP-only
    class by bitmap: ~5x faster than ``\\d`` or any class holding an astral range)."""
    ranges: list[list[int]] = []
    for c in range(128, 0x10000):
        if test(chr(c)):
            if ranges and ranges[-1][1] == c - 1:
                ranges[-1][1] = c
            else:
                ranges.append([c, c])
    return "[" + "".join(re.escape(chr(a)) + ("-" + re.escape(chr(b)) if b > a else "") for a, b in ranges) + "]"


_BMP_DIGIT = re.compile(_bmp_ranges(str.isdecimal))            # Arabic-Indic, Devanagari, fullwidth, ...
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")
# str.isspace() characters beyond ASCII (NBSP, ideographic space, U+2028...)
_UNICODE_SPACES = tuple(chr(c) for c in range(128, 0x10000) if chr(c).isspace())
_UNICODE_SPACE = re.compile("[" + re.escape("".join(_UNICODE_SPACES)) + "]")
_ASCII = bytes.maketrans(b"123456789\t\r\x0b\x0c\x1c\x1d\x1e\x1f", b"000000000" + b" " * 8)  # digits, whitespace
# Words for the min_words_left check: runs of word characters, except that each character of a script
# written without spaces (Han, kana, Thai, Lao, Khmer, Myanmar) is a word of its own.
_UNSPACED = ("\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
             "\uf900-\ufaff\U00020000-\U0002fa1f")
_WORDS = re.compile(f"[{_UNSPACED}]|[^\\W{_UNSPACED}]+")


def normalized_lines(text: str) -> list[bytes]:
    """Each line of ``text.split("\\n")``, normalised, as UTF-8 (b"" for a blank line).

    Equal to ``" ".join(re.sub(r"\\d", "0", line.lower()).split()).encode()`` per line, computed for the
    whole text at once: lower case and (non-ASCII text only) Unicode spaces and digits by a regex pass each,
    then ASCII digits and whitespace by one byte translation, space runs and line edges by byte replaces;
    none of these creates or removes a newline, so the lines pair up with the text's."""
    low = text.lower()
    if not low.isascii():
        if any(space in low for space in _UNICODE_SPACES):
            low = _UNICODE_SPACE.sub(" ", low)
        low = (_DIGIT if _ASTRAL.search(low) else _BMP_DIGIT).sub("0", low)   # ASCII digits: translate
    data = low.encode("utf-8", "surrogatepass").translate(_ASCII)
    while b"  " in data:
        data = data.replace(b"  ", b" ")
    return data.replace(b" \n", b"\n").replace(b"\n ", b"\n").strip(b" ").split(b"\n")


def normalize_line(line: str) -> str:
    """One line as it is compared: lower case, digits -> 0, whitespace collapsed and stripped."""
    return b" ".join(normalized_lines(line)).decode("utf-8", "surrogatepass").strip()


def hash_line(line: str) -> int:
    """The 64-bit hash of one (raw) line."""
    return _hash(normalize_line(line).encode("utf-8", "surrogatepass"))


def line_hashes(text: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The text's lines (``text.split("\\n")``), a uint64 hash per line and a mask of the non-blank lines
    (a blank line's hash means nothing)."""
    lines = text.split("\n")
    normalized = normalized_lines(text)
    if len(normalized) != len(lines):      # cannot happen (see normalized_lines); never silently misalign
        raise AssertionError(f"line normalisation changed the number of lines ({len(lines)} -> {len(normalized)})")
    n = len(lines)
    hashes = np.fromiter(map(_hash, normalized), dtype=np.uint64, count=n)
    nonblank = np.fromiter(map(len, normalized), dtype=np.int64, count=n) > 0
    return lines, hashes, nonblank


def document_line_hashes(text: str) -> np.ndarray:
    """The document's distinct non-blank line hashes, sorted: its one vote per line."""
    _, hashes, nonblank = line_hashes(text)
    return np.unique(hashes[nonblank])


def is_frequent(hashes: np.ndarray, frequent: Collection[int] | np.ndarray) -> np.ndarray:
    """Which ``hashes`` are in ``frequent``: a sorted uint64 array (binary search) or a set of ints."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    if isinstance(frequent, np.ndarray):
        if len(frequent) == 0 or len(hashes) == 0:
            return np.zeros(len(hashes), dtype=bool)
        at = np.searchsorted(frequent, hashes)
        return frequent[np.minimum(at, len(frequent) - 1)] == hashes
    return np.fromiter((int(h) in frequent for h in hashes.tolist()), dtype=bool, count=len(hashes))


def drop_lines(text: str, lines: list[str], remove: np.ndarray) -> tuple[str, int, int]:
    """``text`` without the lines flagged in ``remove`` (each with one newline): (new text, lines removed,
    UTF-8 bytes removed). The other lines keep their order and their bytes."""
    removed = int(np.count_nonzero(remove))
    if removed == 0:
        return text, 0, 0
    kept = "\n".join(line for line, gone in zip(lines, remove.tolist()) if not gone)
    return kept, removed, utf8_len(text) - utf8_len(kept)


def remove_lines(text: str, frequent: Collection[int] | np.ndarray) -> tuple[str, int, int]:
    """``text`` without its lines whose hash is in ``frequent`` (a set of ints or a sorted uint64 array):
    (new text, lines removed, bytes removed). Blank lines are never removed."""
    lines, hashes, nonblank = line_hashes(text)
    remove = np.zeros(len(lines), dtype=bool)
    remove[nonblank] = is_frequent(hashes[nonblank], frequent)
    return drop_lines(text, lines, remove)


def count_words(text: str, limit: int | None = None) -> int:
    """Words in a text: runs of word characters, each Han/kana/Thai/... character one word; counting stops
    at ``limit`` (enough to compare with a minimum)."""
    n = 0
    for n, _ in enumerate(_WORDS.finditer(text), start=1):
        if limit is not None and n >= limit:
            break
    return n


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def count_bucket(counts: np.ndarray) -> dict[str, int]:
    """A histogram of document counts: 1, 2, 3 exactly, then powers of two (``4-7``, ``8-15``, ...)."""
    counts = np.asarray(counts, dtype=np.int64)
    out: dict[str, int] = {}
    for value in (1, 2, 3):
        n = int(np.count_nonzero(counts == value))
        if n:
            out[str(value)] = n
    big = counts[counts >= 4]
    if len(big):
        bits = np.floor(np.log2(big.astype(np.float64))).astype(np.int64)
        for b, n in zip(*np.unique(bits, return_counts=True)):
            low = 1 << int(b)
            out[f"{low}-{2 * low - 1}"] = int(n)
    return out


def merge_buckets(histograms: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for h in histograms:
        for key, n in h.items():
            total[key] = total.get(key, 0) + n
    return dict(sorted(total.items(), key=lambda kv: int(kv[0].split("-")[0])))
