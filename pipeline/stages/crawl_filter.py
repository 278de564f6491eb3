"""Stage 1: read raw sources and crawl-filter them.

Web: URL → decode + extract (bounded per page) → language ID, C4, FineWeb, Gopher, in cost order
(``pipeline.filters.web``). Books and code: their per-document filters (``pipeline.filters.registry``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from datatrove.data import Document

from pipeline.audit import DOMAINS_DIR, UnitAudit, audit_metadata
from pipeline.config import PipelineConfig
from pipeline.document import write_documents
from pipeline.filters.registry import build_filters
from pipeline.ledger import Ledger
from pipeline.sources import reader_for
from pipeline.sources.base import READ_STAGE, Unit
from pipeline.stages.base import MapStage, worker_cached

STAGE = "crawl_filter"


def apply_filters(docs: Iterator[Document], filters: list, ledger: Ledger, clock: list[float],
                  audit: UnitAudit | None = None) -> Iterator[Document]:
    """Run each document through the filters in order; every document ends kept, dropped or errored."""
    audit = audit or UnitAudit(0, 0)
    for doc in docs:
        started = time.perf_counter()
        source, kind = doc.metadata["source"], doc.metadata["source_kind"]
        nbytes = len(doc.text.encode("utf-8", "surrogatepass"))
        ledger.took(STAGE, source, kind, 1, nbytes)
        verdict: tuple[str, str] | None = None
        error = ""
        for flt in filters:
            try:
                kept, reason = flt(doc)
            except Exception as exc:  # one bad document never stops the unit
                verdict = ("errored", f"{flt.name}:{type(exc).__name__}")
                error = f"{type(exc).__name__}: {exc}"
                break
            if not kept:
                verdict = ("dropped", reason or flt.name)
                break
        clock[0] += time.perf_counter() - started
        if verdict is None:
            ledger.kept(STAGE, source, kind, 1, len(doc.text.encode("utf-8", "surrogatepass")))
            yield doc
        elif verdict[0] == "dropped":
            ledger.dropped(STAGE, source, kind, verdict[1], 1, nbytes)
            audit.dropped(verdict[1], doc.id, source, doc.text, audit_metadata(doc.metadata))
        else:
            ledger.poison(STAGE, source, kind, verdict[1], nbytes, doc_id=doc.id, locator=doc.metadata["locator"],
                          error=error)


def redact_pii(docs: Iterator[Document], redactor, ledger: Ledger, seconds: dict[str, float]) -> Iterator[Document]:
    """PII replaced in every kept document of the kinds configured, counts per source and kind of PII in the
    ledger's tallies (``pii_replaced``, ``pii_documents``); the kept bytes follow the redacted text."""
    from pipeline.filters.pii import pii_tallies

    for doc in docs:
        source, kind = doc.metadata["source"], doc.metadata["source_kind"]
        if redactor.applies_to(kind):
            started = time.perf_counter()
            before = len(doc.text.encode("utf-8", "surrogatepass"))
            doc.text, counts = redactor.redact(doc.text)
            delta = len(doc.text.encode("utf-8", "surrogatepass")) - before
            if delta:
                ledger.kept(STAGE, source, kind, 0, delta)
            for group, key, value in pii_tallies(counts):
                ledger.tally(STAGE, source, group, key, value)
            seconds["pii"] = seconds.get("pii", 0.0) + time.perf_counter() - started
        yield doc


def unwritable(ledger: Ledger) -> Callable[[Document, Exception], None]:
    """What to do with a kept document the writer cannot write: errored and quarantined instead of kept."""

    def reject(doc: Document, exc: Exception) -> None:
        source, kind = doc.metadata["source"], doc.metadata["source_kind"]
        nbytes = len(doc.text.encode("utf-8", "surrogatepass"))
        ledger.kept(STAGE, source, kind, -1, -nbytes)
        ledger.poison(STAGE, source, kind, f"unwritable:{type(exc).__name__}", nbytes, doc_id=doc.id,
                      locator=doc.metadata.get("locator", ""), error=f"{type(exc).__name__}: {exc}")

    return reject


