"""Training data from the pipeline's shards: per-source token streams, a weighted mixture, packed windows.

Only ``pipeline.shards`` is imported from the pipeline (pyarrow + numpy): shards are memory-mapped and
windows are sliced out of them without copying until the batch is built.

* Each source (``manifest.totals``: web / book / code sources of one or more runs) is one token stream: its
  documents in manifest order, each ending with EOS. It is cut into non-overlapping windows of
  ``seq_len + 1`` tokens (inputs are the first ``seq_len``, targets the last ``seq_len``).
* The mixture is exact per block of ``M`` global samples (``block``, default 2^16): every block holds
  ``m_s`` samples of source ``s``, the largest-remainder apportionment of the weights to ``M`` (default
  weights: proportional to each source's tokens; a source shorter than one window is then skipped with a
  warning). Global sample ``i`` is position ``q = i mod M`` of block ``j = i // M``; a keyed permutation of
  ``[0, M)`` (keyed by ``(data.seed, j)``) sends it to slot ``p`` of the layout
  ``[source 0's m_0 slots | source 1's m_1 slots | ...]``. Slot ``o`` of source ``s`` makes the sample that
  source's draw ``k = j * m_s + o``; draw ``k`` is window ``perm_{s,e}(k mod n_s)`` of epoch
  ``e = k // n_s``, ``perm_{s,e}`` a keyed permutation of the source's ``n_s`` windows (keyed by
  ``(data.seed, source name, e)``). So draws ``0 .. n_s - 1`` of a source visit each of its windows once.
* Both permutations are ``permute``: a Feistel network over the next power of two with cycle-walking,
  evaluated per element and never materialised. Sample ``i``'s source and window therefore cost O(1) to
  compute from ``i`` alone: a rank computes only its own samples, at any point of training.
* The sampler's whole state is the number of global samples drawn, saved in checkpoints, so a resumed run
  continues with the next unseen sample. Data-parallel rank ``r`` of ``w`` takes global samples
  ``r, r + w, r + 2w, ...``: the union over ranks is the same global sequence for any world size.
* Shards stay memory-mapped only while among the ``max_open_shards`` most recently read (default 64): one
  map per shard, and Linux allows a process 65,530 maps (``vm.max_map_count``).
* Document boundaries: ``segment[t]`` counts the EOS tokens before position ``t`` in the window, so the model
  can confine attention (and, in the pure path, Mamba state) to each document. In ``pack: boundaries`` mode
  the target that crosses a boundary (predicting the next document's first token from an EOS) is ignored.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline.shards import Manifest, ShardReader


class DataError(ValueError):
    """A data problem found before training starts (missing shards, vocabulary mismatch, ...)."""


# ------------------------------------------------------------------------------------- keyed permutations
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_ROUNDS = 6   # each round is a bijection; 6 rather than Luby-Rackoff's 4 because the halves may be unequal
_ROUND_CONSTANTS = [np.uint64((r + 1) * _GOLDEN & _MASK64) for r in range(_ROUNDS)]
_ONE = np.uint64(1)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping): a bijection whose every output bit depends on
    every input bit, the Feistel round function."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def derive_key(*parts: object) -> int:
    """A 64-bit key from any printable parts (seed, purpose, source name, ...)."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def _feistel(x: np.ndarray, bits: np.ndarray, round_keys: list[np.ndarray]) -> np.ndarray:
    """One pass of a bijection of ``[0, 2**bits)``: each round XORs a keyed function of the low
    ``bits // 2`` bits into the high part, then rotates so the freshly mixed part is read next round."""
    lo_bits = bits >> _ONE
    hi_bits = bits - lo_bits
    lo_mask = (_ONE << lo_bits) - _ONE
    hi_mask = (_ONE << hi_bits) - _ONE
    for key in round_keys:
        lo, hi = x & lo_mask, x >> lo_bits
        hi = hi ^ (_mix64(lo ^ key) & hi_mask)
        x = (lo << hi_bits) | hi
    return x


