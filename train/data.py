"""Training data from the pipeline's shards: per-source token streams, a weighted mixture, packed windows.

Only ``pipeline.shards`` is imported from the pipeline (pyarrow + numpy): shards are memory-mapped and
windows are sliced out of them without copying until the batch is built.

* Each source (``manifest.totals``: web / book / code sources of one or more runs) is one token stream: its
  documents in manifest order, each ending with EOS. It is cut into non-overlapping windows of
  ``seq_len + 1`` tokens (inputs are the first ``seq_len``, targets the last ``seq_len``).
* The mixture draws a source per sample with the configured weights (default: proportional to each
  source's tokens; a source shorter than one window is then skipped with a warning), from a seeded
  generator; within a
  source, windows come in a seeded permutation per epoch of that source.
* The sampler's whole state is ``(samples drawn, per-source draws)``, saved in checkpoints, so a resumed run
  continues with the next unseen sample. Data-parallel rank ``r`` of ``w`` takes global samples
  ``r, r + w, r + 2w, ...``.
* Document boundaries: ``segment[t]`` counts the EOS tokens before position ``t`` in the window, so the model
  can confine attention (and, in the pure path, Mamba state) to each document. In ``pack: boundaries`` mode
  the target that crosses a boundary (predicting the next document's first token from an EOS) is ignored.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.shards import Manifest, ShardReader


class DataError(ValueError):
    """A data problem found before training starts (missing shards, vocabulary mismatch, ...)."""


@dataclass
class _Piece:
    path: Path
    batch: int
    start: int  # first token of this record batch in the source stream


@dataclass
class SourceStream:
    name: str
    kind: str
    pieces: list[_Piece] = field(default_factory=list)
    tokens: int = 0
    _readers: dict[Path, ShardReader] = field(default_factory=dict, repr=False)

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream, gathered across record batches/shards."""
        out = []
        starts = [p.start for p in self.pieces]
        i = bisect.bisect_right(starts, start) - 1
        need, pos = length, start
        while need > 0:
            piece = self.pieces[i]
            flat = self._batch_tokens(piece)
            offset = pos - piece.start
            take = min(need, len(flat) - offset)
            out.append(flat[offset:offset + take])
            need -= take
            pos += take
            i += 1
        return np.concatenate(out) if len(out) > 1 else np.array(out[0])

    def _batch_tokens(self, piece: _Piece) -> np.ndarray:
        reader = self._readers.get(piece.path)
        if reader is None:
            reader = self._readers[piece.path] = ShardReader(piece.path)
        return reader.batch_tokens(piece.batch)[0]


def load_streams(run_dirs: list[str | Path], model_vocab: int, sources: dict[str, float] | None = None
                 ) -> tuple[dict[str, SourceStream], dict]:
    """Index the token streams of every source in the given pipeline runs (no token data is read)."""
    streams: dict[str, SourceStream] = {}
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
                    kinds = batch.column("source_kind").to_pylist()
                    lengths = batch.column("num_tokens").to_numpy()
                    # a record batch holds one unit's documents, hence one source
                    name = names[0] if names else None
                    if name is None:
                        continue
                    if len(set(names)) != 1:
                        raise DataError(f"{path}: record batch {b} mixes sources")
                    stream = streams.setdefault(name, SourceStream(name, kinds[0]))
                    stream.pieces.append(_Piece(path, b, stream.tokens))
                    stream.tokens += int(lengths.sum())
    if sources is not None:
        unknown = sorted(set(sources) - set(streams))
        if unknown:
            raise DataError(f"data.weights: no shards for source {unknown[0]!r} (have: {', '.join(sorted(streams))})")
        streams = {name: streams[name] for name in sources}
    if not streams:
        raise DataError("no tokens in the given runs")
    return streams, tokenizer or {}


@dataclass
class SamplerState:
    drawn: int = 0
    per_source: dict[str, int] = field(default_factory=dict)


