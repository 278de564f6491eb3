"""n-gram decontamination against evaluation sets: the index, the matching, the decision (pure logic).

**Words.** A text's words are datatrove's normalised words (``datatrove.utils.text.simplify_text``, which
its ``NGramsDecontFilter`` uses), in its order: lower case, every number ``0`` (``norm_numbers``; a decimal
such as ``3.14`` is one number), the punctuation it removes (``datatrove.utils.text.PUNCTUATION``: ASCII,
CJK and typographic punctuation, C0/C1 controls; not its wider ``TERMINAL_PUNCTUATION``) turned into spaces,
NFD with combining marks removed, split on whitespace. ``normalize`` runs these steps as Arrow kernels over
a whole batch of texts (RE2, utf8proc): the words equal ``simplify_text(text).split()`` on every one of the
bench's 1,028 real documents (web pages in seven languages, books, code) except for Greek, where Arrow's
lower case has no final sigma (``ς`` -> ``σ``). For offsets, a text with a hit is tokenised again with
Python's ``re`` (``TOKEN_RE``: runs of neither whitespace nor that punctuation, decimal numbers whole) and
each token normalised by the same kernels: the same words, now with their character spans. Where datatrove
splits with spaCy's English tokenizer we do not: spaCy also splits its exceptions (``cannot`` -> ``can
not``, ``id`` -> ``i d``, ``wont``), a leading ``‘`` and unit suffixes (``0m``), so about half of real
documents get a few words that differ (bench/decontamination.py counts them); within one system the same
text always gives the same words, which is what matching needs.

**Code** gets the same treatment: operators, brackets, quotes, ``_`` and indentation are punctuation or
whitespace, so a code n-gram is 13 consecutive identifier pieces, keywords, number placeholders and words of
strings and comments (``has_close_elements(numbers, 0.5)`` -> ``has close elements numbers 0``).
Reformatting, re-indenting, changed quotes or literals do not hide a copied solution; renamed identifiers
do.

**Hashes.** Each distinct word is hashed with xxh3-64 (deterministic across processes and machines, unlike
``hash()``; cached per process); an n-gram's hash is the polynomial ``sum(w_i * P^(n-1-i)) mod 2^64`` of its
words' hashes, finished with splitmix64's mixer, computed for all positions of a document at once with numpy
(n vector operations). Not datatrove's hash (xxhash64 of the joined words), so the two indexes are not
interchangeable.

**The index** (``EvalIndex.build``): per benchmark, the n-grams of every item, where an item's text is its
configured fields joined by a newline (so n-grams spanning a prompt and its solution, or a question and its
answer, are indexed too: datatrove's "overlap" n-grams, plus its optional query n-grams). Left out, and
counted: items with fewer than n words (*skipped*, ``items_short``: a shorter n-gram would have to be looked
up at every length below n, and short items such as "(B)" or "18" match ordinary text); *uninformative*
n-grams, with fewer than ``MIN_DISTINCT_FRACTION * n`` distinct words besides the number placeholder
(datatrove's number normalisation makes every list of numbers in HumanEval's docstrings "0 0 0 ...", which
matched 26 of 542 real documents of the test corpus). Kept: every other n-gram, also those several items
share (a template such as MMLU's "Let's think step by step. We refer to Wikipedia articles on ...", or
HumanEval/56 and /61, equal once punctuation is gone): they count as matches; which items they name is
``BenchmarkIndex.items_of``'s rule. Stored: sorted unique hashes per benchmark (uint64) and sorted (hash,
item) pairs; a union of all benchmarks' hashes is what clean documents are looked up in, behind a table of
2^k flags on the hashes' top bits (a gather; ``searchsorted`` only for the few flagged). A few MB for
thousands of items.

**Matching** (``EvalIndex.match_batch``, ``match`` for one text): the n-grams of a whole batch of texts are
computed at once (no n-gram across two texts) and looked up in the union; only a text with a hit is looked
at alone, with token offsets, per benchmark: n-grams matched (positions), items hit, and the matched
character spans: from the first word of a run of matched n-grams to the last word of its last one, where
n-grams less than n words apart are one run (what lies between, an inserted word or numbers the index leaves
out, is part of the same passage).

**Decisions** (``decide``): ``drop``: any match drops the document as ``contaminated:<benchmark>``, the
benchmark with most matched n-grams (ties: the first name). ``remove_spans``: every matched span, widened
by ``span_margin_chars`` on each side and then outwards to whitespace, is cut out; the pieces left are
joined by a newline; fewer than ``min_words_left`` whitespace-separated words left drops the document the
same way.
"""

