"""Multilingual correctness on real text (the Debian Administrator's Handbook in its zh-CN, ja-JP, de-DE and
en-US translations; dpkg's Korean and Thai message catalogs):

* MinHash with character shingles finds a Chinese or Japanese page's lightly edited, re-wrapped copy, which
  whole-run words miss, and still pairs no unrelated pages; English is split as before.
* The web filters split each page's words with datatrove's splitter for its detected language (jieba,
  SudachiPy, Kiwi, PyThaiNLP, spaCy German) and decide as datatrove's filters built with that language; a
  language without a splitter here falls back to the configured one and is counted.
"""

from __future__ import annotations

import gettext
import importlib.util
import json
import re
import unicodedata
from itertools import combinations
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from datatrove.data import Document

from pipeline.config import CrawlFilterConfig, DedupConfig
from pipeline.dedup.minhash import (
    MinHasher,
    band_keys,
    lsh_params,
    normalize_words,
    shingle_hashes,
    strip_combining,
)
from tests.conftest import real_data_unavailable

pytestmark = pytest.mark.realdata

HANDBOOK_HTML = "root/usr/share/doc/debian-handbook/html"
CJK = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")
LATIN = re.compile(r"[A-Za-z]")
THRESHOLD = DedupConfig().threshold            # 0.8
NUM_PERM = DedupConfig().num_perm


def _package(name: str) -> Path:
    from pipeline.realdata import FetchError, debian_package

    try:
        return debian_package(name)
    except FetchError as exc:
        real_data_unavailable(str(exc))


@pytest.fixture(scope="module")
def handbook() -> dict[str, list[tuple[str, str]]]:
    """locale -> [(page, extracted text)] for the pages with at least 2,000 characters of text."""
    from pipeline.extract import ExtractSettings, HtmlToText

    html = _package("debian-handbook") / HANDBOOK_HTML
    to_text = HtmlToText(ExtractSettings())
    pages = {}
    for locale in ("en-US", "de-DE", "zh-CN", "ja-JP"):
        pages[locale] = []
        for path in sorted((html / locale).glob("*.html")):
            result = to_text(path.read_bytes(), "utf-8")
            if result.outcome == "kept" and len(result.text) >= 2000:
                pages[locale].append((path.name, result.text))
    return pages


def cjk_fraction(text: str) -> float:
    cjk, latin = len(CJK.findall(text)), len(LATIN.findall(text))
    return cjk / max(1, cjk + latin)


def translated(pages: list[tuple[str, str]], n: int | None = None) -> list[tuple[str, str]]:
    """Pages mostly in the translation's script (many handbook pages are partly untranslated English); not
    the table of contents, whose short lines a re-wrap leaves alone."""
    chosen = [(p, t) for p, t in pages if cjk_fraction(t) >= 0.45 and p != "index.html"]
    return chosen[:n] if n else chosen


@pytest.fixture(scope="module")
def catalogs() -> dict[str, str]:
    """dpkg's Korean and Thai translations, the longer messages joined: real text in a spaced script that
    datatrove splits into morphemes (Korean) and an unspaced one (Thai)."""
    root = _package("dpkg") / "root/usr/share/locale"
    texts = {}
    for language in ("ko", "th"):
        with open(root / language / "LC_MESSAGES" / "dpkg.mo", "rb") as f:
            catalog = gettext.GNUTranslations(f)._catalog
        texts[language] = "\n".join(v for k, v in sorted(catalog.items(), key=lambda kv: str(kv[0]))
                                    if k and isinstance(v, str) and len(v) > 60)
    return texts


# ------------------------------------------------------------------------------------------ MinHash
_PIECE = re.compile(r"\s+|[\u3000-\u9fff\uff00-\uffef]|[^\s\u3000-\u9fff\uff00-\uffef]+")