class MixtureSampler:
    """Deterministic mixture of windows; ``state`` is everything needed to continue exactly."""

    def __init__(self, streams: dict[str, SourceStream], weights: dict[str, float] | None, seq_len: int,
                 seed: int):
        self.window = seq_len + 1
        too_small = sorted(n for n, s in streams.items() if s.tokens < self.window)
        if weights is not None:
            named = [n for n in too_small if weights.get(n, 0) > 0]
            if named:
                raise DataError(f"data.weights: source {named[0]!r} has fewer than seq_len + 1 = {self.window} tokens")
        elif too_small:
            logging.getLogger("train").warning("skipping sources shorter than one window (%d tokens): %s",
                                               self.window, ", ".join(too_small))
        self.streams = {n: s for n, s in streams.items() if n not in too_small}
        if not self.streams:
            raise DataError(f"no source has at least seq_len + 1 = {self.window} tokens")
        self.names = sorted(self.streams)
        self.n_windows = {n: self.streams[n].tokens // self.window for n in self.names}
        # default mixture: the natural one, proportional to each source's tokens
        raw = np.array([weights.get(n, 0.0) if weights is not None else float(self.streams[n].tokens)
                        for n in self.names], dtype=np.float64)
        if raw.sum() <= 0:
            raise DataError("data.weights: all zero")
        self.probs = raw / raw.sum()
        self.seed = seed
        self.state = SamplerState(per_source={n: 0 for n in self.names})
        self._perm_cache: dict[tuple[str, int], np.ndarray] = {}

    def _source_of(self, index: int) -> str:
        u = np.random.default_rng([self.seed, 1, index]).random()
        return self.names[int(np.searchsorted(np.cumsum(self.probs), u, side="right").clip(0, len(self.names) - 1))]

    def _window_index(self, name: str, k: int) -> int:
        n = self.n_windows[name]
        epoch, within = divmod(k, n)
        key = (name, epoch)
        if key not in self._perm_cache:
            self._perm_cache = {key: np.random.default_rng([self.seed, 2, self.names.index(name), epoch]).permutation(n)}
        return int(self._perm_cache[key][within])

    def draw(self) -> tuple[str, int]:
        """Advance to the next global sample: (source, first token of its window); no token is read."""
        name = self._source_of(self.state.drawn)
        k = self.state.per_source[name]
        self.state.per_source[name] = k + 1
        self.state.drawn += 1
        return name, self._window_index(name, k) * self.window

    def next(self) -> tuple[str, np.ndarray]:
        """The next global sample: (source, ``seq_len + 1`` tokens)."""
        name, start = self.draw()
        return name, self.streams[name].window(start, self.window)


def segments_from_eos(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """segment[t] = number of EOS tokens strictly before t."""
    is_eos = (tokens == eos_id).astype(np.int64)
    return np.concatenate([[0], np.cumsum(is_eos)[:-1]])


@dataclass
class Batch:
    input_ids: np.ndarray   # [b, seq_len] int64
    targets: np.ndarray     # [b, seq_len] int64, -100 = ignored
    segment: np.ndarray     # [b, seq_len] int64
    sources: list[str]


class RankLoader:
    """Micro-batches for one data-parallel rank: global samples r, r + w, ..."""

    def __init__(self, sampler: MixtureSampler, micro_batch: int, rank: int, world: int, eos_id: int,
                 pack: str = "boundaries"):
        if pack not in ("boundaries", "concat"):
            raise DataError(f"data.pack: must be 'boundaries' or 'concat', got {pack!r}")
        self.sampler, self.micro_batch, self.rank, self.world = sampler, micro_batch, rank, world
        self.eos_id, self.pack = eos_id, pack

    def next_batch(self) -> Batch:
        rows, names = [], []
        for _ in range(self.micro_batch):
            # every rank advances the shared sampler identically, reading only its own window
            for r in range(self.world):
                if r == self.rank:
                    name, tokens = self.sampler.next()
                else:
                    self.sampler.draw()
            names.append(name)
            rows.append(tokens.astype(np.int64))
        windows = np.stack(rows)
        inputs, targets = windows[:, :-1], windows[:, 1:].copy()
        segment = np.stack([segments_from_eos(w, self.eos_id) for w in inputs])
        if self.pack == "boundaries":
            targets[inputs == self.eos_id] = -100  # don't predict a new document from the previous one
        else:
            segment = np.zeros_like(segment)
        return Batch(inputs, targets, segment, names)
