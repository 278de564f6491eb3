"""Crawl filters on real text: books, Python's docs, gettext catalogs, the CPython standard library."""

from __future__ import annotations

import gettext
import re
from pathlib import Path

import pytest

from pipeline.config import CrawlFilterConfig, LanguageStep, parse_config
from pipeline.document import make_document
from pipeline.filters import code
from pipeline.filters.language import LanguageID
from pipeline.filters.registry import build_filters, url_filter
from pipeline.filters.web import TextStep, build_text_steps, run_text_steps
from pipeline.ledger import Ledger
from pipeline.stages.crawl_filter import apply_filters

pytestmark = pytest.mark.realdata


def run_filters(filters, doc):
    for flt in filters:
        kept, reason = flt(doc)
        if not kept:
            return reason
    return None


def gettext_text(locale: str, min_chars: int = 3000) -> str:
    strings: list[str] = []
    for mo in sorted(Path(f"/usr/share/locale/{locale}/LC_MESSAGES").glob("*.mo")):
        try:
            with open(mo, "rb") as fh:
                catalog = gettext.GNUTranslations(fh)._catalog  # noqa: SLF001 - stdlib's parsed catalog
        except OSError:
            continue
        strings += [v for v in catalog.values() if isinstance(v, str) and len(v) > 40]
        if sum(map(len, strings)) > min_chars:
            break
    if sum(map(len, strings)) < min_chars:
        pytest.skip(f"not enough {locale} gettext catalogs on this machine")
    return "\n".join(strings)


@pytest.fixture(scope="module")
def austen(corpus) -> str:
    return (corpus.root / "books/austen-northangerabbey.txt").read_text()


def chapter(text: str, index: int = 3) -> str:
    return text.split("CHAPTER")[index].strip()


def unwrapped(text: str) -> str:
    """Gutenberg hard-wraps at 70 columns; a web page's extracted text has one line per paragraph."""
    return re.sub(r"(?<!\n)\n(?!\n)", " ", text)


def web_doc(text: str, url: str = "http://books.example.org/chapter.html"):
    return make_document(text, "web", "web", url, url=url)


def test_language_id_keeps_english_and_labels_everything(lid_model, austen):
    lid = LanguageID(LanguageStep(model=str(lid_model)))
    doc = web_doc(chapter(austen))
    assert lid(doc) == (True, None)
    assert doc.metadata["language"] == "en" and doc.metadata["language_score"] > 0.9
    for locale, code_ in (("fr", "fr"), ("de", "de")):
        foreign = web_doc(gettext_text(locale))
        assert lid(foreign) == (False, "language_id")
        assert foreign.metadata["language"] == code_


def test_language_id_can_keep_several_languages(lid_model):
    lid = LanguageID(LanguageStep(model=str(lid_model), languages=["en", "fr"], threshold=0.5))
    assert lid(web_doc(gettext_text("fr")))[0]


def test_missing_lid_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="language-ID model not found"):
        LanguageID(LanguageStep(model=str(tmp_path / "nope.ftz")))


def test_web_text_filters_keep_prose_and_drop_an_index_page(lid_model, austen, python_docs_html):
    from resiliparse.extract.html2text import extract_plain_text

    cfg = CrawlFilterConfig.model_validate({"web": {"language": {"model": str(lid_model)}}})
    steps = build_text_steps(cfg)
    assert [s.name for s in steps] == ["language_id", "c4", "fineweb", "gopher_repetition", "gopher_quality",
                                       "badwords"]
    prose = web_doc(unwrapped(chapter(austen, 4)))
    assert run_text_steps(prose, steps, {}) == ("kept", None)
    # chapter 5 holds one word of C4's English list (in its ordinary sense): C4's filter drops it
    assert run_text_steps(web_doc(unwrapped(chapter(austen, 5))), steps, {}) == (
        "dropped", "badwords:document_removed_with_badwords")
    index_html = (python_docs_html / "genindex-A.html").read_text()
    index = web_doc(extract_plain_text(index_html, main_content=True), "http://docs.example.org/genindex-A.html")
    outcome, reason = run_text_steps(index, steps, {})
    assert outcome == "dropped" and (":" in reason or reason == "language_id")


def test_web_text_steps_read_the_text_fineweb_gives_them(lid_model, austen):
    """C4 edits; FineWeb reads C4's text, the others the extracted text; the document leaves with C4's."""
    cfg = CrawlFilterConfig.model_validate({"web": {"language": {"model": str(lid_model)}}})
    seen: dict[str, str] = {}

    def spy(name, run):
        def call(doc):
            seen[name] = doc.text
            return run(doc)
        return call

    steps = [TextStep(s.name, spy(s.name, s.run), s.reads_edited, s.edits) for s in build_text_steps(cfg)]
    text = unwrapped(chapter(austen, 4)) + "\nshort\nPlease enable JavaScript to view this page."
    doc = web_doc(text)
    assert run_text_steps(doc, steps, {})[0] == "kept"
    assert seen["language_id"] == seen["gopher_repetition"] == seen["gopher_quality"] == seen["c4"] == text
    assert seen["fineweb"] == doc.text != text and "JavaScript" not in doc.text and "\nshort" not in doc.text
    assert seen["badwords"] == doc.text  # C4's output, as C4 runs its bad-words filter


