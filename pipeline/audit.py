"""The audit trail: a sample of the documents each stage dropped, per reason, with their text.

Every map stage that drops documents offers each one to a ``DropSampler``; the sampler keeps, per reason,
the ``per_reason`` documents of the unit with the smallest *rank* (a hash of the document id), and the stage
writes them to ``stages/<stage>/dropped/<unit>.parquet`` next to its output. Ranks make the sample a pure
function of the data: the same documents are kept whatever the order, the worker or the retry, and the
documents with the smallest ranks over the whole run are a uniform sample of each reason, which is what
``python -m pipeline inspect DIR --dropped REASON`` shows first. Memory per unit: ``per_reason`` documents
per reason, each cut to ``max_chars``.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path

DROPPED_DIR = "dropped"
DROPPED_SCHEMA = pa.schema([
    ("reason", pa.string()),
    ("rank", pa.uint64()),
    ("id", pa.string()),
    ("source", pa.string()),
    ("text", pa.large_string()),     # cut to max_chars; empty where the stage dropped before there was text
    ("chars", pa.int64()),           # the full text's length
    ("metadata", pa.string()),       # JSON: url, locator, language, scores...
])


def rank_of(doc_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")


class DropSampler:
    """The ``per_reason`` lowest-ranked dropped documents of one unit, per reason."""

    def __init__(self, per_reason: int, max_chars: int):
        self.per_reason = per_reason
        self.max_chars = max_chars
        self._heaps: dict[str, list[tuple[int, str, dict[str, Any]]]] = {}   # max-heaps by -rank

    def offer(self, reason: str, doc_id: str, source: str, text: str | Callable[[], str] = "",
              metadata: dict[str, Any] | Callable[[], dict[str, Any]] | None = None) -> None:
        """``text`` and ``metadata`` may be callables: only documents that enter the sample are materialised
        (a stage dropping millions of documents pays a hash per document, not a string)."""
        if self.per_reason <= 0:
            return
        rank = rank_of(doc_id)
        heap = self._heaps.setdefault(reason, [])
        if len(heap) >= self.per_reason and -heap[0][0] <= rank:
            return
        if callable(text):
            text = text()
        if callable(metadata):
            metadata = metadata()
        row = {"reason": reason, "rank": rank, "id": doc_id, "source": source, "text": text[: self.max_chars],
               "chars": len(text), "metadata": json.dumps(metadata or {}, sort_keys=True, ensure_ascii=False,
                                                           default=str)}
        item = (-rank, doc_id, row)
        if len(heap) < self.per_reason:
            heapq.heappush(heap, item)
        else:
            heapq.heapreplace(heap, item)

    def rows(self) -> list[dict[str, Any]]:
        out = [row for heap in self._heaps.values() for _, _, row in heap]
        return sorted(out, key=lambda r: (r["reason"], r["rank"], r["id"]))

    def write(self, path: Path) -> bool:
        """The sample as Parquet, atomically; no file (a stale one removed) when nothing was dropped."""
        rows = self.rows()
        if not rows:
            path.unlink(missing_ok=True)
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = {name: [r[name] for r in rows] for name in DROPPED_SCHEMA.names}
        table = pa.table(columns, schema=DROPPED_SCHEMA)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        return True


def read_dropped(run_dir: Path, reason: str | None = None, stage: str | None = None) -> Iterator[dict[str, Any]]:
    """Sampled dropped documents of a run, lowest ranks first per reason: those of ``reason`` (exact, or
    every reason under a prefix ending in ``:``, e.g. ``contaminated:``), of one ``stage`` or all."""
    from pipeline.stages.base import STAGES_DIR

    files = sorted((run_dir / STAGES_DIR).glob(f"{stage or '*'}/{DROPPED_DIR}/*.parquet"))
    rows: list[dict[str, Any]] = []
    for path in files:
        for row in pq.read_table(path).to_pylist():
            if reason is None or row["reason"] == reason or (reason.endswith(":") and row["reason"].startswith(reason)):
                row["stage"] = path.parent.parent.name
                rows.append(row)
    rows.sort(key=lambda r: (r["stage"], r["reason"], r["rank"], r["id"]))
    yield from rows


def dropped_reasons(run_dir: Path) -> dict[tuple[str, str], int]:
    """(stage, reason) -> sampled documents on disk, for ``inspect``'s listing."""
    counts: dict[tuple[str, str], int] = {}
    for row in read_dropped(run_dir):
        key = (row["stage"], row["reason"])
        counts[key] = counts.get(key, 0) + 1
    return counts


