"""Input planning and the reader contract.

Planning lists each source's files (local or any fsspec URL), checks they exist before work starts, and
groups them into *units*: the granularity of Ray work, of atomic outputs and of resume. A unit is either
one range of a large file (``pipeline.sources.ranges``: cut at record boundaries), one large file that
cannot be cut, or a run of consecutive small files of one source, up to ``run.unit_target_mb``.

A reader turns one file into documents and books every record it sees in the ledger under stage
``read``: kept (became a document), dropped for a reason (not a document: non-HTML, empty, binary, ...) or
errored for a reason (corrupt, truncated). A bad record never stops the file; a file whose container is
broken stops at the break, with everything before it kept.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import io
import logging
import posixpath
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

import fsspec
from datatrove.data import Document

from pipeline.config import ConfigError, PipelineConfig, SourceConfig
from pipeline.ledger import Ledger

log = logging.getLogger(__name__)
READ_STAGE = "read"
GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


@dataclass(frozen=True)
class InputFile:
    """One input file, or one range of it (a large file cut by the planner, see ``pipeline.sources.ranges``).

    ``start``/``end`` are the bytes ``[start, end)`` the range covers (``end`` None: to the end of the
    file); a reader takes every record that *starts* in it. For Parquet the reader's range is
    ``row_groups`` ``[first, stop)``, and ``start``/``end`` are those row groups' bytes (for sizes only).
    A whole file is ``start=0, end=None, row_groups=None``.
    """

    url: str  # what fsspec opens
    rel: str  # stable locator base: path relative to the configured entry (no machine-specific prefix)
    size: int  # of the whole file
    start: int = 0
    end: int | None = None
    row_groups: tuple[int, int] | None = None

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.end is None and self.row_groups is None

    @property
    def nbytes(self) -> int:
        """Bytes of the file this range covers."""
        return (self.size if self.end is None else self.end) - self.start

    def describe(self) -> str:
        if self.whole:
            return self.rel
        if self.row_groups is not None:
            return f"{self.rel}[row groups {self.row_groups[0]}-{self.row_groups[1] - 1}]"
        return f"{self.rel}[bytes {self.start}-{self.size if self.end is None else self.end})"


@dataclass(frozen=True)
class Unit:
    id: str
    source: str
    kind: str
    files: tuple[InputFile, ...] = field(default_factory=tuple)

    @property
    def size(self) -> int:
        return sum(f.nbytes for f in self.files)

    def describe(self) -> str:
        return f"{self.id} ({', '.join(f.describe() for f in self.files)})"


class Reader:
    """One job: turn the bytes of one input file into documents, accounting for every record."""

    def __init__(self, source: SourceConfig):
        self.source = source

    def read(self, file: InputFile, ledger: Ledger) -> Iterator[Document]:
        raise NotImplementedError

    # helpers shared by readers -------------------------------------------------------------------
    def took(self, ledger: Ledger, n: int = 1, nbytes: int = 0) -> None:
        ledger.took(READ_STAGE, self.source.name, self.source.kind, n, nbytes)

    def kept(self, ledger: Ledger, nbytes: int) -> None:
        ledger.kept(READ_STAGE, self.source.name, self.source.kind, 1, nbytes)

    def dropped(self, ledger: Ledger, reason: str, nbytes: int = 0) -> None:
        ledger.dropped(READ_STAGE, self.source.name, self.source.kind, reason, 1, nbytes)

    def errored(self, ledger: Ledger, reason: str, nbytes: int = 0, locator: str | None = None,
                error: str | None = None) -> None:
        """Book a record as errored; with its ``locator`` it is also quarantined (findable again)."""
        if locator is None:
            ledger.errored(READ_STAGE, self.source.name, self.source.kind, reason, 1, nbytes)
            return
        from pipeline.document import document_id

        ledger.poison(READ_STAGE, self.source.name, self.source.kind, reason, nbytes,
                      doc_id=document_id(self.source.name, locator), locator=locator, error=error or reason)

    @property
    def max_bytes(self) -> int:
        return int(self.source.max_document_mb * 1024 * 1024)

    def decode(self, data: bytes) -> str | None:
        """UTF-8 text, or None when it is not valid UTF-8 and the source asks to drop such documents."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            if self.source.encoding_errors == "drop":
                return None
            text = data.decode("utf-8", errors="replace")
        return text[1:] if text.startswith("\ufeff") else text


def open_binary(url: str) -> IO[bytes]:
    """Open a local path or fsspec URL for reading bytes, transparently gunzipping ``.gz``."""
    raw = fsspec.open(url, "rb").open()
    if url.endswith(".gz") or url.endswith(".tgz"):
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
    return raw


def read_capped(stream: IO[bytes], limit: int) -> bytes | None:
    """Read the whole stream, or None as soon as it proves longer than ``limit`` bytes."""
    buf = io.BytesIO()
    while True:
        block = stream.read(min(1 << 20, limit + 1 - buf.tell()))
        if not block:
            return buf.getvalue()
        buf.write(block)
        if buf.tell() > limit:
            return None