from __future__ import annotations

import bisect
import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import DecontaminationConfig

REASON_PREFIX = "contaminated:"
NUMBER_WORD = "0"                      # what every number becomes (datatrove's norm_numbers)
# An indexed n-gram needs at least this fraction of n distinct words other than NUMBER_WORD: n-grams like
# "0 0 0 ... 0" (a list of numbers in a docstring) or "a 0 a 0 b 0 b 0 ..." are not evidence of anything.
MIN_DISTINCT_FRACTION = 0.5
_DECIMAL_SEPARATORS = ".,،٫⎖⎗⎘"   # datatrove's NUMBERS_PATTERN: digits, optionally one separator and digits


def _punctuation() -> list[str]:
    from datatrove.utils.text import PUNCTUATION  # what simplify_text removes (not its TERMINAL_PUNCTUATION)

    return sorted(set(PUNCTUATION))


_PUNCT = _punctuation()
_SEPS = re.escape(_DECIMAL_SEPARATORS)
# Tokens with offsets (Python's re): a decimal number whole, else neither whitespace nor punctuation.
TOKEN_RE = re.compile(rf"(?:\d+[{_SEPS}]\d+|[^\s{''.join(map(re.escape, _PUNCT))}])+")
# The same normalisation for Arrow's RE2, on whole texts. Punctuation and whitespace (Python's, as
# ``str.split`` and datatrove's ``\s`` have it; all below U+3001) become one space, and words are split on
# that space: pyarrow 26's ``utf8_split_whitespace`` sometimes keeps a trailing space in the last word of
# its buffer, so it is not used.
_SEPARATORS = sorted({ord(c) for c in _PUNCT} | {c for c in range(0x3001) if chr(c).isspace()})
_RE2_SEPARATORS = "[" + "".join(f"\\x{{{c:x}}}" for c in _SEPARATORS) + "]+"
_RE2_NUMBER = r"\p{Nd}+(?:[" + "".join(f"\\x{{{ord(c):x}}}" for c in _DECIMAL_SEPARATORS) + r"]\p{Nd}+)?"
_SPACE_RE = re.compile(r"\S+")

_POLY = np.uint64(0x9E3779B97F4A7C15)       # odd multiplier of the polynomial n-gram hash
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_EMPTY = 0                                   # the hash of the empty word (none)
_WORD_CACHE_MAX = 500_000                    # about 50 MB of words per worker process


def _as_array(texts: Any) -> pa.Array:
    if isinstance(texts, pa.ChunkedArray):
        return texts.combine_chunks()
    return texts if isinstance(texts, pa.Array) else pa.array(list(texts), pa.large_string())


def normalize(texts: Any) -> pa.Array:
    """datatrove's ``simplify_text`` on every text at once, in Arrow kernels, in its order: lower case, numbers
    -> "0", punctuation and whitespace -> one space, NFD, combining marks removed."""
    a = pc.utf8_lower(_as_array(texts))
    a = pc.replace_substring_regex(a, _RE2_NUMBER, NUMBER_WORD)
    a = pc.replace_substring_regex(a, _RE2_SEPARATORS, " ")
    if pc.all(pc.string_is_ascii(a)).as_py() is not False:   # nothing to decompose (or no text at all)
        return a
    return pc.replace_substring_regex(pc.utf8_normalize(a, form="NFD"), r"\p{Mn}", "")


def _split(norm: pa.Array) -> pa.Array:
    """Lists of words ("" at the ends, or where only combining marks were) of normalised texts."""
    return pc.split_pattern(norm, " ")