class CrawlFilterStage(MapStage):
    name = STAGE

    def __init__(self, config: PipelineConfig):
        self.config = config
        self.fingerprint = config.fingerprint()

    def domains_path(self, run_dir: Path, unit: Unit) -> Path:
        """Web units: pages per (source, domain) and outcome, partitioned for the run's domain statistics."""
        return self.stage_dir(run_dir) / DOMAINS_DIR / f"{unit.id}.arrow"

    def unit_outputs(self, run_dir: Path, unit: Unit, result: dict[str, Any]) -> list[Path]:
        return [p for p in (self.output_path(run_dir, unit), self.domains_path(run_dir, unit)) if p.exists()]

    def _reader(self, unit: Unit):
        source = self.config.source(unit.source)
        return worker_cached((STAGE, self.fingerprint, "reader", source.name), lambda: reader_for(source))

    def _filters(self, kind: str):
        if kind == "web":
            from pipeline.filters.web import WebCrawlFilter

            return worker_cached((STAGE, self.fingerprint, "web"), lambda: WebCrawlFilter(self.config.crawl_filter,
                                                                                          STAGE))
        return worker_cached((STAGE, self.fingerprint, "filters", kind),
                             lambda: build_filters(kind, self.config.crawl_filter))

    def _redactor(self):
        from pipeline.filters.pii import PIIRedactor

        return worker_cached((STAGE, self.fingerprint, "pii"), lambda: PIIRedactor(self.config.crawl_filter.pii))

    def run_unit(self, unit: Unit, run_dir: Path) -> dict[str, Any]:
        reader, filters = self._reader(unit), self._filters(unit.kind)
        ledger = Ledger()
        started = time.perf_counter()
        read_clock = [0.0]

        def documents() -> Iterator[Document]:
            for file in unit.files:
                pages = reader.read(file, ledger)
                while True:
                    t0 = time.perf_counter()
                    doc = next(pages, None)
                    read_clock[0] += time.perf_counter() - t0
                    if doc is None:
                        break
                    if doc.metadata.get("unicode_repaired"):
                        ledger.tally(READ_STAGE, unit.source, "repaired", "lone_surrogates",
                                     doc.metadata["unicode_repaired"])
                    yield doc

        steps: dict[str, float] = {}  # seconds per step, for the per-step breakdown in stats.json
        clock = [0.0]
        audit_cfg = self.config.audit
        audit = UnitAudit(audit_cfg.dropped_per_reason, audit_cfg.dropped_max_chars, domains=unit.kind == "web")
        if unit.kind == "web":
            kept = filters.run(documents(), ledger, steps, audit)
        else:
            kept = apply_filters(documents(), filters, ledger, clock, audit)
        redactor = self._redactor()
        if redactor.applies_to(unit.kind):
            kept = redact_pii(kept, redactor, ledger, steps)
        count, nbytes = write_documents(self.output_path(run_dir, unit), kept, reject=unwritable(ledger))
        self.write_quarantine(run_dir, unit, ledger)
        audit.sampler.write(self.dropped_path(run_dir, unit))
        if audit.domains is not None:
            audit.domains.write(self.domains_path(run_dir, unit), audit_cfg.domain_partitions)
        total = time.perf_counter() - started
        if unit.kind != "web":
            steps["filters"] = clock[0]
        steps["read"] = read_clock[0]
        steps["write"] = max(0.0, total - sum(steps.values()))
        filter_seconds = max(0.0, total - read_clock[0])
        for step, seconds in steps.items():
            ledger.tally(STAGE, unit.source, "step_seconds", step, seconds)
        ledger.add_seconds(STAGE, unit.source, filter_seconds)
        ledger.add_seconds(READ_STAGE, unit.source, read_clock[0])
        return {"ledger": ledger.to_json(), "documents": count, "bytes": nbytes}
