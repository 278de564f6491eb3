"""The bad-words step on real pages: datatrove's C4BadWordsFilter decides, its lists come from the npm
registry (never GitHub at run time), the pre-check never changes a decision, keep_fraction is deterministic
per document, languages without a list are kept and counted."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
from datatrove.data import Document

from pipeline.filters.badwords import BadWords, Precheck, document_uniform
from tests.conftest import real_data_unavailable

pytestmark = pytest.mark.realdata

REASON = "badwords:document_removed_with_badwords"


@pytest.fixture(scope="module")
def lists() -> Path:
    from pipeline.realdata import FetchError, badwords_lists

    try:
        return badwords_lists()
    except FetchError as exc:
        real_data_unavailable(str(exc))


def _extract(paths: list[Path], language: str, limit: int) -> list[Document]:
    from pipeline.extract import ExtractSettings, HtmlToText

    to_text = HtmlToText(ExtractSettings())
    docs = []
    for path in paths:
        result = to_text(path.read_bytes(), None)
        if result.outcome == "kept" and len(result.text) > 500:
            docs.append(Document(text=result.text, id=f"{language}:{path.name}",
                                 metadata={"language": language, "source": "docs"}))
        if len(docs) == limit:
            break
    return docs


@pytest.fixture(scope="module")
def pages(python_docs_html) -> list[Document]:
    """Real English pages of Python's docs, extracted as the web chain extracts them."""
    return _extract(sorted(python_docs_html.rglob("*.html"))[::8], "en", 40)


@pytest.fixture(scope="module")
def handbook() -> dict[str, list[Document]]:
    """Real French and Chinese pages of the Debian handbook (Chinese: datatrove's unflanked matching)."""
    from pipeline.realdata import FetchError, debian_package

    try:
        html = debian_package("debian-handbook") / "root/usr/share/doc/debian-handbook/html"
    except FetchError as exc:
        real_data_unavailable(str(exc))
    return {lang: _extract(sorted((html / locale).glob("*.html"))[::4], lang, 12)
            for lang, locale in (("fr", "fr-FR"), ("zh", "zh-CN"))}


def entries(lists: Path, lang: str) -> list[str]:
    return sorted({line.strip() for line in (lists / f"{lang}.txt").read_text(encoding="utf-8").splitlines()} - {""})


def plant(doc: Document, word: str, rng: random.Random, suffix: str = "") -> Document:
    """The page with ``word`` inserted, space-separated, at a random place."""
    at = rng.randrange(len(doc.text))
    text = f"{doc.text[:at]} {word}{suffix} {doc.text[at:]}"
    return Document(text=text, id=f"{doc.id}+{word}", metadata=dict(doc.metadata))


def datatrove_reference(lists: Path, assets: Path, monkeypatch, **params):
    """datatrove's own C4BadWordsFilter, unmodified, finding our lists in *its* asset cache (datatrove's
    file naming and ``.completed`` markers); any download attempt fails the test."""
    import datatrove.io
    from datatrove.pipeline.filters import C4BadWordsFilter, c4_filters
    from fsspec.core import strip_protocol

    real = datatrove.io.cached_assets_path
    monkeypatch.setattr(datatrove.io, "cached_assets_path", lambda **kw: real(assets_dir=assets, **kw))
    folder = Path(real(assets_dir=assets, library_name="datatrove", namespace="filters", subfolder="c4_badwords"))
    for lang in c4_filters._BADWORDS_LANGS:
        url = c4_filters._EN_BADWORDS_URL if lang == "en" else c4_filters._BADWORDS_URL + lang
        target = folder / strip_protocol(url).replace("/", "_")
        target.write_bytes((lists / f"{lang}.txt").read_bytes())
        Path(f"{target}.completed").touch()
    return C4BadWordsFilter(**params)


