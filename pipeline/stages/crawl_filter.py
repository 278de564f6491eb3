"""Stage 1: read raw sources and crawl-filter them (URL, language ID, Gopher/C4/FineWeb, book, code)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datatrove.data import Document

from pipeline.config import PipelineConfig
from pipeline.document import write_documents
from pipeline.filters.registry import build_filters
from pipeline.ledger import Ledger
from pipeline.sources import reader_for
from pipeline.sources.base import READ_STAGE, Unit
from pipeline.stages.base import MapStage, worker_cached

STAGE = "crawl_filter"


def apply_filters(docs: Iterator[Document], filters: list, ledger: Ledger, clock: list[float]) -> Iterator[Document]:
    """Run each document through the filters in order; every document ends kept, dropped or errored."""
    for doc in docs:
        started = time.perf_counter()
        source, kind = doc.metadata["source"], doc.metadata["source_kind"]
        nbytes = len(doc.text.encode("utf-8", "surrogatepass"))
        ledger.took(STAGE, source, kind, 1, nbytes)
        verdict: tuple[str, str] | None = None
        for flt in filters:
            try:
                kept, reason = flt(doc)
            except Exception as exc:  # one bad document never stops the unit
                verdict = ("errored", f"{flt.name}:{type(exc).__name__}")
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
        else:
            ledger.errored(STAGE, source, kind, verdict[1], 1, nbytes)


class CrawlFilterStage(MapStage):
    name = STAGE

    def __init__(self, config: PipelineConfig):
        self.config = config
        self.fingerprint = config.fingerprint()

    def _tools(self, unit: Unit):
        source = self.config.source(unit.source)
        reader = worker_cached((STAGE, self.fingerprint, "reader", source.name), lambda: reader_for(source))
        filters = worker_cached((STAGE, self.fingerprint, "filters", source.kind),
                                lambda: build_filters(source.kind, self.config.crawl_filter))
        return reader, filters

    def run_unit(self, unit: Unit, run_dir: Path) -> dict[str, Any]:
        reader, filters = self._tools(unit)
        ledger = Ledger()
        filter_clock = [0.0]
        started = time.perf_counter()

        def documents() -> Iterator[Document]:
            for file in unit.files:
                yield from reader.read(file, ledger)

        count, nbytes = write_documents(self.output_path(run_dir, unit),
                                        apply_filters(documents(), filters, ledger, filter_clock))
        total = time.perf_counter() - started
        ledger.add_seconds(STAGE, unit.source, filter_clock[0])
        ledger.add_seconds(READ_STAGE, unit.source, max(0.0, total - filter_clock[0]))
        return {"ledger": ledger.to_json(), "documents": count, "bytes": nbytes}
