"""The web crawl filter: URL first, then decode + extract (bounded per page), then datatrove's text filters
run as they are, with their work shared and ordered by cost.

Order actually run (a drop's reason is the first failing step of this order):

    url → extraction → language_id → c4 → fineweb → gopher_repetition → gopher_quality → badwords

FineWeb's order is url → extraction → language_id → gopher_repetition → gopher_quality → c4 → fineweb
(FineWeb has no bad-words step; C4 runs it last, on its cleaned text, and so does this chain).
Every step is a pure test of the text it reads, and only C4 edits (it removes lines), so any order gives
the same keep/drop decision provided each step reads the same text as in FineWeb: language ID, both Gopher
filters and C4 read the extracted text, FineWeb and bad words read C4's output (the text that is kept).
The chain keeps both texts and hands each step its own; the document leaves with C4's text, as in FineWeb.

The cost moves:

* URL before extraction: pages it drops are never decoded or extracted.
* Language ID (fastText, ~1–3 ms) first among text filters: on a multilingual crawl it drops most pages.
* Bad words (``pipeline.filters.badwords``: datatrove's ``C4BadWordsFilter`` behind an exact pre-check)
  last: ~0.5–0.8 ms a page and it drops few (none of the 102 English pages reaching it in
  ``bench/filters_cost.py``'s sample, 18 of 663 over all languages), so it costs least where fewest pages
  are left.
* C4 and FineWeb are run as datatrove's objects, first with a *lower-bound tokenizer* handed in through
  their ``language`` argument (datatrove accepts a ``WordTokenizer`` there): one sentence per line for C4,
  whitespace-separated chunks for FineWeb's word count. spaCy gives at least one sentence per non-empty
  line and at least one word per whitespace-separated chunk, so C4's sentence count and FineWeb's word
  count can only grow with the real tokenizer, and each check they feed (C4: at least 5 sentences;
  FineWeb: newlines / words ≤ 0.3) can only pass more often. A pass with the bound is therefore the real
  answer; a ``too_few_sentences`` or ``list_ratio`` drop is re-checked with the real tokenizer on the same
  text. C4 no longer sentence-splits every kept line (its ~11 ms), FineWeb no longer re-splits C4's text
  into words unless the bound is inconclusive.
* One word split per text, and a cheaper one: every filter that needs spaCy's words gets the same
  ``SpacyWords`` tokenizer (through ``language`` again), and datatrove memoises ``split_into_words`` on
  (text, tokenizer), so the two Gopher filters, which run back to back on the same text, split it once.
  ``SpacyWords`` returns exactly datatrove's words for half the cost (measured 19 → 8–11 ms on a 9.5 K
  character page): it calls spaCy's tokenizer alone, without the sentencizer pass datatrove's call also
  runs, and keeps spaCy's lexeme cache between documents (datatrove frees it after each one in a memory
  zone), rebuilding the pipeline when the cache passes ``max_lexemes`` (200,000: ~100 MB measured) so
  memory stays bounded.

The decisions equal datatrove's filter objects run unmodified in FineWeb's order (tested on the whole
benchmark corpus: ``tests/test_web_filters.py``). With ``word_splitter: detected`` the word steps split
each page for its detected language (``pipeline.filters.splitters``; ``tests/test_multilingual.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from datatrove.data import Document
from datatrove.utils.word_tokenizers import WordTokenizer

from pipeline.audit import UnitAudit, audit_metadata
from pipeline.config import CrawlFilterConfig
from pipeline.extract import ExtractSettings, PageExtractor
from pipeline.filters.base import Verdict, datatrove_verdict
from pipeline.ledger import Ledger

TEXT_ORDER = ("language", "c4", "fineweb", "gopher_repetition", "gopher_quality", "badwords")
FINEWEB_ORDER = ("language", "gopher_repetition", "gopher_quality", "c4", "fineweb", "badwords")


class LowerBoundTokenizer(WordTokenizer):
    """Cheap counts that never exceed spaCy's: one sentence per text, whitespace chunks as words.

    ``IS_ALPHA`` is removed first because datatrove's spaCy wrapper does that when the string breaks spaCy;
    removing it can only merge or remove chunks, so the count stays a lower bound either way.
    """

    def word_tokenize(self, text: str) -> list[str]:
        return text.replace("IS_ALPHA", "").split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


class SpacyWords(WordTokenizer):
    """datatrove's spaCy words, cheaper (see the module doc); sentences come from datatrove's own tokenizer."""

    def __init__(self, language: str, max_lexemes: int = 200_000):
        from datatrove.utils.word_tokenizers import load_word_tokenizer

        super().__init__(language)
        self.reference = load_word_tokenizer(language)  # datatrove's process-wide instance
        # datatrove's words for a text holding the token "IS_ALPHA" depend on the process's history: the
        # first such text keeps it, every later one raises inside spaCy and is re-split without it. One call
        # here puts the shared instance in that steady state, so the result never depends on which unit a
        # worker happened to process first.
        self.reference.word_tokenize("IS_ALPHA")
        self.max_lexemes = max_lexemes
        self._nlp = None
        self.rebuilds = 0

    def _pipeline(self):
        if self._nlp is None or len(self._nlp.vocab) > self.max_lexemes:
            import spacy

            self._nlp = spacy.blank(self.reference.language)   # "de" for the table key "deu_Latn"
            self.rebuilds += 1
        return self._nlp

    def word_tokenize(self, text: str) -> list[str]:
        from datatrove.utils.word_tokenizers import strip_strings

        if "IS_ALPHA" in text:  # the string that breaks spaCy: datatrove's own handling, verbatim
            return self.reference.word_tokenize(text)
        return strip_strings([token.text for token in self._pipeline().tokenizer(text)])

    def sent_tokenize(self, text: str) -> list[str]:
        return self.reference.sent_tokenize(text)

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return self.reference.span_tokenize(text)


def shared_words(language: str, cache: dict[str, Any]) -> Any:
    """The ``language`` argument to hand datatrove's filters: one ``SpacyWords`` per language where datatrove
    uses a plain spaCy tokenizer; the language name itself (datatrove's own tokenizer) elsewhere."""
    from datatrove.utils.word_tokenizers import SpaCyTokenizer, load_word_tokenizer

    if language not in cache:
        reference = load_word_tokenizer(language)
        plain = isinstance(reference, SpaCyTokenizer) and reference.config is None
        cache[language] = SpacyWords(language) if plain else language
    return cache[language]


class BoundedThenExact:
    """A datatrove filter run with the lower-bound tokenizer, re-run with the real one when inconclusive."""

    def __init__(self, name: str, bounded: Any, exact: Any, inconclusive: frozenset[str]):
        self.name = name
        self.bounded = bounded
        self.exact = exact
        self.inconclusive = inconclusive
        self.rechecks = 0

    def __call__(self, doc: Document) -> Verdict:
        text = doc.text
        try:
            kept, reason = datatrove_verdict(self.bounded.filter(doc))
        except ZeroDivisionError:  # a bound of zero words: ask the real tokenizer
            kept, reason = False, next(iter(self.inconclusive))
        if not kept and reason in self.inconclusive:
            self.rechecks += 1
            doc.text = text
            kept, reason = datatrove_verdict(self.exact.filter(doc))
        if kept:
            return True, None
        return False, f"{self.name}:{reason}" if reason else self.name


@dataclass(frozen=True)
class TextStep:
    name: str
    run: Callable[[Document], Verdict]
    reads_edited: bool = False  # reads C4's output rather than the extracted text
    edits: bool = False         # rewrites doc.text


def run_text_steps(doc: Document, steps: list[TextStep], seconds: dict[str, float]) -> tuple[str, str | None]:
    """("kept", None), ("dropped", reason) or ("errored", reason); on keep, ``doc.text`` is the edited text.
    An error's message is left in ``doc.metadata["error"]`` for the quarantine."""
    original = edited = doc.text
    for step in steps:
        doc.text = edited if step.reads_edited else original
        started = time.perf_counter()
        try:
            kept, reason = step.run(doc)
        except Exception as exc:  # one bad document never stops the unit
            doc.metadata["error"] = f"{type(exc).__name__}: {exc}"
            return "errored", f"{step.name}:{type(exc).__name__}"
        finally:
            seconds[step.name] = seconds.get(step.name, 0.0) + time.perf_counter() - started
        if step.edits:
            edited = doc.text
        if not kept:
            return "dropped", reason or step.name
    doc.text = edited
    return "kept", None


def build_text_steps(cfg: CrawlFilterConfig, order: tuple[str, ...] = TEXT_ORDER,
                     bounded: bool = True) -> list[TextStep]:
    """The web text filters in ``order``; ``bounded=False`` builds datatrove's objects as configured, with
    datatrove's own tokenizer and no lower bounds (the plain reference)."""
    from pipeline.filters.badwords import BadWords
    from pipeline.filters.language import LanguageID

    web = cfg.web
    steps: list[TextStep] = []
    words: dict[str, Any] = {}
    splitters = None
    if web.word_splitter == "detected":
        from pipeline.filters.splitters import LanguageSplitters

        def build(key: str, language_words: dict, step: str) -> Callable[[Document], Verdict]:
            return word_step(step, getattr(web, step).params, key, bounded, language_words)

        splitters = LanguageSplitters(build)
    for name in order:
        spec = getattr(web, name)
        if not spec.enabled:
            continue
        if name == "language":
            steps.append(TextStep("language_id", LanguageID(spec)))
            continue
        if name == "badwords":  # on C4's output, as C4 runs it; bounded=False: datatrove's regex alone
            steps.append(TextStep(name, BadWords(spec.params, precheck=bounded), reads_edited=True))
            continue
        language = spec.params.get("language", "en")
        run = word_step(name, spec.params, language, bounded, words)
        if splitters is not None and name in WORD_STEPS:
            run = splitters.step(name, run, language)   # the page's detected language's splitter
        steps.append(TextStep(name, run, reads_edited=name == "fineweb", edits=name == "c4"))
    return steps


WORD_STEPS = frozenset({"c4", "fineweb", "gopher_repetition", "gopher_quality"})   # split with `language`


def word_step(name: str, params: dict[str, Any], language: str, bounded: bool,
              words: dict[str, Any]) -> Callable[[Document], Verdict]:
    """datatrove's filter ``name`` with ``params``, splitting words for ``language`` (a language or a key of
    datatrove's tokenizer table). Bounded: ``SpacyWords`` where datatrove uses plain spaCy, and for C4 and
    FineWeb the lower-bound first, which is a bound of spaCy's counts only (other splitters run exact)."""
    from pipeline.filters.base import DatatroveFilter
    from pipeline.filters.registry import datatrove_impl

    params = {**params, "language": shared_words(language, words) if bounded else language}
    exact = datatrove_impl("web", name, params)
    if bounded and name in ("c4", "fineweb") and isinstance(params["language"], SpacyWords):
        fast = datatrove_impl("web", name, {**params, "language": LowerBoundTokenizer("en")})
        reason = "too_few_sentences" if name == "c4" else "list_ratio"
        return BoundedThenExact(name, fast, exact, frozenset({reason}))
    return DatatroveFilter(name, exact)


class WebCrawlFilter:
    """Pages in, kept documents out; books every page of the crawl-filter stage in the ledger."""

    def __init__(self, cfg: CrawlFilterConfig, stage: str):
        from pipeline.filters.registry import url_filter

        web = cfg.web
        self.stage = stage
        self.url = url_filter(web.url.params) if web.url.enabled else None
        extraction = web.extraction
        self.batch_pages = extraction.batch_pages
        self.extractor = PageExtractor(
            ExtractSettings(extractor=web.extractor, resiliparse=dict(extraction.resiliparse),
                            trafilatura=dict(extraction.trafilatura),
                            max_replacement_fraction=extraction.max_replacement_fraction),
            extraction.timeout_s)
        self.steps = build_text_steps(cfg)
        self.badwords = next((step.run for step in self.steps if step.name == "badwords"), None)

    def run(self, pages: Iterator[Document], ledger: Ledger, seconds: dict[str, float],
            audit: UnitAudit | None = None) -> Iterator[Document]:
        audit = audit or UnitAudit(0, 0)
        batch: list[Document] = []
        for page in pages:
            meta = page.metadata
            ledger.took(self.stage, meta["source"], meta["source_kind"], 1, len(page.body))
            if self.url is not None:
                started = time.perf_counter()
                try:
                    kept, reason = self.url(page)
                except Exception as exc:  # noqa: BLE001 - e.g. a page without a URL
                    kept, reason = None, f"url:{type(exc).__name__}"
                    page.metadata["error"] = f"{type(exc).__name__}: {exc}"
                seconds["url"] = seconds.get("url", 0.0) + time.perf_counter() - started
                if kept is None:
                    self._poison(ledger, page, reason, len(page.body), audit)
                    continue
                if not kept:
                    ledger.dropped(self.stage, meta["source"], meta["source_kind"], reason or "url", 1,
                                   len(page.body))
                    audit.dropped(reason or "url", page.id, meta["source"], "", audit_metadata(meta))
                    continue
            batch.append(page)
            if len(batch) >= self.batch_pages:
                yield from self._extract_and_filter(batch, ledger, seconds, audit)
                batch = []
        if batch:
            yield from self._extract_and_filter(batch, ledger, seconds, audit)
        if self.badwords is not None:  # pages kept because their language has no list, per language
            for (source, lang), n in sorted(self.badwords.take_counts().items()):
                ledger.tally(self.stage, source, "badwords_no_list", lang, n)

    def _extract_and_filter(self, pages: list[Document], ledger: Ledger,
                            seconds: dict[str, float], audit: UnitAudit) -> Iterator[Document]:
        started = time.perf_counter()
        results = self.extractor.extract_many([(p.body, p.header_charset) for p in pages])
        seconds["extract"] = seconds.get("extract", 0.0) + time.perf_counter() - started
        for page, result in zip(pages, results):
            source, kind = page.metadata["source"], page.metadata["source_kind"]
            nbytes = len(page.body)
            if result.charset:
                ledger.tally(self.stage, source, "charset", result.charset)
                ledger.tally(self.stage, source, "charset_method", result.charset_method)
            if result.outcome == "dropped":
                ledger.dropped(self.stage, source, kind, result.reason, 1, nbytes)
                audit.dropped(result.reason, page.id, source, "", audit_metadata(page.metadata))
                continue
            if result.outcome == "errored":
                page.metadata["error"] = result.reason
                self._poison(ledger, page, result.reason, nbytes, audit)
                continue
            doc = Document(text=result.text, id=page.id, metadata={**page.metadata, "charset": result.charset,
                                                                    "charset_method": result.charset_method})
            extracted = doc.text
            outcome, reason = run_text_steps(doc, self.steps, seconds)
            self._tally_splitter(ledger, source, doc)
            if outcome == "kept":
                ledger.kept(self.stage, source, kind, 1, len(doc.text.encode("utf-8", "surrogatepass")))
                audit.kept(source, doc.metadata)
                yield doc
            elif outcome == "dropped":
                ledger.dropped(self.stage, source, kind, reason, 1, nbytes)
                audit.dropped(reason, doc.id, source, extracted, audit_metadata(doc.metadata))
            else:
                self._poison(ledger, doc, reason, nbytes, audit)

    def _tally_splitter(self, ledger: Ledger, source: str, doc: Document) -> None:
        """The word splitter a page's language got (``word_splitter: detected``), off the document."""
        from pipeline.filters.splitters import FALLBACK_KEY, USED_KEY

        for key in (USED_KEY, FALLBACK_KEY):
            value = doc.metadata.pop(key, None)
            if value is not None:
                ledger.tally(self.stage, source, key, value)

    def _poison(self, ledger: Ledger, doc: Document, reason: str, nbytes: int, audit: UnitAudit) -> None:
        meta = doc.metadata
        audit.errored(meta["source"], meta)
        ledger.poison(self.stage, meta["source"], meta["source_kind"], reason, nbytes, doc_id=doc.id,
                      locator=meta["locator"], error=meta.pop("error", reason))