def word_lists(texts: Any) -> list[list[str]]:
    """Each text's words (the index's items, tests)."""
    return [[w for w in ws if w] for ws in _split(normalize(texts)).to_pylist()]


def bulk_words(text: str) -> list[str]:
    return word_lists([text])[0]


def tokens(text: str) -> tuple[list[str], np.ndarray]:
    """The raw tokens of a text and their character spans [start, end) (an (n, 2) int64 array)."""
    found = list(TOKEN_RE.finditer(text))
    return [m.group() for m in found], np.array([m.span() for m in found], dtype=np.int64).reshape(-1, 2)


def token_words(raw: list[str]) -> list[str]:
    """Each raw token's word ("" where none is left)."""
    return normalize(pa.array(raw, pa.large_string())).to_pylist() if raw else []


def words(text: str) -> list[str]:
    """The words of a text token by token, the ones the spans refer to (equal to ``bulk_words``)."""
    return [w for w in token_words(tokens(text)[0]) if w]


class _WordHashes(dict):
    """word -> its xxh3-64 (``_EMPTY`` for ""); a per-process cache, cleared when large."""

    def __missing__(self, word: str) -> int:
        import xxhash

        value = (xxhash.xxh3_64_intdigest(word) or 1) if word else _EMPTY
        if len(self) >= _WORD_CACHE_MAX:
            self.clear()
        self[word] = value
        return value


_WORD_HASHES = _WordHashes()


def token_hashes(word_list: list[str]) -> np.ndarray:
    """uint64 hashes of words, ``_EMPTY`` for ""."""
    return np.fromiter(map(_WORD_HASHES.__getitem__, word_list), dtype=np.uint64, count=len(word_list))


def batch_word_hashes(texts: Any) -> tuple[np.ndarray, np.ndarray]:
    """The hashes of all words of a batch of texts, concatenated, and each text's offsets into them (len + 1):
    one pass of Arrow kernels over the batch; words hashed once per distinct word (``dictionary_encode``)."""
    lists = _split(normalize(texts))
    lengths = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False)
    offsets = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)))
    flat = pc.list_flatten(lists)
    if not len(flat):
        return np.empty(0, dtype=np.uint64), offsets
    encoded = pc.dictionary_encode(flat)
    hashes = token_hashes(encoded.dictionary.to_pylist())[encoded.indices.to_numpy(zero_copy_only=False)]
    keep = hashes != _EMPTY   # "" where a text starts or ends with a separator
    if not keep.all():
        offsets = np.concatenate(([0], np.cumsum(keep, dtype=np.int64)))[offsets]
        hashes = hashes[keep]
    return hashes, offsets


def ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """The hash of every n consecutive words (``len - n + 1`` of them; none for fewer than n words)."""
    count = len(word_hashes) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = word_hashes[:count].copy()
        for i in range(1, n):
            h *= _POLY
            h += word_hashes[i:i + count]
        h ^= h >> np.uint64(30)
        h *= _MIX1
        h ^= h >> np.uint64(27)
        h *= _MIX2
        h ^= h >> np.uint64(31)
    return h