# ------------------------------------------------------------------------------------------ web domains
DOMAINS_DIR = "domains"
DOMAIN_OUTCOMES = ("kept", "dropped", "errored")
_EXTRACT: list[Any] = []


def registered_domain(url: str) -> str:
    """The registrable domain of a URL (``docs.python.org`` -> ``python.org``) from tldextract's bundled
    public-suffix snapshot (never fetched); the host itself where there is no known suffix (IPs,
    ``localhost``), ``""`` without a host."""
    if not _EXTRACT:
        from tldextract import TLDExtract

        _EXTRACT.append(TLDExtract(suffix_list_urls=(), cache_dir=None))
    parts = _EXTRACT[0](url)
    if parts.domain and parts.suffix:
        return f"{parts.domain}.{parts.suffix}".lower()
    return (parts.domain or parts.subdomain or "").lower()


def domain_partition(sources: list[str], domains: list[str], partitions: int) -> list[int]:
    """A stable partition per (source, domain): every unit sends a domain's counts to the same reducer."""
    return [int.from_bytes(hashlib.blake2b(f"{s}\x00{d}".encode(), digest_size=8).digest(), "little") % partitions
            for s, d in zip(sources, domains)]


class DomainCounter:
    """Pages per (source, registered domain) and outcome, for one unit."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], list[int]] = {}

    def page(self, source: str, url: str, outcome: str) -> None:
        cell = self.counts.setdefault((source, registered_domain(url) if url else ""), [0, 0, 0])
        cell[DOMAIN_OUTCOMES.index(outcome)] += 1

    def write(self, path: Path, partitions: int) -> int:
        """One partitioned Arrow file (``pipeline.dedup.shuffle``) of (source, domain, kept, dropped,
        errored), by a hash of (source, domain); rows sorted so the file is a pure function of the counts."""
        import numpy as np

        from pipeline.dedup.shuffle import write_partitioned

        keys = sorted(self.counts)
        sources = [s for s, _ in keys]
        domains = [d for _, d in keys]
        cols = {"source": np.array(sources, dtype=object), "domain": np.array(domains, dtype=object)}
        for i, outcome in enumerate(DOMAIN_OUTCOMES):
            cols[outcome] = np.array([self.counts[k][i] for k in keys], dtype=np.int64)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_partitioned(path, cols, np.array(domain_partition(sources, domains, partitions), np.int64),
                                 partitions)


class UnitAudit:
    """What one unit of a stage leaves for the audit trail: the sample of dropped documents and, for web
    pages, the pages per domain and outcome."""

    def __init__(self, per_reason: int, max_chars: int, domains: bool = False):
        self.sampler = DropSampler(per_reason, max_chars)
        self.domains = DomainCounter() if domains else None

    def dropped(self, reason: str, doc_id: str, source: str, text: str = "",
                metadata: dict[str, Any] | None = None) -> None:
        self.sampler.offer(reason, doc_id, source, text, metadata)
        self.page(source, metadata, "dropped")

    def errored(self, source: str, metadata: dict[str, Any] | None) -> None:
        self.page(source, metadata, "errored")

    def kept(self, source: str, metadata: dict[str, Any] | None) -> None:
        self.page(source, metadata, "kept")

    def page(self, source: str, metadata: dict[str, Any] | None, outcome: str) -> None:
        if self.domains is not None:
            self.domains.page(source, (metadata or {}).get("url") or "", outcome)


def audit_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """What a dropped sample keeps of a document's metadata: where it came from and what filters said."""
    return {k: v for k, v in metadata.items() if k not in ("source", "source_kind", "error") and
            not isinstance(v, (bytes, bytearray))}