# ------------------------------------------------------------------------------------------ planning
def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def list_source_files(source: SourceConfig, where: str) -> list[InputFile]:
    """Every input file of a source, sorted, with stable relative locators. Missing paths are errors."""
    files: list[InputFile] = []
    for j, entry in enumerate(source.paths):
        key = f"{where}.paths[{j}]"
        try:
            fs, root = fsspec.core.url_to_fs(entry)
        except (ImportError, ValueError) as exc:
            raise ConfigError(f"{key}: cannot open {entry!r}: {exc}") from None
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        try:
            if any(ch in root for ch in "*?["):
                found = sorted(fs.glob(root))
                if not found:
                    raise ConfigError(f"{key}: glob {entry!r} matches no file")
                base = posixpath.dirname(root.split("*")[0].split("?")[0].split("[")[0].rstrip("/"))
                candidates = [(p, posixpath.relpath(p, base)) for p in found if fs.isfile(p)]
            elif fs.isdir(root):
                found = sorted(fs.find(root))
                top = posixpath.basename(root.rstrip("/"))
                candidates = [(p, posixpath.join(top, posixpath.relpath(p, root))) for p in found]
            elif fs.isfile(root):
                candidates = [(root, posixpath.basename(root))]
            else:
                raise ConfigError(f"{key}: no such file or directory: {entry}")
        except PermissionError:
            raise ConfigError(f"{key}: permission denied: {entry}") from None
        for path, rel in candidates:
            name = posixpath.basename(path)
            if source.format != "code" and not _matches(name, source.include or ["*"]):
                continue
            if _matches(rel, source.exclude) or _matches(name, source.exclude):
                continue
            try:
                size = int(fs.size(path) or 0)
            except OSError as exc:
                raise ConfigError(f"{key}: cannot stat {path}: {exc}") from None
            files.append(InputFile(url=f"{prefix}{path}", rel=rel, size=size))
    if protocol_is_local(files):
        _check_readable(files, where)
    return files


def protocol_is_local(files: list[InputFile]) -> bool:
    return all("://" not in f.url for f in files)


def _check_readable(files: list[InputFile], where: str) -> None:
    import os

    for f in files:
        if not os.access(f.url, os.R_OK):
            raise ConfigError(f"{where}: input file is not readable: {f.url}")


def _exists(entry: str) -> bool:
    try:
        fs, root = fsspec.core.url_to_fs(entry)
        return bool(fs.glob(root)) if any(ch in root for ch in "*?[") else fs.exists(root)
    except (ImportError, ValueError, OSError):
        return False


ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")


def plan_units(config: PipelineConfig) -> list[Unit]:
    """Deterministic units for every source: the same inputs and config give the same plan.

    A file of at least ``run.unit_target_mb`` is cut into ranges of about that size at record boundaries
    where its format allows it (``pipeline.sources.ranges``), one unit each; a file that cannot be cut is
    one unit. Smaller files are grouped into consecutive runs up to the target; each code archive is alone.
    """
    from pipeline.sources.ranges import split_file

    target = int(config.run.unit_target_mb * 1024 * 1024)
    units: list[Unit] = []
    for i, source in enumerate(config.sources):
        if source.optional and not any(_exists(p) for p in source.paths):
            log.warning("source %s: no input found at %s; skipped (optional)", source.name, source.paths)
            continue
        files = list_source_files(source, f"sources[{i}]")
        groups: list[list[InputFile]] = []
        current: list[InputFile] = []
        current_size = 0
        whole_large = 0
        for f in files:
            alone = f.size >= target or (source.format == "code" and f.url.endswith(ARCHIVE_SUFFIXES))
            if alone:
                ranges = split_file(source, f, target)
                groups.extend([r] for r in ranges)
                if len(ranges) == 1 and f.size > 2 * target and source.format in ("jsonl", "parquet", "warc"):
                    whole_large += 1
                continue
            if current and current_size + f.size > target:
                groups.append(current)
                current, current_size = [], 0
            current.append(f)
            current_size += f.size
        if current:
            groups.append(current)
        if whole_large:
            log.warning("source %s: %d file(s) over twice run.unit_target_mb could not be cut at record "
                        "boundaries and are one unit each (streamed, never held whole)", source.name, whole_large)
        for n, group in enumerate(groups):
            units.append(Unit(id=f"{source.name}-{n:05d}", source=source.name, kind=source.kind, files=tuple(group)))
    return units


def oversized_units(units: list[Unit], target_mb: float) -> list[Unit]:
    """Units of one whole file over twice the target: files the planner could not cut."""
    limit = 2 * target_mb * 1024 * 1024
    return [u for u in units if len(u.files) == 1 and u.files[0].whole and u.size > limit]


# Bumped when what a plan means for the outputs changes. v2: ranges, and locators as byte offsets (JSONL and
# WARC document ids changed), so a run started before cannot be resumed into a mix of both.
PLAN_VERSION = b"units-v2"


def plan_fingerprint(units: list[Unit]) -> str:
    digest = hashlib.sha256(PLAN_VERSION)
    for unit in units:
        digest.update(unit.id.encode())
        for f in unit.files:
            digest.update(f"\x00{f.rel}\x00{f.size}".encode())
            if not f.whole:
                digest.update(f"\x00{f.start}:{f.end}:{f.row_groups}".encode())
    return digest.hexdigest()[:16]