def batch_ngram_hashes(word_hashes: np.ndarray, offsets: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n-gram hashes of a batch (no n-gram across two texts) and the text of each."""
    grams = ngram_hashes(word_hashes, n)
    if not len(grams):
        return grams, np.empty(0, dtype=np.int64)
    starts = np.arange(len(grams))
    text = np.searchsorted(offsets, starts, side="right") - 1
    valid = starts + n <= offsets[text + 1]
    return grams[valid], text[valid]


def informative(word_list: list[str], n: int) -> np.ndarray:
    """Per n-gram of ``word_list``: whether it has enough distinct words besides numbers to be indexed."""
    if len(word_list) < n:
        return np.zeros(0, dtype=bool)
    ids: dict[str, int] = {}
    codes = np.array([-1 if w == NUMBER_WORD else ids.setdefault(w, len(ids)) for w in word_list], dtype=np.int64)
    windows = np.sort(np.lib.stride_tricks.sliding_window_view(codes, n), axis=1)
    distinct = 1 + (np.diff(windows, axis=1) != 0).sum(axis=1) - (windows[:, 0] == -1)
    return distinct >= int(np.ceil(MIN_DISTINCT_FRACTION * n))


# --------------------------------------------------------------------------------------------- items
def _records(path: Path) -> list[dict[str, Any]]:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: an evaluation set must be .jsonl, .jsonl.gz or .parquet")


def load_items(paths: list[str], fields: list[str]) -> list[tuple[str, str]]:
    """(item id, text) of every record: the id is the record's ``id`` or ``task_id``, else ``<file>:<row>``;
    the text is the configured fields present, joined by a newline."""
    items = []
    for raw in paths:
        path = Path(raw)
        records = _records(path)
        if records and not any(f in rec for rec in records for f in fields):
            raise ValueError(f"{path}: none of the fields {fields} in any record")
        for row, rec in enumerate(records):
            item_id = rec.get("id", rec.get("task_id"))
            item_id = str(item_id) if item_id is not None else f"{path.name}:{row}"
            text = "\n".join(str(rec[f]) for f in fields if rec.get(f) is not None)
            items.append((item_id, text))
    return items


# --------------------------------------------------------------------------------------------- index
@dataclass
class BenchmarkIndex:
    name: str
    item_ids: list[str]
    unique: np.ndarray            # sorted unique n-gram hashes (uint64)
    pair_hashes: np.ndarray       # sorted (hash, item) pairs: the hash column...
    pair_items: np.ndarray        # ...and the item column (int32 indexes into item_ids)
    items_short: int              # items with fewer than n words: not indexed
    items_uninformative: int = 0  # items of n words or more with no informative n-gram: not indexed
    ngrams_uninformative: int = 0  # n-gram positions left out (``informative``)
    ngrams_shared: int = 0        # indexed n-grams of several items

    @property
    def items(self) -> int:
        return len(self.item_ids)

    @property
    def items_indexed(self) -> int:
        return self.items - self.items_short - self.items_uninformative

    def items_of(self, hashes: np.ndarray) -> list[int]:
        """The items matched n-grams name, in the benchmark's order. An n-gram of one item names it; one shared
        by several items (a template, or items equal once normalised) names those of them that n-grams of
        their own already name, or, when none is, all of them."""
        lo = np.searchsorted(self.pair_hashes, hashes, side="left")
        hi = np.searchsorted(self.pair_hashes, hashes, side="right")
        own = hi - lo == 1
        found = set(self.pair_items[lo[own]].tolist())
        for a, b in zip(lo[~own].tolist(), hi[~own].tolist()):
            owners = set(self.pair_items[a:b].tolist())
            found |= owners & found or owners
        return sorted(found)


@dataclass
class BenchmarkMatch:
    ngrams: int                                   # matched n-gram positions in the document
    items: list[str]                              # ids of the items they come from, in the benchmark's order
    spans: list[tuple[int, int]]                  # matched character spans [start, end), merged, sorted


@dataclass
class EvalIndex:
    ngram: int
    benchmarks: dict[str, BenchmarkIndex] = field(default_factory=dict)
    union: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))
    build_seconds: float = 0.0

    @classmethod
    def build(cls, cfg: DecontaminationConfig) -> EvalIndex:
        import time

        started = time.perf_counter()
        index = cls(ngram=cfg.ngram)
        for name in sorted(cfg.benchmarks):
            spec = cfg.benchmarks[name]
            index.benchmarks[name] = _build_benchmark(name, load_items(spec.paths, spec.fields), cfg.ngram)
        if index.benchmarks:
            index.union = np.unique(np.concatenate([b.unique for b in index.benchmarks.values()]))
        index.build_seconds = time.perf_counter() - started
        return index

    @property
    def nbytes(self) -> int:
        return int(self.union.nbytes + sum(b.unique.nbytes + b.pair_hashes.nbytes + b.pair_items.nbytes
                                           for b in self.benchmarks.values()))

    def describe(self) -> dict[str, dict[str, int]]:
        return {name: {"items": b.items, "items_indexed": b.items_indexed, "items_short": b.items_short,
                       "items_uninformative": b.items_uninformative, "ngrams": int(len(b.unique)),
                       "ngrams_uninformative": b.ngrams_uninformative, "ngrams_shared": b.ngrams_shared}
                for name, b in self.benchmarks.items()}

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_filter"}   # rebuilt where it is used

    def _prefilter(self) -> tuple[np.ndarray, np.uint64]:
        """A table of 2^k flags, one per value of a hash's top k bits, set where an indexed hash has them (about
        1 in 64 set): a gather per n-gram answers most lookups, ``searchsorted`` only the rest."""
        cached = self.__dict__.get("_filter")
        if cached is None:
            bits = int(min(24, max(12, np.ceil(np.log2(max(len(self.union), 1))) + 6)))
            shift = np.uint64(64 - bits)
            table = np.zeros(1 << bits, dtype=bool)
            table[(self.union >> shift).astype(np.intp)] = True
            cached = self.__dict__["_filter"] = (table, shift)
        return cached

    def _hits(self, grams: np.ndarray) -> np.ndarray:
        """Positions of ``grams`` found in the union of all benchmarks."""
        if not len(grams) or not len(self.union):
            return np.empty(0, dtype=np.int64)
        table, shift = self._prefilter()
        maybe = np.flatnonzero(table[(grams >> shift).astype(np.intp)])
        if not len(maybe):
            return maybe
        pos = np.searchsorted(self.union, grams[maybe])
        np.minimum(pos, len(self.union) - 1, out=pos)
        return maybe[self.union[pos] == grams[maybe]]

    def match_batch(self, texts: Any) -> list[dict[str, BenchmarkMatch]]:
        """``match`` for every text of a batch (a list or an Arrow string array): the batch's n-grams are looked
        up at once; only the texts with a hit are looked at one by one."""
        texts = _as_array(texts)
        out: list[dict[str, BenchmarkMatch]] = [{} for _ in range(len(texts))]
        if not len(self.union) or not len(texts):
            return out
        grams, owner = batch_ngram_hashes(*batch_word_hashes(texts), self.ngram)
        for k in np.unique(owner[self._hits(grams)]).tolist():
            out[k] = self._details(texts[k].as_py())
        return out

    def match(self, text: str) -> dict[str, BenchmarkMatch]:
        """Per benchmark with at least one matched n-gram: n-grams, items, spans. Empty for a clean text."""
        return self.match_batch([text])[0]

    def _details(self, text: str) -> dict[str, BenchmarkMatch]:
        """A text with a hit, again token by token with the tokens' offsets; what they match is the answer."""
        n = self.ngram
        raw, bounds = tokens(text)
        hashes = token_hashes(token_words(raw))
        present = hashes != _EMPTY
        grams = ngram_hashes(hashes[present], n)
        bounds = bounds[present]
        hit = self._hits(grams)
        out = {}
        for name, bench in self.benchmarks.items():
            if not len(hit) or not len(bench.unique):
                continue
            candidates = grams[hit]
            where = np.minimum(np.searchsorted(bench.unique, candidates), len(bench.unique) - 1)
            mine = bench.unique[where] == candidates
            if not mine.any():
                continue
            positions = hit[mine]
            items = [bench.item_ids[i] for i in bench.items_of(candidates[mine])]
            # runs of matched n-grams less than n words apart make one span: the words between them (an inserted
            # word, numbers the index leaves out) belong to the same passage
            breaks = np.flatnonzero(np.diff(positions) >= 2 * n) + 1
            first = positions[np.concatenate(([0], breaks))]
            last = positions[np.concatenate((breaks - 1, [len(positions) - 1]))]
            spans = list(zip(bounds[first, 0].tolist(), bounds[last + n - 1, 1].tolist()))
            out[name] = BenchmarkMatch(ngrams=len(positions), items=items, spans=spans)
        return out