def cjk_wrap(text: str, width: int = 36) -> str:
    """Hard-wrapped as a plain-text rendering wraps CJK (Debian's own debian-reference.zh-cn.txt, w3m): a
    line may end after a space or beside any CJK character (UAX #14), never inside a Latin word."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for piece in _PIECE.findall(paragraph):
            if line and len(line) + len(piece) > width:
                lines.append(line.rstrip())
                line = "" if piece.isspace() else piece
            else:
                line += piece
        lines.append(line)
    return "\n".join(lines)


def one_sentence_changed(text: str) -> str:
    sentences = re.findall(r"[^。！？\n]*[\u4e00-\u9fff][^。！？\n]*[。！？]", text)
    longest = max(sentences, key=len)
    return text.replace(longest, "这句话已经被修改了，内容完全不同。", 1)


def jaccard(a: str, b: str, mode: str) -> float:
    sa, sb = (set(shingle_hashes(normalize_words(t, mode), 5).tolist()) for t in (a, b))
    return len(sa & sb) / len(sa | sb)


def found(hasher: MinHasher, a: str, b: str) -> tuple[bool, float]:
    """What dedup decides for a pair: an LSH candidate (a shared band key) verified by estimated Jaccard."""
    bands, rows = lsh_params(THRESHOLD, hasher.num_perm)
    sigs = np.stack([hasher.signature(a), hasher.signature(b)])
    keys = band_keys(sigs, bands, rows, 0)
    estimate = float((sigs[0] == sigs[1]).mean())
    return bool((keys[0] == keys[1]).any()) and estimate >= THRESHOLD, estimate


def test_character_tokens_only_for_unspaced_scripts(handbook, catalogs):
    for _, text in handbook["en-US"] + handbook["de-DE"]:
        assert normalize_words(text, "characters") == normalize_words(text, "words")
    for _, text in translated(handbook["zh-CN"]) + translated(handbook["ja-JP"]):
        chars, runs = normalize_words(text, "characters"), normalize_words(text, "words")
        assert all(len(w) == 1 for w in chars if CJK.search(w))      # each Han / kana character a token
        assert max(len(w) for w in runs if CJK.search(w)) > 20          # whole clauses, as words
        assert "".join(chars) == "".join(runs)                          # the same characters, split finer
    korean = catalogs["ko"]
    assert normalize_words(korean, "characters") == normalize_words(korean, "words")   # Hangul is spaced
    thai = catalogs["th"]
    assert all(len(w) == 1 for w in normalize_words(thai) if re.search("[\u0e00-\u0e7f]", w))
    # the quick path (no character of those scripts: plain \w+) splits as the full regex would
    from pipeline.dedup.minhash import _DIGIT, _WORD_OR_CHARACTER

    for text in [t for loc in handbook.values() for _, t in loc] + [korean, thai, "𠀀𠀁 x\u0301 日本"]:
        plain = unicodedata.normalize("NFKD", text.lower())
        plain = _DIGIT.sub("0", "".join(ch for ch in plain if not unicodedata.combining(ch)))
        assert normalize_words(text) == _WORD_OR_CHARACTER.findall(plain)
    # the regex that strips combining marks equals the per-character loop, astral marks included
    samples = [unicodedata.normalize("NFKD", t.lower()) for loc in handbook.values() for _, t in loc[:10]]
    samples += [unicodedata.normalize("NFKD", thai), "a\u0301\U0001d165\U0001e944x\u0300\U00020000"]
    for sample in samples:
        assert strip_combining(sample) == "".join(ch for ch in sample if not unicodedata.combining(ch))


def test_cjk_near_duplicates_found_with_character_shingles(handbook):
    characters, words = MinHasher(), MinHasher(cjk_shingles="words")
    pages = translated(handbook["zh-CN"], 4) + translated(handbook["ja-JP"], 4)
    assert len(pages) == 8
    for page, text in pages:
        edited = one_sentence_changed(text)
        # one sentence changed: both modes still pair it (a clause is one "word"; 5 of its shingles change)
        assert found(characters, text, edited)[0] and found(words, text, edited)[0], page
        # the same edit, hard-wrapped like a plain-text copy: line breaks cut the whole-run "words"
        copy = cjk_wrap(edited)
        hit_c, est_c = found(characters, text, copy)
        hit_w, est_w = found(words, text, copy)
        print(f"{page}: characters J={jaccard(text, copy, 'characters'):.2f} (est {est_c:.2f}), "
              f"words J={jaccard(text, copy, 'words'):.2f} (est {est_w:.2f})")
        assert hit_c and jaccard(text, copy, "characters") >= THRESHOLD, page
        assert not hit_w and jaccard(text, copy, "words") < THRESHOLD, page
    # unrelated pages (the ~100 zh-CN and ja-JP pages at least partly translated; untranslated ones are the
    # same English in both locales) are never paired by character shingles
    texts = [t for _, t in handbook["zh-CN"] + handbook["ja-JP"] if cjk_fraction(t) >= 0.2]
    assert len(texts) >= 80
    sigs = np.stack([characters.signature(t) for t in texts])
    keys = band_keys(sigs, *lsh_params(THRESHOLD, NUM_PERM), 0)
    verified = [(i, j) for i, j in combinations(range(len(texts)), 2)
                if (keys[i] == keys[j]).any() and (sigs[i] == sigs[j]).mean() >= THRESHOLD]
    assert verified == []
    assert max((sigs[i] == sigs[j]).mean() for i, j in combinations(range(len(texts)), 2)) < 0.5


class _Input:
    def __init__(self, path: Path):
        self.path = path

    def output_path(self, run_dir, unit):
        return self.path


def test_signature_stage_and_index_check_use_cjk_shingles(handbook, tmp_path):
    from pipeline.document import document_id, write_documents
    from pipeline.sources.base import Unit
    from pipeline.stages.dedup import DedupSignatureStage, check_index, dedup_params

    docs = [Document(text=t, id=document_id("w", p), metadata={"source": "w", "source_kind": "web", "locator": p})
            for p, t in translated(handbook["zh-CN"], 3)]
    source = tmp_path / "in.parquet"
    write_documents(source, docs)
    unit = Unit("w-00000", "w", "web", ())
    for mode in ("characters", "words"):
        cfg = DedupConfig(cjk_shingles=mode, partitions=2)
        assert dedup_params(cfg)["cjk_shingles"] == mode
        stage = DedupSignatureStage(cfg, _Input(source), {unit.id: 0})
        stage.run_unit(unit, tmp_path / mode)
        with pa.memory_map(str(stage.output_path(tmp_path / mode, unit))) as f:
            sigs = np.array(pa.ipc.open_file(f).read_all().column("sig").to_pylist(), dtype=np.uint64)
        hasher = MinHasher(cfg.num_perm, cfg.seed, cfg.ngram, mode)
        assert np.array_equal(sigs, np.stack([hasher.signature(d.text) for d in docs]))
    # an index run must have split CJK text the same way; one from before the setting split whole runs
    index_sig = tmp_path / "index" / "stages" / "dedup_signatures"
    index_sig.mkdir(parents=True)
    old = {k: v for k, v in dedup_params(DedupConfig()).items() if k != "cjk_shingles"}
    (index_sig / "params.json").write_text(json.dumps(old))
    check_index(index_sig, DedupConfig(cjk_shingles="words"))
    with pytest.raises(ValueError, match="cjk_shingles='words'"):
        check_index(index_sig, DedupConfig())


# ------------------------------------------------------------------------------------ word splitters
def test_detected_languages_map_to_datatrove_table_keys():
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    from pipeline.filters.splitters import table_key, usable_splitter

    assert {lang: table_key(lang) for lang in ("en", "de", "zh", "yue", "ja", "ko", "th", "ar")} == {
        "en": "eng_Latn", "de": "deu_Latn", "zh": "cmn_Hani", "yue": "yue_Hani", "ja": "jpn_Jpan",
        "ko": "kor_Hang", "th": "tha_Thai", "ar": "arb_Arab"}
    # why not datatrove's bare codes: its table reader takes "FALSE" for true, so "zh" is the last script row
    assert load_word_tokenizer("zh").language == "xx" and load_word_tokenizer("cmn_Hani").language == "zh"
    assert load_word_tokenizer("ar").language == "xx" and load_word_tokenizer("arb_Arab").language == "ar"
    for lang in ("zh", "ja", "ko", "th", "de"):    # their packages are project dependencies
        assert usable_splitter(lang) == (table_key(lang), ""), lang
    assert usable_splitter("bo")[0] is None        # botok fetches its dialect pack from the web: never used
    assert usable_splitter("qq")[0] is None        # not a language datatrove knows


def _filters(languages=None, word_splitter="detected"):
    from pipeline.filters.language import default_lid_model
    from pipeline.filters.web import build_text_steps

    cfg = CrawlFilterConfig.model_validate({"web": {
        "word_splitter": word_splitter, "language": {"model": default_lid_model(), "languages": languages}}})
    return build_text_steps(cfg, order=("language", "gopher_repetition", "gopher_quality"))


def _datatrove_reason(text: str, language: str) -> str | None:
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter

    for name, flt in (("gopher_repetition", GopherRepetitionFilter(language=language)),
                      ("gopher_quality", GopherQualityFilter(language=language))):
        kept = flt.filter(Document(text=text, id="x"))
        if kept is not True:
            return f"{name}:{kept[1]}" if isinstance(kept, tuple) else name
    return None


def test_gopher_splits_words_for_the_detected_language(handbook, catalogs):
    from datatrove.utils.text import split_into_words

    from pipeline.filters.splitters import table_key
    from pipeline.filters.web import run_text_steps

    detected, configured = _filters(), _filters(word_splitter="configured")
    cases = ([("zh", t) for _, t in translated(handbook["zh-CN"], 2)]
             + [("ja", t) for _, t in translated(handbook["ja-JP"], 2)]
             + [("de", t) for _, t in handbook["de-DE"][:3]] + [("ko", catalogs["ko"]), ("th", catalogs["th"])])
    differ = 0
    for expected, text in cases:
        doc = Document(text=text, id="x", metadata={})
        _, reason = run_text_steps(doc, detected, {})
        assert doc.metadata["language"] == expected
        key = table_key(expected)
        assert reason == _datatrove_reason(text, key)                  # datatrove's filters for that language
        _, english_reason = run_text_steps(Document(text=text, id="x", metadata={}), configured, {})
        assert english_reason == _datatrove_reason(text, "en")
        differ += reason != english_reason
        ours, english = split_into_words(text, key), split_into_words(text, "en")
        assert len(ours) != len(english)
        if expected in ("zh", "ja", "th"):                             # unspaced: words, not clauses
            # mean length of the script's words: CJK words are 1-2 characters, Thai ones 4-5 code points
            script, most = (re.compile("[\u0e00-\u0e7f]"), 6) if expected == "th" else (CJK, 3)
            ours_mean, english_mean = (np.mean([len(w) for w in ws if script.search(w)]) for ws in (ours, english))
            assert ours_mean < most and english_mean > 2 * most, (expected, ours_mean, english_mean)
        elif expected == "ko":                                          # Kiwi: morphemes, more than eojeol
            assert len(ours) > 1.3 * len(english)
    assert differ >= 5      # every CJK / Thai / Korean case changes its Gopher reason


def test_english_unchanged_and_fallback_counted(handbook, tmp_path):
    from pipeline.filters.splitters import FALLBACK_KEY, USED_KEY
    from pipeline.filters.web import WebCrawlFilter
    from pipeline.ledger import Ledger
    from pipeline.sources.warc import WebPage

    html = _package("debian-handbook") / HANDBOOK_HTML
    picks = [("en-US", p) for p, _ in handbook["en-US"][:6]] + [("zh-CN", p) for p, _ in
                                                                 translated(handbook["zh-CN"], 2)]
    picks += [("vi-VN", "basic-configuration.html"), ("vi-VN", "case-study.html")]     # translated pages

    def pages():
        for locale, name in picks:
            yield WebPage(text="", id=f"{locale}/{name}", body=(html / locale / name).read_bytes(),
                          header_charset="utf-8", metadata={"source": "w", "source_kind": "web",
                                                            "locator": f"{locale}/{name}",
                                                            "url": f"https://debian-handbook.info/{locale}/{name}"})

    results = {}
    for mode in ("detected", "configured"):
        cfg = CrawlFilterConfig.model_validate({"web": {
            "word_splitter": mode, "url": {"enabled": False}, "extraction": {"timeout_s": 0},
            "language": {"languages": None}}})
        ledger = Ledger()
        kept = list(WebCrawlFilter(cfg, "crawl_filter").run(pages(), ledger, {}))
        assert all(USED_KEY not in d.metadata and FALLBACK_KEY not in d.metadata for d in kept)
        entry = ledger.stats(["crawl_filter"])["stages"]["crawl_filter"]["w"]
        results[mode] = ({d.id: d.text for d in kept}, entry)
    (detected, entry), (configured, plain) = results["detected"], results["configured"]
    english = {k: v for k, v in detected.items() if k.startswith("en-US")}
    assert english and english == {k: v for k, v in configured.items() if k.startswith("en-US")}
    assert USED_KEY not in plain and FALLBACK_KEY not in plain
    assert entry[USED_KEY]["eng_Latn"] >= 6 and entry[USED_KEY]["cmn_Hani"] == 2
    if importlib.util.find_spec("pyvi") is None:    # spaCy's Vietnamese needs pyvi: counted, configured used
        assert entry[FALLBACK_KEY] == {"vi": 2}
    else:
        assert entry[USED_KEY]["vie_Latn"] == 2