@pytest.fixture
def no_network(monkeypatch):
    """Any download by datatrove (or urllib) raises."""
    import urllib.request

    import datatrove.io

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:1]}")

    monkeypatch.setattr(datatrove.io, "download_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_lists_are_datatroves_languages(lists):
    from datatrove.pipeline.filters import c4_filters

    assert sorted(p.stem for p in lists.glob("*.txt")) == sorted(c4_filters._BADWORDS_LANGS)
    assert len(entries(lists, "en")) == 377  # datatrove's pinned English list (LDNOOBW 25e679f)
    assert len(entries(lists, "zh")) == 318


def test_real_pages_kept_planted_word_dropped_without_network(lists, pages, no_network):
    flt = BadWords({"fail_on_missing_language": False}, lists)
    assert len(flt.languages) == 28
    assert len(pages) >= 30
    verdicts = [flt(copy.deepcopy(doc)) for doc in pages]
    clean = [doc for doc, (kept, _) in zip(pages, verdicts) if kept]
    assert len(clean) >= len(pages) - 2  # reference documentation: (almost) no bad words
    rng = random.Random(0)
    word = next(e for e in entries(lists, "en") if " " not in e and len(e) > 4)
    dirty = plant(clean[0], word, rng, suffix=".")
    assert flt(dirty) == (False, REASON)
    # inside a longer word it is not a match (datatrove flanks words with non-word characters)
    assert flt(plant(clean[0], f"x{word}y", rng)) == (True, None)


def test_decisions_equal_datatroves_filter(lists, pages, handbook, tmp_path, monkeypatch, no_network):
    """Ours (pre-check, then datatrove) against datatrove's own object on the same lists: real pages, and
    real pages with list entries planted (multi-word ones and allowlisted ones included)."""
    reference = datatrove_reference(lists, tmp_path, monkeypatch, fail_on_missing_language=False)
    ours = BadWords({"fail_on_missing_language": False}, lists)
    rng = random.Random(1)
    cases = list(pages)
    for lang, docs in (("en", pages), *handbook.items()):
        assert len(docs) >= 6, lang
        cases += docs
        words = entries(lists, lang)
        sample = rng.sample(words, min(40, len(words))) + [w for w in words if " " in w][:10] + ["sm", "性"]
        for word in sample:
            cases.append(plant(rng.choice(docs), word, rng, suffix=rng.choice(["", ",", "s"])))
    mismatches = []
    for doc in cases:
        theirs = reference.filter(copy.deepcopy(doc))
        theirs = theirs if isinstance(theirs, tuple) else (theirs, None)
        mine = ours(copy.deepcopy(doc))
        if mine[0] != theirs[0]:
            mismatches.append(doc.id)
    assert mismatches == []
    dropped = sum(not ours(copy.deepcopy(d))[0] for d in cases)
    assert 40 < dropped < len(cases) - 40  # both outcomes, many times
    assert ours.datatrove_calls < len(cases)  # the pre-check answered the clean pages alone


def test_precheck_is_a_necessary_condition(lists, pages):
    """Every entry planted anywhere in a real page: wherever datatrove's regex matches, so does the pre-check."""
    flt = BadWords({}, lists)
    check = Precheck(lists / "en.txt", "en")
    regex = flt.impl._badwords_regex["en"]
    rng = random.Random(2)
    text = pages[3].text[:600]
    for word in entries(lists, "en"):
        for planted in (f" {word} ", f"({word})", f"x{word}", f"{word}\n", f"-{word.upper()}-"):
            at = rng.randrange(len(text))
            lower = (text[:at] + planted + text[at:]).lower()
            if regex.search(lower):
                assert check.candidate(lower), planted


def test_keep_fraction_is_deterministic_per_document(lists, pages):
    rng = random.Random(3)
    words = [w for w in entries(lists, "en") if " " not in w]
    bad = [plant(doc, rng.choice(words), rng, suffix=" ") for doc in pages]
    params = {"keep_fraction": 0.5, "seed": 7}

    def kept_ids(order: list[Document], flt: BadWords) -> set[str]:
        return {doc.id for doc in order if flt(copy.deepcopy(doc))[0]}

    first = kept_ids(bad, BadWords(params, lists))
    again = kept_ids(list(reversed(bad)), BadWords(params, lists))  # another order, a fresh worker
    assert first == again
    assert 0.2 * len(bad) < len(first) < 0.8 * len(bad)
    assert first == {d.id for d in bad if document_uniform(7, d.id) < 0.5}
    assert kept_ids(bad, BadWords({**params, "seed": 8}, lists)) != first


def test_language_without_list_kept_and_counted(lists, pages):
    flt = BadWords({"fail_on_missing_language": False}, lists)
    word = entries(lists, "en")[0]
    latin = Document(text=pages[0].text + f" {word} ", id="la-1", metadata={"language": "la", "source": "s"})
    assert flt(latin) == (True, None)
    assert flt.take_counts() == {("s", "la"): 1}
    assert flt.take_counts() == {}
    strict = BadWords({"fail_on_missing_language": True}, lists)
    with pytest.raises(ValueError, match="la"):
        strict(latin)


def test_web_chain_runs_badwords_last_on_c4s_text(lists, pages, lid_model):
    """In the web chain the step reads C4's output: a word on a line C4 removes does not drop the page."""
    from pipeline.config import CrawlFilterConfig
    from pipeline.filters.web import TEXT_ORDER, build_text_steps, run_text_steps

    assert TEXT_ORDER[-1] == "badwords"
    cfg = CrawlFilterConfig.model_validate({"web": {"language": {"model": str(lid_model)},
                                                    "gopher_quality": {"params": {"max_non_alpha_words_ratio": 0.5}}}})
    steps = build_text_steps(cfg)
    assert steps[-1].name == "badwords" and steps[-1].reads_edited
    word = next(e for e in entries(lists, "en") if " " not in e and len(e) > 4)
    tried = 0
    for page in sorted(pages, key=lambda d: len(d.text)):  # the short pages first: the chain is slow
        if run_text_steps(copy.deepcopy(page), steps, {})[0] != "kept":
            continue
        tried += 1
        on_removed_line = Document(text=page.text + f"\nPlease enable javascript {word}\n", id=page.id,
                                   metadata=dict(page.metadata))
        on_kept_line = Document(text=page.text.replace(". ", f". The {word} is here. ", 1), id=page.id,
                                metadata=dict(page.metadata))
        assert run_text_steps(on_removed_line, steps, {}) == ("kept", None)
        assert run_text_steps(on_kept_line, steps, {}) == ("dropped", REASON)
        if tried == 2:
            break
    assert tried == 2