def test_shared_spacy_words_equal_datatrove_words_across_rebuilds(austen):
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    from pipeline.filters.web import SpacyWords

    words = SpacyWords("en", max_lexemes=50)  # rebuilt after almost every text
    reference = load_word_tokenizer("en")
    texts = [chapter(austen, i) for i in range(1, 6)] + ["IS_ALPHA breaks spaCy", "e-mail: a@b.org, U.S.A. 3.5%"]
    for text in texts:
        assert words.word_tokenize(text) == reference.word_tokenize(text)
    assert words.rebuilds > 1 and words.sent_tokenize(texts[0]) == reference.sent_tokenize(texts[0])
    # datatrove's quirk, made deterministic: a text holding the token IS_ALPHA always loses it
    assert words.word_tokenize("IS_ALPHA breaks spaCy") == ["breaks", "spaCy"] == words.word_tokenize(
        "IS_ALPHA breaks spaCy")


def test_url_filter_params_reach_datatrove(lid_model, austen):
    cfg = parse_config({
        "sources": [{"name": "w", "kind": "web", "paths": ["/"]}],
        "crawl_filter": {"web": {"url": {"params": {"extra_domains": ["blocked-site.org"]}},
                                 "language": {"model": str(lid_model)}}},
    }).crawl_filter
    url = url_filter(cfg.web.url.params)
    assert url(web_doc(chapter(austen), "https://www.blocked-site.org/a.html")) == (False, "url:domain")
    assert url(web_doc(chapter(austen), "https://www.example.org/a.html")) == (True, None)


def test_book_filters(lid_model, austen):
    cfg = CrawlFilterConfig.model_validate({"book": {"language": {"model": str(lid_model)}, "min_words": 1000}})
    filters = build_filters("book", cfg)
    book = make_document(austen, "b", "book", "austen")
    assert run_filters(filters, book) is None and book.metadata["words"] > 50_000
    assert run_filters(filters, make_document(chapter(austen)[:3000], "b", "book", "x")) == "book_too_short"
    tripled = make_document("\n\n".join([chapter(austen, 2)] * 3), "b", "book", "x3")
    assert run_filters(filters, tripled).startswith("repetition:")


def stdlib_sources(corpus) -> list[str]:
    return [p.read_text() for p in sorted((corpus.root / "code").rglob("*.py"))]


def test_code_filters_keep_real_code(corpus):
    filters = build_filters("code", CrawlFilterConfig())
    texts = stdlib_sources(corpus)
    for text in texts:
        doc = make_document(text, "c", "code", "x")
        assert run_filters(filters, doc) is None
        assert 0.25 < doc.metadata["alphanum_fraction"] < 1
    assert len(texts) >= 5


def test_code_filters_drop_generated_minified_and_oversized(corpus):
    filters = build_filters("code", CrawlFilterConfig())
    real = stdlib_sources(corpus)[0]
    generated = "# Code generated by protoc-gen-go. DO NOT EDIT.\n" + real
    assert run_filters(filters, make_document(generated, "c", "code", "g")) == "code_autogenerated"
    one_line = " ".join(real.split())
    assert run_filters(filters, make_document(one_line, "c", "code", "m")) == "code_max_line_length"
    squeezed = "\n".join("".join(real.split())[i:i + 400] for i in range(0, 8000, 400))
    assert code.Minified()(make_document(squeezed, "c", "code", "m")) == (False, "code_minified")
    symbols = "\n".join(["#" * 20 + " -> " + "=" * 20] * 50)
    assert run_filters(filters, make_document(symbols, "c", "code", "s")) == "code_alphanum_fraction"
    big = code.FileSize(32, 1000)
    assert big(make_document(real, "c", "code", "b")) == (False, "code_file_too_large")
    assert big(make_document("x = 1\n", "c", "code", "t")) == (False, "code_file_too_small")


def test_a_filter_that_raises_errors_only_that_document(austen):
    class Explodes:
        name = "explodes"

        def __call__(self, doc):
            if "boom" in doc.text:
                raise RuntimeError("bad document")
            return True, None

    docs = [make_document(t, "s", "book", str(i)) for i, t in enumerate([chapter(austen), "boom", chapter(austen, 4)])]
    ledger = Ledger()
    kept = list(apply_filters(iter(docs), [Explodes()], ledger, [0.0]))
    assert [d.metadata["locator"] for d in kept] == ["0", "2"]
    entry = ledger.stats(["crawl_filter"])["stages"]["crawl_filter"]["s"]
    assert entry["errored"] == {"explodes:RuntimeError": 1} and entry["in"] == 3 and entry["kept"] == 2
