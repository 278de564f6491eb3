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


class ShardWriter:
    """Append tokenized documents; rolls over to a new shard file past ``target_bytes``.

    Files are named ``<prefix>-<part:04d>.arrow`` under ``directory``; each is written to a temporary
    name and renamed when complete.
    """

    def __init__(self, run_dir: Path | str, prefix: str, vocab_size: int, eos_id: int,
                 tokenizer_fingerprint: str, target_bytes: int, batch_rows: int = 4096):
        self.run_dir = Path(run_dir)
        self.directory = self.run_dir / SHARD_DIR
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.schema = shard_schema(vocab_size, eos_id, tokenizer_fingerprint)
        self.dtype = token_dtype(vocab_size)
        self.target_bytes = target_bytes
        self.batch_rows = batch_rows
        self.shards: list[ShardInfo] = []
        self._part = 0
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._tmp: str | None = None
        self._bytes = self._rows = self._tokens = 0
        self._sources: dict[str, dict[str, int]] = {}
        self._pending: list[tuple[str, str, str, np.ndarray, float | None]] = []

    def add(self, doc_id: str, source: str, kind: str, tokens: np.ndarray, quality_score: float | None = None) -> None:
        self._pending.append((doc_id, source, kind, np.asarray(tokens, dtype=self.dtype), quality_score))
        if len(self._pending) >= self.batch_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        ids, sources, kinds, arrays, scores = zip(*self._pending)
        self._pending = []
        lengths = np.fromiter((len(a) for a in arrays), dtype=np.int32, count=len(arrays))
        offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.concatenate(arrays) if arrays else np.zeros(0, self.dtype)
        tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
        batch = pa.RecordBatch.from_arrays(
            [pa.array(ids, pa.string()), pa.array(sources, pa.string()), pa.array(kinds, pa.string()),
             pa.array(lengths), tokens, _nullable_scores(scores)], schema=self.schema)
        if self._writer is None:
            self._open()
        assert self._writer is not None
        self._writer.write_batch(batch)
        self._bytes += batch.nbytes
        self._rows += batch.num_rows
        self._tokens += int(lengths.sum())
        for source, n in zip(sources, lengths):
            entry = self._sources.setdefault(source, {"rows": 0, "tokens": 0})
            entry["rows"] += 1
            entry["tokens"] += int(n)
        if self._bytes >= self.target_bytes:
            self._close_current()

    def _open(self) -> None:
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.prefix}.", suffix=".tmp", dir=self.directory)
        os.close(fd)
        self._writer = pa.ipc.new_file(self._tmp, self.schema)

    def _close_current(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        assert self._tmp is not None
        final = self.directory / f"{self.prefix}-{self._part:04d}{SHARD_SUFFIX}"
        with open(self._tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self._tmp, final)
        self.shards.append(ShardInfo(
            path=f"{SHARD_DIR}/{final.name}", rows=self._rows, tokens=self._tokens,
            bytes=final.stat().st_size, sha256=sha256_file(final), sources=self._sources))
        self._writer, self._tmp = None, None
        self._part += 1
        self._bytes = self._rows = self._tokens = 0
        self._sources = {}

    def close(self) -> list[ShardInfo]:
        self._flush()
        self._close_current()
        return self.shards

    def abort(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
        if self._tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
        self._writer, self._tmp = None, None


class ShardReader:
    """Memory-mapped, zero-copy access to one shard."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._source = pa.memory_map(str(self.path), "r")
        self._reader = pa.ipc.open_file(self._source)
        meta = {k.decode(): v.decode() for k, v in (self._reader.schema.metadata or {}).items()}
        self.metadata = {k[len(_META_PREFIX):]: v for k, v in meta.items() if k.startswith(_META_PREFIX)}
        self.format_version = int(self.metadata.get("format_version", -1))
        if self.format_version not in READABLE_VERSIONS:
            raise ValueError(f"{self.path}: not a jamba-pretrain shard of format {', '.join(map(str, READABLE_VERSIONS))}")
        self.vocab_size = int(self.metadata["vocab_size"])
        self.eos_id = int(self.metadata["eos_id"])

    @property
    def num_batches(self) -> int:
        return self._reader.num_record_batches

    @property
    def num_rows(self) -> int:
        return sum(self._reader.get_batch(i).num_rows for i in range(self.num_batches))

    def batches(self) -> Iterator[pa.RecordBatch]:
        for i in range(self.num_batches):
            yield self._reader.get_batch(i)

    def batch_tokens(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Record batch ``index``: (all token ids concatenated, document boundary offsets), zero-copy.

        ``offsets`` has one more entry than there are documents; document ``i`` is
        ``tokens[offsets[i]:offsets[i+1]]`` and ends with EOS. Offsets are rebased to start at 0.
        """
        col = self._reader.get_batch(index).column("tokens")
        offsets = col.offsets.to_numpy(zero_copy_only=True)
        values = col.values.to_numpy(zero_copy_only=True)
        start, end = int(offsets[0]), int(offsets[-1])
        return values[start:end], offsets - start

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