def _build_benchmark(name: str, items: list[tuple[str, str]], n: int) -> BenchmarkIndex:
    chunks, owners, short, uninformative, dropped = [], [], 0, 0, 0
    for k, item_words in enumerate(word_lists([text for _, text in items])):
        if len(item_words) < n:
            short += 1
            continue
        grams = ngram_hashes(token_hashes(item_words), n)
        keep = informative(item_words, n)
        dropped += int((~keep).sum())
        grams = np.unique(grams[keep])
        if not len(grams):
            uninformative += 1
            continue
        chunks.append(grams)
        owners.append(np.full(len(grams), k, dtype=np.int32))
    hashes = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.uint64)
    owner = np.concatenate(owners) if owners else np.empty(0, dtype=np.int32)
    order = np.lexsort((owner, hashes))
    hashes, owner = hashes[order], owner[order]   # per item the hashes are unique: so are the pairs
    unique, counts = np.unique(hashes, return_counts=True)
    return BenchmarkIndex(name=name, item_ids=[item_id for item_id, _ in items], unique=unique,
                          pair_hashes=hashes, pair_items=owner, items_short=short,
                          items_uninformative=uninformative, ngrams_uninformative=dropped,
                          ngrams_shared=int((counts > 1).sum()))


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


# ------------------------------------------------------------------------------------------ decisions
def top_benchmark(matches: dict[str, BenchmarkMatch]) -> str:
    """The benchmark with most matched n-grams; ties go to the first name."""
    return min(matches, key=lambda name: (-matches[name].ngrams, name))


