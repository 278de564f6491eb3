"""The web crawl filter on the web benchmark corpus (every other of its ~2,650 real pages, in every WARC, to
keep the suite's time): the same keep/drop decision and the same text as datatrove's filter objects run
unmodified in FineWeb's order; URL before extraction."""

from __future__ import annotations

import copy
from collections import Counter
from urllib.parse import urlparse

import pytest
from datatrove.data import Document

from pipeline.config import CrawlFilterConfig, SourceConfig, parse_config
from pipeline.extract import ExtractSettings, HtmlToText
from pipeline.filters.web import build_text_steps, run_text_steps
from pipeline.ledger import Ledger
from pipeline.sources import reader_for
from pipeline.sources.base import InputFile, Unit

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def extracted(web_corpus) -> list[Document]:
    reader = reader_for(SourceConfig(name="web", kind="web", paths=[str(web_corpus.root)]))
    to_text = HtmlToText(ExtractSettings())
    docs = []
    for warc in web_corpus.warcs:
        pages = reader.read(InputFile(str(warc), warc.name, warc.stat().st_size), Ledger())
        for k, page in enumerate(pages):
            if k % 2:
                continue
            result = to_text(page.body, page.header_charset)
            if result.outcome == "kept":
                docs.append(Document(text=result.text, id=page.id, metadata=dict(page.metadata)))
    assert len(docs) >= 1000
    return docs


def datatrove_fineweb(cfg: CrawlFilterConfig, lid_model, badwords=None):
    """datatrove's objects in FineWeb's order, with the configured params, called as datatrove calls them;
    then C4's bad-words filter (``badwords``: datatrove's object with its lists), on C4's output as in C4."""
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
        LanguageFilter,
    )

    from pipeline.filters.language import load_lid_model

    web = cfg.web
    language = LanguageFilter(languages=web.language.languages, language_threshold=web.language.threshold)
    language.model._model = load_lid_model(str(lid_model))
    return [("language_id", language), ("gopher_repetition", GopherRepetitionFilter(**web.gopher_repetition.params)),
            ("gopher_quality", GopherQualityFilter(**web.gopher_quality.params)),
            ("c4", C4QualityFilter(**web.c4.params)), ("fineweb", FineWebQualityFilter(**web.fineweb.params)),
            *([("badwords", badwords)] if badwords is not None else [])]


def reference_verdict(doc: Document, filters) -> str | None:
    for name, flt in filters:
        result = flt.filter(doc)
        if not (result[0] if isinstance(result, tuple) else result):
            return name
    return None


def test_decisions_and_texts_equal_datatrove_in_fineweb_order(extracted, lid_model, tmp_path, monkeypatch):
    from pipeline.realdata import badwords_lists
    from tests.test_filters_badwords import datatrove_reference

    cfg = CrawlFilterConfig.model_validate({"web": {"language": {"model": str(lid_model)}}})
    badwords = datatrove_reference(badwords_lists(), tmp_path, monkeypatch, **cfg.web.badwords.params)
    reference = datatrove_fineweb(cfg, lid_model, badwords)
    ours = build_text_steps(cfg)
    theirs_docs, our_docs = copy.deepcopy(extracted), copy.deepcopy(extracted)
    mismatches, kept, reasons = [], 0, set()
    for theirs, mine in zip(theirs_docs, our_docs):
        dropped_by = reference_verdict(theirs, reference)
        outcome, reason = run_text_steps(mine, ours, {})
        assert outcome != "errored", reason
        if (dropped_by is None) != (outcome == "kept") or (dropped_by is None and theirs.text != mine.text):
            mismatches.append((mine.metadata["url"], dropped_by, reason))
        kept += outcome == "kept"
        if reason:
            reasons.add(reason.split(":")[0])
        if outcome == "kept":
            assert mine.metadata["language"] == theirs.metadata["language"] == "en"
    print(f"{len(extracted)} pages, {kept} kept")
    assert mismatches == []
    assert 100 < kept < len(extracted) - 500  # the corpus exercises both outcomes ...
    assert reasons >= {"language_id", "c4", "fineweb", "gopher_repetition", "gopher_quality"}  # ... and every step
    bounded = {s.name: s.run for s in ours}
    assert bounded["c4"].rechecks > 0  # the lower bound was inconclusive sometimes, and was re-checked


def test_url_filter_runs_before_extraction(web_corpus, tmp_path, lid_model, monkeypatch):
    from pipeline.extract.sandbox import PageExtractor
    from pipeline.stages.crawl_filter import CrawlFilterStage

    warc = web_corpus.root / "charsets/charsets.warc.gz"
    reader = reader_for(SourceConfig(name="w", kind="web", paths=[str(warc)]))
    pages = list(reader.read(InputFile(str(warc), warc.name, warc.stat().st_size), Ledger()))
    blocked = [p.metadata["url"] for p in pages[::3]]
    extracted_bodies: list[int] = []
    real = PageExtractor.extract_many

    def counting(self, batch):
        extracted_bodies.extend(len(body) for body, _ in batch)
        return real(self, batch)

    monkeypatch.setattr(PageExtractor, "extract_many", counting)
    cfg = parse_config({"sources": [{"name": "w", "kind": "web", "paths": [str(warc)]}],
                        "crawl_filter": {"web": {"url": {"params": {"extra_urls": blocked}},
                                                 "language": {"model": str(lid_model)}}}})
    unit = Unit("w-00000", "w", "web", (InputFile(str(warc), warc.name, warc.stat().st_size),))
    stats = Ledger.from_json(CrawlFilterStage(cfg).run_unit(unit, tmp_path)["ledger"]).stats(["read", "crawl_filter"])
    entry = stats["stages"]["crawl_filter"]["w"]
    assert entry["dropped"]["url:url"] == len(blocked) and entry["in"] == len(pages)
    assert len(extracted_bodies) == len(pages) - len(blocked)  # blocked pages were never extracted
    # the charsets found, per source, in stats: each extracted page's true encoding
    codec = {c["path"]: c["codec"] for c in web_corpus.charset_cases}
    expected = Counter(codec[urlparse(p.metadata["url"]).path] for p in pages if p.metadata["url"] not in blocked)
    assert entry["charset"] == dict(expected) and len(expected) == 6
    assert set(entry["step_seconds"]) >= {"read", "url", "extract", "language_id", "write"}