def permute(index: np.ndarray | int, n: np.ndarray | int, key: np.ndarray | int) -> np.ndarray:
    """Element ``index`` of a pseudorandom permutation of ``[0, n)`` chosen by the 64-bit ``key``.

    Elementwise over broadcast arrays (each element its own ``n`` and ``key``). The Feistel pass permutes
    ``[0, 2**b)`` with ``2**b >= n``; a result ``>= n`` is fed back in until it lands below ``n``
    (cycle-walking: the walk follows the cycle of the big permutation that holds ``index``, so the map
    restricted to ``[0, n)`` stays a bijection). ``2**b <= 2n`` (for n up to 2^53; ``< 4n`` above), so on
    average at most two passes.
    """
    index, n, key = (np.atleast_1d(np.asarray(a, dtype=np.uint64)) for a in (index, n, key))
    index, n, key = np.broadcast_arrays(index, n, key)
    if (n == 0).any() or (n > np.uint64(1 << 62)).any():
        raise ValueError("permute: n must be in [1, 2**62]")
    if (index >= n).any():
        raise ValueError("permute: index out of range")
    # exponent of float(n - 1) >= its bit length (floats round up to, never below, a power of two)
    bits = np.maximum(np.frexp((n - _ONE).astype(np.float64))[1], 1).astype(np.uint64)
    # the key is already well mixed (a blake2b or _mix64 output): offsetting it per round is enough, as
    # the round function mixes its input again
    round_keys = [key + c for c in _ROUND_CONSTANTS]
    y = _feistel(index, bits, round_keys)
    walking = np.flatnonzero(y >= n)
    while walking.size:
        y[walking] = _feistel(y[walking], bits[walking], [k[walking] for k in round_keys])
        walking = walking[y[walking] >= n[walking]]
    return y


# ----------------------------------------------------------------------------------- streams and shards
class ShardReaders:
    """The shards open for reading, at most ``capacity``: the least recently read is closed (unmapped) when
    another must open. Each open shard is one memory map; a process may hold 65,530 (vm.max_map_count)."""

    def __init__(self, capacity: int = 64):
        if capacity < 1:
            raise ValueError("max_open_shards must be at least 1")
        self.capacity = capacity
        self._open: OrderedDict[Path, ShardReader] = OrderedDict()
        self.opened = 0   # shards opened so far (a reread after eviction counts again)

    def get(self, path: Path) -> ShardReader:
        reader = self._open.get(path)
        if reader is not None:
            self._open.move_to_end(path)
            return reader
        while len(self._open) >= self.capacity:
            _, old = self._open.popitem(last=False)
            old.close()
        reader = self._open[path] = ShardReader(path)
        self.opened += 1
        return reader

    def __len__(self) -> int:
        return len(self._open)

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()