def cut_spans(text: str, spans: list[tuple[int, int]], margin: int) -> tuple[str, list[tuple[int, int]]]:
    """``text`` without ``spans``, each widened by ``margin`` characters and then outwards to whitespace
    (no word is cut in two); the pieces left joined by a newline. Returns (text, the cut intervals)."""
    if not spans:
        return text, []
    chunks = [m.span() for m in _SPACE_RE.finditer(text)]
    starts = [a for a, _ in chunks]
    ends = [b for _, b in chunks]
    cuts = []
    for start, end in spans:
        lo, hi = max(0, start - margin), min(len(text), end + margin)
        i = bisect.bisect_right(ends, lo)          # the first chunk ending after lo: lo inside it -> its start
        if i < len(chunks) and starts[i] < lo:
            lo = starts[i]
        j = bisect.bisect_left(starts, hi) - 1     # the last chunk starting before hi: hi inside it -> its end
        if j >= 0 and ends[j] > hi:
            hi = ends[j]
        cuts.append((lo, hi))
    cuts = _merge(cuts)
    pieces, prev = [], 0
    for lo, hi in cuts:
        pieces.append(text[prev:lo])
        prev = hi
    pieces.append(text[prev:])
    return "\n".join(p for p in pieces if p.strip()), cuts


@dataclass
class Decision:
    matches: dict[str, BenchmarkMatch]
    reason: str | None = None         # contaminated:<benchmark> when dropped
    text: str | None = None           # remove_spans, kept: the text without the spans
    cuts: list[tuple[int, int]] = field(default_factory=list)

    @property
    def dropped(self) -> bool:
        return self.reason is not None


def decide(index: EvalIndex, cfg: DecontaminationConfig, text: str,
           matches: dict[str, BenchmarkMatch] | None = None) -> Decision:
    """Apply the configured mode to a text and its matches (``index.match(text)`` unless given); ``matches``
    is empty for a clean text."""
    matches = index.match(text) if matches is None else matches
    if not matches:
        return Decision(matches)
    reason = REASON_PREFIX + top_benchmark(matches)
    if cfg.mode == "drop":
        return Decision(matches, reason=reason)
    spans = _merge([span for m in matches.values() for span in m.spans])
    kept, cuts = cut_spans(text, spans, cfg.span_margin_chars)
    if len(kept.split()) < cfg.min_words_left:
        return Decision(matches, reason=reason, cuts=cuts)
    return Decision(matches, text=kept, cuts=cuts)
