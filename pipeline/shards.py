"""The tokenized shard format: Arrow IPC files plus ``manifest.json``. pyarrow + numpy (+ stdlib) only.

This is the one module the trainer imports from the pipeline, so it must stay light: no Ray, no datatrove.

A shard is an Arrow IPC *file* (random-access format) with one row per document::

    id           string        stable document id (hash of source + locator)
    source       string        configured source name
    source_kind  string        web | book | code
    num_tokens   int32         tokens in this row, EOS included
    tokens       list<uint16>  token ids (list<uint32> when the vocabulary exceeds 65,536), EOS last
    quality_score float32      the quality classifier's P(high quality); null when not scored (format 2)

Schema metadata carries ``jamba.format_version``, ``jamba.vocab_size``, ``jamba.eos_id`` and
``jamba.tokenizer_fingerprint``. Files are written under a temporary name and renamed, and carry no
timestamps, so the same input gives byte-identical shards. Opened with ``pyarrow.memory_map`` the token
buffers are read without copying.

The tokenize stage writes one file of this format per unit (``ShardWriter``); ``pack_shard`` copies row
ranges of such files into a published shard ``shards/shard-<i:06d>.arrow`` (the plan: ``pipeline.stages.pack``).
Both cut record batches by ``batch_ends`` into fresh buffers, so a file's bytes depend only on its rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)   # format 1: the same without quality_score
MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"
SHARD_SUFFIX = ".arrow"
_META_PREFIX = "jamba."


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def shard_schema(vocab_size: int, eos_id: int, tokenizer_fingerprint: str) -> pa.Schema:
    value_type = pa.uint16() if token_dtype(vocab_size) == np.uint16 else pa.uint32()
    meta = {"format_version": FORMAT_VERSION, "vocab_size": vocab_size, "eos_id": eos_id,
            "tokenizer_fingerprint": tokenizer_fingerprint}
    return pa.schema(
        [("id", pa.string()), ("source", pa.string()), ("source_kind", pa.string()),
         ("num_tokens", pa.int32()), ("tokens", pa.list_(value_type)), ("quality_score", pa.float32())],
        metadata={f"{_META_PREFIX}{k}": str(v) for k, v in meta.items()},
    )


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ShardInfo:
    path: str  # relative to the run directory
    rows: int
    tokens: int
    bytes: int
    sha256: str
    sources: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> {rows, tokens}


def _nullable_scores(scores: Sequence[float | None]) -> pa.Array:
    values = np.array([np.nan if s is None else s for s in scores], dtype=np.float32)
    return pa.array(values, pa.float32(), mask=np.isnan(values))   # not scored: null, never NaN


BATCH_ROWS = 4096          # rows per record batch at most
BATCH_BYTES = 64 << 20     # token bytes per record batch: a batch ends at the row that reaches this


def batch_ends(sizes: np.ndarray, rows: int, nbytes: int, batch_rows: int, batch_bytes: int) -> int:
    """How many of the rows with token bytes ``sizes`` join a pending batch of ``rows`` rows and ``nbytes``
    token bytes before it is complete (at ``batch_rows`` rows, or at the row that brings it to
    ``batch_bytes``); all of them if it stays incomplete. With "a row of another source ends the batch before
    it" (the trainer streams each source by record batch), the one rule both writers batch by, so a batch's
    boundaries depend only on the sequence of rows."""
    room = min(batch_rows - rows, len(sizes))
    cumulative = nbytes + np.cumsum(sizes[:room], dtype=np.int64)
    reach = int(np.searchsorted(cumulative, batch_bytes, side="left"))
    return min(room, reach + 1)


class _ShardFile:
    """One shard file being written: to a temporary name in its directory, renamed onto ``final`` on close."""

    def __init__(self, final: Path, schema: pa.Schema):
        self.final = final
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        self.writer: pa.ipc.RecordBatchFileWriter | None = pa.ipc.new_file(self.tmp, schema)
        self.rows = self.tokens = self.bytes = 0
        self.sources: dict[str, dict[str, int]] = {}

    def write(self, batch: pa.RecordBatch) -> None:
        assert self.writer is not None
        self.writer.write_batch(batch)
        lengths = batch.column("num_tokens").to_numpy(zero_copy_only=False)
        self.bytes += batch.nbytes
        self.rows += batch.num_rows
        self.tokens += int(lengths.sum())
        for source, n in zip(batch.column("source").to_pylist(), lengths.tolist()):
            entry = self.sources.setdefault(source, {"rows": 0, "tokens": 0})
            entry["rows"] += 1
            entry["tokens"] += n

    def close(self, run_dir: Path) -> ShardInfo:
        assert self.writer is not None
        self.writer.close()
        self.writer = None
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.final)
        return ShardInfo(path=self.final.relative_to(run_dir).as_posix(), rows=self.rows, tokens=self.tokens,
                         bytes=self.final.stat().st_size, sha256=sha256_file(self.final), sources=self.sources)

    def abort(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
            self.writer = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


class ShardWriter:
    """Append tokenized documents; rolls over to a new shard file past ``target_bytes``.

    Files are named ``<prefix>-<part:04d>.arrow`` under ``run_dir/directory`` (``<prefix>.arrow``, one
    file, when ``target_bytes`` is None); each is written to a temporary name and renamed when complete.
    """

    def __init__(self, run_dir: Path | str, prefix: str, vocab_size: int, eos_id: int,
                 tokenizer_fingerprint: str, target_bytes: int | None, batch_rows: int = BATCH_ROWS,
                 directory: str = SHARD_DIR, batch_bytes: int = BATCH_BYTES):
        self.run_dir = Path(run_dir)
        self.directory = self.run_dir / directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.schema = shard_schema(vocab_size, eos_id, tokenizer_fingerprint)
        self.dtype = token_dtype(vocab_size)
        self.target_bytes = target_bytes
        self.batch_rows = batch_rows
        self.batch_bytes = batch_bytes
        self.shards: list[ShardInfo] = []
        self._part = 0
        self._file: _ShardFile | None = None
        self._pending: list[tuple[str, str, str, np.ndarray, float | None]] = []
        self._pending_bytes = 0

    def add(self, doc_id: str, source: str, kind: str, tokens: np.ndarray, quality_score: float | None = None) -> None:
        tokens = np.asarray(tokens, dtype=self.dtype)
        if self._pending and self._pending[-1][1] != source:   # a record batch holds one source
            self._flush()
        self._pending.append((doc_id, source, kind, tokens, quality_score))
        self._pending_bytes += tokens.nbytes
        if len(self._pending) >= self.batch_rows or self._pending_bytes >= self.batch_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        ids, sources, kinds, arrays, scores = zip(*self._pending)
        self._pending, self._pending_bytes = [], 0
        lengths = np.fromiter((len(a) for a in arrays), dtype=np.int32, count=len(arrays))
        offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.concatenate(arrays) if arrays else np.zeros(0, self.dtype)
        tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
        batch = pa.RecordBatch.from_arrays(
            [pa.array(ids, pa.string()), pa.array(sources, pa.string()), pa.array(kinds, pa.string()),
             pa.array(lengths), tokens, _nullable_scores(scores)], schema=self.schema)
        if self._file is None:
            name = self.prefix if self.target_bytes is None else f"{self.prefix}-{self._part:04d}"
            self._file = _ShardFile(self.directory / f"{name}{SHARD_SUFFIX}", self.schema)
        self._file.write(batch)
        if self.target_bytes is not None and self._file.bytes >= self.target_bytes:
            self._close_current()

    def _close_current(self) -> None:
        if self._file is None:
            return
        self.shards.append(self._file.close(self.run_dir))
        self._file = None
        self._part += 1

    def close(self) -> list[ShardInfo]:
        self._flush()
        self._close_current()
        return self.shards

    def abort(self) -> None:
        if self._file is not None:
            self._file.abort()
        self._file = None


class _Rebatcher:
    """Rows (slices of mapped token files) gathered into the record batches of ``batch_ends``, each copied into
    fresh buffers when written."""

    def __init__(self, out: _ShardFile, itemsize: int, batch_rows: int, batch_bytes: int):
        self.out, self.itemsize, self.batch_rows, self.batch_bytes = out, itemsize, batch_rows, batch_bytes
        self.pending: list[pa.RecordBatch] = []
        self.source: str | None = None
        self.rows = self.nbytes = 0

    def add(self, part: pa.RecordBatch, source: str) -> None:
        """Rows of one source."""
        if self.pending and source != self.source:
            self.flush()
        self.source = source
        sizes = part.column("num_tokens").to_numpy(zero_copy_only=False).astype(np.int64) * self.itemsize
        i = 0
        while i < part.num_rows:
            take = batch_ends(sizes[i:], self.rows, self.nbytes, self.batch_rows, self.batch_bytes)
            self.pending.append(part.slice(i, take))
            self.rows += take
            self.nbytes += int(sizes[i:i + take].sum())
            i += take
            if self.rows >= self.batch_rows or self.nbytes >= self.batch_bytes:
                self.flush()

    def own(self) -> None:
        """Copy the pending rows out of the mapping they point into (before it is closed)."""
        if self.pending:
            self.pending = [pa.concat_batches(self.pending)]

    def flush(self) -> None:
        if self.pending:
            self.out.write(pa.concat_batches(self.pending))
        self.pending, self.rows, self.nbytes = [], 0, 0


def _source_runs(part: pa.RecordBatch) -> Iterator[tuple[pa.RecordBatch, str]]:
    """``part`` cut where the source changes (a unit's token file holds one source: one run)."""
    names = part.column("source").to_pylist()
    start = 0
    for i in range(1, len(names) + 1):
        if i == len(names) or names[i] != names[start]:
            yield part.slice(start, i - start), names[start]
            start = i


def pack_shard(run_dir: Path | str, pieces: Sequence[tuple[Path | str, int, int]], path: str, schema: pa.Schema,
               batch_rows: int = BATCH_ROWS, batch_bytes: int = BATCH_BYTES) -> ShardInfo:
    """Write the shard ``run_dir/path`` from row ranges ``[start, stop)`` of token files of this format, in
    order. One source file is mapped at a time; rows are re-batched by ``batch_ends`` (a batch holds one
    source) and copied into fresh buffers, so the file's bytes depend only on the rows it holds, not on how
    its sources were batched: it is the file ``ShardWriter`` writes from the same documents."""
    run_dir = Path(run_dir)
    itemsize = token_dtype(int(schema.metadata[f"{_META_PREFIX}vocab_size".encode()])).itemsize
    out = _ShardFile(run_dir / path, schema)
    batches = _Rebatcher(out, itemsize, batch_rows, batch_bytes)
    try:
        for source, start, stop in pieces:
            with ShardReader(source) as reader:
                if not reader.schema.equals(schema, check_metadata=True):
                    raise ValueError(f"{source}: schema or tokenizer differs from the shard being packed")
                first = 0
                for batch in reader.batches():
                    lo, hi = max(start - first, 0), min(stop - first, batch.num_rows)
                    first += batch.num_rows
                    if lo < hi:
                        for run, name in _source_runs(batch.slice(lo, hi - lo)):
                            batches.add(run, name)
                    if first >= stop:
                        break
                if first < stop:
                    raise ValueError(f"{source}: {first} rows, the plan needs rows up to {stop}")
                batches.own()
        batches.flush()
        return out.close(run_dir)
    except BaseException:
        out.abort()
        raise


class ShardReader:
    """Memory-mapped, zero-copy access to one shard."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._source = pa.memory_map(str(self.path), "r")
        self._reader = pa.ipc.open_file(self._source)
        self.schema = self._reader.schema
        meta = {k.decode(): v.decode() for k, v in (self._reader.schema.metadata or {}).items()}
        self.metadata = {k[len(_META_PREFIX):]: v for k, v in meta.items() if k.startswith(_META_PREFIX)}
        self.format_version = int(self.metadata.get("format_version", -1))
        if self.format_version not in READABLE_VERSIONS:
            raise ValueError(f"{self.path}: not a jamba-pretrain shard of format {', '.join(map(str, READABLE_VERSIONS))}")
        self.vocab_size = int(self.metadata["vocab_size"])
        self.eos_id = int(self.metadata["eos_id"])
        # batch index -> batch_tokens(index): views into the map, kept so that a trainer reading many
        # windows of one batch does not decode its IPC message and rebase its offsets every time
        self._tokens: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def num_batches(self) -> int:
        return self._reader.num_record_batches

    @property
    def num_rows(self) -> int:
        return sum(self._reader.get_batch(i).num_rows for i in range(self.num_batches))

    def num_tokens(self) -> np.ndarray:
        """Every row's ``num_tokens`` (a small column: the token lists are not touched)."""
        parts = [self._reader.get_batch(i).column("num_tokens").to_numpy(zero_copy_only=False)
                 for i in range(self.num_batches)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def batches(self) -> Iterator[pa.RecordBatch]:
        for i in range(self.num_batches):
            yield self._reader.get_batch(i)

    def batch_tokens(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Record batch ``index``: (all token ids concatenated, document boundary offsets), zero-copy.

        ``offsets`` has one more entry than there are documents; document ``i`` is
        ``tokens[offsets[i]:offsets[i+1]]`` and ends with EOS. Offsets are rebased to start at 0. Computed
        once per batch and kept until ``close``; both arrays are read-only.
        """
        cached = self._tokens.get(index)
        if cached is not None:
            return cached
        col = self._reader.get_batch(index).column("tokens")
        offsets = col.offsets.to_numpy(zero_copy_only=True)
        values = col.values.to_numpy(zero_copy_only=True)
        start, end = int(offsets[0]), int(offsets[-1])
        rebased = offsets - start
        rebased.flags.writeable = False   # shared by every caller
        cached = self._tokens[index] = (values[start:end], rebased)
        return cached

    def token_batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``batch_tokens`` for every record batch, in order."""
        for i in range(self.num_batches):
            yield self.batch_tokens(i)

    def quality_scores(self) -> np.ndarray:
        """Every row's quality score (NaN where not scored, and for format-1 shards)."""
        parts = []
        for batch in self.batches():
            if "quality_score" in batch.schema.names:
                parts.append(batch.column("quality_score").to_numpy(zero_copy_only=False).astype(np.float32))
            else:
                parts.append(np.full(batch.num_rows, np.nan, dtype=np.float32))
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def documents(self) -> Iterator[tuple[str, str, np.ndarray]]:
        """(id, source_kind, tokens) per document; ``tokens`` is a view into the mapped file."""
        for batch in self.batches():
            ids = batch.column("id").to_pylist()
            kinds = batch.column("source_kind").to_pylist()
            col = batch.column("tokens")
            offsets = col.offsets.to_numpy(zero_copy_only=True)
            values = col.values.to_numpy(zero_copy_only=True)
            for i, (doc_id, kind) in enumerate(zip(ids, kinds)):
                yield doc_id, kind, values[offsets[i]:offsets[i + 1]]

    def close(self) -> None:
        # the map is released when the last buffer into it is gone: drop the views kept here
        self._tokens.clear()
        self._source.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -------------------------------------------------------------------------------------------- manifest
@dataclass
class Manifest:
    format_version: int
    config_fingerprint: str
    tokenizer: dict[str, Any]  # fingerprint, vocab_size, eos_id, eos_token, path
    shards: list[ShardInfo]
    totals: dict[str, dict[str, Any]]  # source -> {kind, rows, tokens}

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def total_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        return {"format_version": self.format_version, "config_fingerprint": self.config_fingerprint,
                "tokenizer": self.tokenizer, "totals": self.totals,
                "total_rows": self.total_rows, "total_tokens": self.total_tokens,
                "shards": [asdict(s) for s in self.shards]}

    def save(self, run_dir: Path | str) -> Path:
        path = Path(run_dir) / MANIFEST_NAME
        fd, tmp = tempfile.mkstemp(prefix=".manifest.", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump(self.to_json(), fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, run_dir: Path | str) -> Manifest:
        data = json.loads((Path(run_dir) / MANIFEST_NAME).read_text())
        if data.get("format_version") not in READABLE_VERSIONS:
            raise ValueError(f"{run_dir}: manifest format {data.get('format_version')} is not one of {READABLE_VERSIONS}")
        return cls(format_version=data["format_version"], config_fingerprint=data["config_fingerprint"],
                   tokenizer=data["tokenizer"], shards=[ShardInfo(**s) for s in data["shards"]],
                   totals=data["totals"])

    def shard_paths(self, run_dir: Path | str) -> list[Path]:
        return [Path(run_dir) / s.path for s in self.shards]


def build_totals(shards: Sequence[ShardInfo], kinds: dict[str, str]) -> dict[str, dict[str, Any]]:
    totals: dict[str, dict[str, Any]] = {}
    for shard in shards:
        for source, counts in shard.sources.items():
            entry = totals.setdefault(source, {"kind": kinds.get(source, "?"), "rows": 0, "tokens": 0})
            entry["rows"] += counts["rows"]
            entry["tokens"] += counts["tokens"]
    return dict(sorted(totals.items()))


def verify_run(run_dir: Path | str, deep: bool = True) -> list[str]:
    """Check every shard in the manifest: present, size, sha256, and (deep) row/token counts."""
    run_dir = Path(run_dir)
    problems: list[str] = []
    try:
        manifest = Manifest.load(run_dir)
    except (OSError, ValueError, KeyError) as exc:
        return [f"manifest: {exc}"]
    listed = {s.path for s in manifest.shards}
    for stray in sorted((run_dir / SHARD_DIR).glob(f"*{SHARD_SUFFIX}")):
        if f"{SHARD_DIR}/{stray.name}" not in listed:
            problems.append(f"{SHARD_DIR}/{stray.name}: not in the manifest")
    for shard in manifest.shards:
        path = run_dir / shard.path
        if not path.exists():
            problems.append(f"{shard.path}: missing")
            continue
        if path.stat().st_size != shard.bytes:
            problems.append(f"{shard.path}: size {path.stat().st_size} != manifest {shard.bytes}")
        if sha256_file(path) != shard.sha256:
            problems.append(f"{shard.path}: sha256 mismatch")
            continue
        if deep:
            try:
                with ShardReader(path) as reader:
                    rows = tokens = 0
                    for flat, offsets in reader.token_batches():
                        rows += len(offsets) - 1
                        tokens += len(flat)
                        if len(flat) and int(flat.max()) >= reader.vocab_size:
                            problems.append(f"{shard.path}: token id beyond vocab {reader.vocab_size}")
                    if reader.metadata.get("tokenizer_fingerprint") != manifest.tokenizer.get("fingerprint"):
                        problems.append(f"{shard.path}: tokenizer fingerprint differs from the manifest")
            except (OSError, ValueError, pa.ArrowException) as exc:
                problems.append(f"{shard.path}: unreadable: {exc}")
                continue
            if rows != shard.rows or tokens != shard.tokens:
                problems.append(f"{shard.path}: rows/tokens {rows}/{tokens} != manifest {shard.rows}/{shard.tokens}")
    return problems