class SourceStream:
    """One source's tokens: its record batches ("pieces") back to back, ``repeat`` times over.

    The index is numpy arrays built once: piece ``i`` is record batch ``piece_batch[i]`` of
    ``files[piece_file[i]]`` and starts at token ``piece_start[i]`` of one copy. ``repeat > 1`` expresses a
    stream that is its pieces ``repeat`` times in a row without an index ``repeat`` times as long (the loader
    benchmark uses it to stand in for sources of 10^12 tokens); reads take the same path either way.
    """

    def __init__(self, name: str, kind: str, files: list[Path], piece_file: np.ndarray, piece_batch: np.ndarray,
                 piece_tokens: np.ndarray, repeat: int = 1, readers: ShardReaders | None = None):
        if not len(files) or not len(piece_tokens) or (np.asarray(piece_tokens) <= 0).any() or repeat < 1:
            raise ValueError(f"{name}: a stream needs pieces of at least one token and repeat >= 1")
        self.name, self.kind, self.files, self.repeat = name, kind, list(files), repeat
        self.piece_file = np.asarray(piece_file, dtype=np.int32)
        self.piece_batch = np.asarray(piece_batch, dtype=np.int32)
        self.piece_start = np.zeros(len(piece_tokens) + 1, dtype=np.int64)
        np.cumsum(np.asarray(piece_tokens, dtype=np.int64), out=self.piece_start[1:])
        self.period = int(self.piece_start[-1])   # tokens in one copy
        self.tokens = self.period * repeat
        self.readers = readers if readers is not None else ShardReaders()
        self._dtype: np.dtype | None = None

    def __repr__(self) -> str:
        return (f"SourceStream({self.name!r}, {self.kind!r}, {len(self.piece_batch)} pieces in {len(self.files)} "
                f"files, {self.tokens:,} tokens)")

    def repeated(self, times: int) -> SourceStream:
        """This stream ``times`` times over (sharing the open shards)."""
        return SourceStream(self.name, self.kind, self.files, self.piece_file, self.piece_batch,
                            np.diff(self.piece_start), self.repeat * times, self.readers)

    def _piece_tokens(self, i: int) -> np.ndarray:
        reader = self.readers.get(self.files[self.piece_file[i]])
        return reader.batch_tokens(int(self.piece_batch[i]))[0]

    def read_into(self, start: int, out: np.ndarray) -> None:
        """Copy tokens ``[start, start + len(out))`` of the stream into ``out`` (any integer dtype)."""
        length = len(out)
        if start < 0 or start + length > self.tokens:
            raise IndexError(f"{self.name}: tokens [{start}, {start + length}) outside [0, {self.tokens})")
        pos = start % self.period
        i = int(np.searchsorted(self.piece_start, pos, side="right")) - 1
        offset, done, pieces = pos - int(self.piece_start[i]), 0, len(self.piece_batch)
        while done < length:
            flat = self._piece_tokens(i)
            take = min(length - done, len(flat) - offset)
            out[done:done + take] = flat[offset:offset + take]
            done += take
            offset, i = 0, (i + 1) % pieces   # past the last piece: the next copy's first

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream (a copy in the shards' token dtype)."""
        if self._dtype is None:
            self._dtype = self._piece_tokens(0).dtype
        out = np.empty(length, dtype=self._dtype)
        self.read_into(start, out)
        return out


def load_streams(run_dirs: list[str | Path], model_vocab: int, sources: dict[str, float] | None = None,
                 max_open_shards: int = 64) -> tuple[dict[str, SourceStream], dict]:
    """Index the token streams of every source in the given pipeline runs (no token data is read).

    All streams share one ``ShardReaders`` of ``max_open_shards`` (a shard holds several sources)."""
    index: dict[str, tuple[str, dict[Path, int], list[int], list[int], list[int]]] = {}
    tokenizer: dict | None = None
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        try:
            manifest = Manifest.load(run_dir)
        except FileNotFoundError:
            raise DataError(f"{run_dir}: no manifest.json (not a finished pipeline run)") from None
        tok = manifest.tokenizer
        if tok["vocab_size"] > model_vocab:
            raise DataError(f"{run_dir}: shards use a tokenizer with vocab {tok['vocab_size']:,} but the model's "
                            f"vocab_size is {model_vocab:,}")
        if tokenizer is not None and tok["fingerprint"] != tokenizer["fingerprint"]:
            raise DataError(f"{run_dir}: tokenizer {tok['fingerprint']} differs from {tokenizer['fingerprint']} "
                            f"of the other runs; shards of different tokenizers cannot be mixed")
        tokenizer = tok
        for shard in manifest.shards:
            path = run_dir / shard.path
            if not path.exists():
                raise DataError(f"{path}: listed in {run_dir / 'manifest.json'} but missing")
            with ShardReader(path) as reader:
                for b, batch in enumerate(reader.batches()):
                    names = batch.column("source").to_pylist()
                    # a record batch holds one unit's documents, hence one source
                    name = names[0] if names else None
                    if name is None:
                        continue
                    if len(set(names)) != 1:
                        raise DataError(f"{path}: record batch {b} mixes sources")
                    tokens = int(batch.column("num_tokens").to_numpy(zero_copy_only=False).sum())
                    if tokens == 0:
                        continue
                    kind = batch.column("source_kind")[0].as_py()
                    _, files, piece_file, piece_batch, piece_tokens = index.setdefault(name, (kind, {}, [], [], []))
                    piece_file.append(files.setdefault(path, len(files)))
                    piece_batch.append(b)
                    piece_tokens.append(tokens)
    readers = ShardReaders(max_open_shards)
    streams = {name: SourceStream(name, kind, list(files), np.array(pf), np.array(pb), np.array(pt), readers=readers)
               for name, (kind, files, pf, pb, pt) in index.items()}
    if sources is not None:
        unknown = sorted(set(sources) - set(streams))
        if unknown:
            raise DataError(f"data.weights: no shards for source {unknown[0]!r} (have: {', '.join(sorted(streams))})")
        streams = {name: streams[name] for name in sources}
    if not streams:
        raise DataError("no tokens in the given runs")
    return streams, tokenizer or {}


# --------------------------------------------------------------------------------------------- mixture
@dataclass
class SamplerState:
    drawn: int = 0   # global samples taken so far (all ranks together); sample i depends on i alone


class Located(NamedTuple):
    source: np.ndarray   # index into ``MixtureSampler.names``
    draw: np.ndarray     # the sample is this source's draw number ``draw`` (uint64)
    window: np.ndarray   # window index within the source (uint64); its first token is window * window_len


def apportion(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers summing to ``total`` in the proportions of ``weights`` (largest remainder: each is its
    quota rounded down or up, the leftover going to the largest fractions; ties to the lower index)."""
    quotas = weights / weights.sum() * total
    counts = np.floor(quotas).astype(np.int64)
    leftover = total - int(counts.sum())
    order = np.argsort(-(quotas - counts), kind="stable")
    counts[order[:leftover]] += 1
    return counts


class MixtureSampler:
    """Deterministic mixture of windows, each global sample computed from its index alone (module docstring);
    ``state`` is everything needed to continue exactly."""

    def __init__(self, streams: dict[str, SourceStream], weights: dict[str, float] | None, seq_len: int,
                 seed: int, block: int = 1 << 16):
        if block < 1 or block & (block - 1) or block > 1 << 32:
            raise ValueError("block must be a power of two up to 2**32")   # no cycle-walking over [0, block)
        self.window_len = seq_len + 1
        too_small = sorted(n for n, s in streams.items() if s.tokens < self.window_len)
        if weights is not None:
            named = [n for n in too_small if weights.get(n, 0) > 0]
            if named:
                raise DataError(f"data.weights: source {named[0]!r} has fewer than seq_len + 1 = "
                                f"{self.window_len} tokens")
        elif too_small:
            logging.getLogger("train").warning("skipping sources shorter than one window (%d tokens): %s",
                                               self.window_len, ", ".join(too_small))
        self.streams = {n: s for n, s in streams.items() if n not in too_small}
        if not self.streams:
            raise DataError(f"no source has at least seq_len + 1 = {self.window_len} tokens")
        self.names = sorted(self.streams)
        self.n_windows = {n: self.streams[n].tokens // self.window_len for n in self.names}
        # default mixture: the natural one, proportional to each source's tokens
        raw = np.array([weights.get(n, 0.0) if weights is not None else float(self.streams[n].tokens)
                        for n in self.names], dtype=np.float64)
        if raw.sum() <= 0:
            raise DataError("data.weights: all zero")
        self.probs = raw / raw.sum()
        self.block = block
        slots = apportion(raw, block)
        starved = [n for n, w, m in zip(self.names, raw, slots) if w > 0 and m == 0]
        if starved:
            logging.getLogger("train").warning("weights below 1/%d get no samples: %s", block, ", ".join(starved))
        self.slots = dict(zip(self.names, slots.tolist()))   # samples of each source per block
        self._slot_end = np.cumsum(slots).astype(np.uint64)
        self._slot_start = self._slot_end - slots.astype(np.uint64)
        self._m = slots.astype(np.uint64)
        self._n = np.array([max(self.n_windows[n], 1) for n in self.names], dtype=np.uint64)
        self.seed = seed
        self._block_key = np.uint64(derive_key(seed, "mixture-blocks"))
        self._source_key = np.array([derive_key(seed, "windows", n) for n in self.names], dtype=np.uint64)
        self.state = SamplerState()

    def locate(self, index: np.ndarray | int) -> Located:
        """Source, draw and window of global samples ``index`` (array or int): O(1) each, state untouched."""
        i = np.atleast_1d(np.asarray(index, dtype=np.uint64))
        block, q = i // np.uint64(self.block), i % np.uint64(self.block)
        slot = permute(q, self.block, _mix64(self._block_key ^ _mix64(block)))
        source = np.searchsorted(self._slot_end, slot, side="right")
        draw = block * self._m[source] + (slot - self._slot_start[source])
        n = self._n[source]
        epoch, within = draw // n, draw % n
        window = permute(within, n, _mix64(self._source_key[source] ^ _mix64(epoch)))
        return Located(source, draw, window)

    def draw(self) -> tuple[str, int]:
        """Advance to the next global sample: (source, first token of its window); no token is read."""
        where = self.locate(self.state.drawn)
        self.state.drawn += 1
        return self.names[int(where.source[0])], int(where.window[0]) * self.window_len

    def next(self) -> tuple[str, np.ndarray]:
        """The next global sample: (source, ``seq_len + 1`` tokens)."""
        name, start = self.draw()
        return name, self.streams[name].window(start, self.window_len)


def segments_from_eos(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """segment[..., t] = number of EOS tokens strictly before t (along the last axis)."""
    segment = np.zeros(tokens.shape, dtype=np.int64)
    np.cumsum(tokens[..., :-1] == eos_id, axis=-1, out=segment[..., 1:])
    return segment


@dataclass
class Batch:
    input_ids: np.ndarray   # [b, seq_len] int64
    targets: np.ndarray     # [b, seq_len] int64, -100 = ignored
    segment: np.ndarray     # [b, seq_len] int64
    sources: list[str]


class RankLoader:
    """Micro-batches for one data-parallel rank: global samples r, r + w, ...; each rank computes only its
    own ``micro_batch`` samples per batch.

    With context parallelism (``cp_size`` > 1) ``rank`` and ``world`` are the data-parallel rank and size;
    the ``cp_size`` ranks of one replica read the same samples, pack them the same way (document ids and
    ignored targets are computed on the whole sequence) and each keeps its contiguous ``seq_len / cp_size``
    columns, ``cp_rank``-th."""

    def __init__(self, sampler: MixtureSampler, micro_batch: int, rank: int, world: int, eos_id: int,
                 pack: str = "boundaries", cp_rank: int = 0, cp_size: int = 1):
        if pack not in ("boundaries", "concat"):
            raise DataError(f"data.pack: must be 'boundaries' or 'concat', got {pack!r}")
        if (sampler.window_len - 1) % cp_size:
            raise DataError(f"parallel.cp_size: {cp_size} must divide data.seq_len {sampler.window_len - 1}")
        self.sampler, self.micro_batch, self.rank, self.world = sampler, micro_batch, rank, world
        self.eos_id, self.pack = eos_id, pack
        chunk = (sampler.window_len - 1) // cp_size
        self.columns = slice(cp_rank * chunk, (cp_rank + 1) * chunk)

    def next_batch(self) -> Batch:
        sampler = self.sampler
        first = sampler.state.drawn
        # every rank advances the shared state by the whole global batch, computing only its own rows
        sampler.state.drawn = first + self.world * self.micro_batch
        where = sampler.locate(first + self.rank + self.world * np.arange(self.micro_batch, dtype=np.uint64))
        windows = np.empty((self.micro_batch, sampler.window_len), dtype=np.int64)
        names = [sampler.names[s] for s in where.source.tolist()]
        for row, (name, w) in enumerate(zip(names, where.window.tolist())):
            sampler.streams[name].read_into(w * sampler.window_len, windows[row])
        inputs, targets = windows[:, :-1], windows[:, 1:].copy()
        if self.pack == "boundaries":
            segment = segments_from_eos(inputs, self.eos_id)
            targets[inputs == self.eos_id] = -100  # don't predict a new document from the previous one
        else:
            segment = np.zeros_like(inputs)
        cols = self.columns
        return Batch(np.ascontiguousarray(inputs[:, cols]), np.ascontiguousarray(targets[:, cols]),
                     np.ascontiguousarray(segment[:, cols]), names)
