"""Which word splitter datatrove's word-counting web filters (C4, FineWeb, both Gopher filters) use for a page:
datatrove's splitter for the page's detected language (``doc.metadata["language"]``, set by the language-ID
step) where datatrove has one that works offline here, else the step's configured ``language``
(``crawl_filter.web.word_splitter: detected``, the default).

* A language-ID label becomes a key of datatrove's tokenizer table (``tokenizer_assignment.csv``) in the
  language's default script: ``zh`` -> ``cmn_Hani`` (spaCy + jieba), ``ja`` -> ``jpn_Jpan`` (spaCy + SudachiPy),
  ``ko`` -> ``kor_Hang`` (Kiwi), ``th`` -> ``tha_Thai`` (PyThaiNLP), ``de`` -> ``deu_Latn`` (spaCy). The table is
  read here with its TRUE/FALSE columns as booleans: datatrove's own reader tests them as non-empty
  strings, so a bare code there names whichever script's row came last (``load_word_tokenizer("zh")`` is
  spaCy's multi-language ``xx``, which leaves a Chinese sentence whole; ``"ar"`` is ``xx`` too); the
  ``code_script`` keys it builds are right, and those are what the filters get.
* A splitter is used only when it loads and splits a probe here: its package installed, no model to fetch.
  Stanza and botok (Tibetan) fetch models from the web on first use and are never used. Otherwise the page
  gets the configured splitter and is counted: ``doc.metadata["word_splitter_fallback"] = <label>`` (the web
  crawl filter moves it to the ledger's ``word_splitter_fallback`` tally, per source).
* Filter objects are built on a language's first page and kept for the ``max_languages`` most recently
  seen splitters (each holds a spaCy pipeline or a segmenter's dictionary). A language whose splitter is
  the configured one's (``en`` for the default ``en``) runs the configured objects themselves.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter, OrderedDict
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from datatrove.data import Document

from pipeline.filters.base import Verdict

log = logging.getLogger(__name__)

FALLBACK_KEY = "word_splitter_fallback"   # doc.metadata: the detected language that had no splitter here
USED_KEY = "word_splitter"                # doc.metadata: the tokenizer-table key the page was split with
# datatrove splitters that download models on first use (Stanza's per-language models, botok's dialect pack)
DOWNLOADING = frozenset({"StanzaTokenizer", "TibetanTokenizer"})
_PROBE = "A probe. Ein Test. 这是一个测试。これはテストです。시험입니다. นี่คือการทดสอบ"

Run = Callable[[Document], Verdict]


@lru_cache(maxsize=1)
def table_keys() -> dict[str, str]:
    """Language code (ISO 639-1 where the table gives one, and 639-3) -> the table key of its default script."""
    from datatrove.utils._import_utils import ASSETS_PATH

    by_code1: dict[str, str] = {}
    by_code3: dict[str, str] = {}
    with open(os.path.join(ASSETS_PATH, "tokenizer_assignment.csv"), encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if not row["type"] or row["default_script"] != "TRUE":
                continue
            key = f"{row['code_3']}_{row['script']}"
            by_code3.setdefault(row["code_3"], key)
            if row["code_1"] and row["default_code_1"] == "TRUE":
                by_code1.setdefault(row["code_1"], key)
    return {**by_code3, **by_code1}


def table_key(label: str) -> str | None:
    """The tokenizer-table key for a language-ID label (``zh``, ``yue``, or GlotLID's ``cmn_Hani``)."""
    from datatrove.utils.word_tokenizers import load_tokenizer_assignments

    key = table_keys().get(label)
    if key is None and "_" in label and label in load_tokenizer_assignments():
        key = label
    return key


def identity(language: Any) -> tuple:
    """What a datatrove ``language`` argument splits with: (class, language, config); equal identities split
    every text the same way."""
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    tok = load_word_tokenizer(language)
    reference = getattr(tok, "reference", tok)          # SpacyWords: datatrove's instance behind it
    return (type(reference).__name__, reference.language,
            json.dumps(getattr(reference, "config", None), sort_keys=True))


@lru_cache(maxsize=512)
def usable_splitter(label: str) -> tuple[str | None, str]:
    """(table key, "") when datatrove has a splitter for ``label`` that works here, else (None, why not)."""
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    key = table_key(label)
    if key is None:
        return None, "not in datatrove's tokenizer table"
    try:
        tok = load_word_tokenizer(key)
        if type(tok).__name__ in DOWNLOADING:
            return None, f"{type(tok).__name__} downloads its models at run time"
        tok.word_tokenize(_PROBE)       # loads the segmenter and its dictionary / model
        tok.sent_tokenize(_PROBE)
    except Exception as exc:  # noqa: BLE001 - a missing package, model or dictionary: fall back
        return None, f"{type(exc).__name__}: {str(exc)[:200]}"
    return key, ""


class LanguageSplitters:
    """Per detected language, the word steps built for its splitter (lazily, the ``max_languages`` most
    recently used kept); ``build(key, words, step)`` makes one step's filter for a table key, ``words``
    being that language's shared ``SpacyWords`` cache."""

    def __init__(self, build: Callable[[str, dict, str], Run], max_languages: int = 16):
        self.build = build
        self.max_languages = max_languages
        self._languages: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
        self._last: tuple[Document | None, dict[str, Any] | None] = (None, None)
        self.fallbacks: Counter[str] = Counter()      # pages per detected language without a splitter here
        self.pages: Counter[str] = Counter()          # pages per table key split with a detected splitter
        self.built = 0

    def entry(self, doc: Document) -> dict[str, Any] | None:
        """The page's language entry, or None for the configured splitter (no language, or none usable)."""
        if self._last[0] is doc:                      # the four word steps ask in turn for the same page
            return self._last[1]
        label = doc.metadata.get("language")
        found = None
        if label:
            key, why = usable_splitter(label)
            if key is None:
                if not self.fallbacks[label]:
                    log.warning("word splitter: none for detected language %r here (%s); using the configured one",
                                label, why)
                self.fallbacks[label] += 1
                doc.metadata[FALLBACK_KEY] = label
            else:
                found = self._entry(key)
                self.pages[key] += 1
                doc.metadata[USED_KEY] = key
        self._last = (doc, found)
        return found

    def _entry(self, key: str) -> dict[str, Any]:
        ident = identity(key)
        found = self._languages.get(ident)
        if found is None:
            found = self._languages[ident] = {"key": key, "identity": ident, "words": {}, "runs": {}}
            while len(self._languages) > self.max_languages:
                self._languages.popitem(last=False)
        else:
            self._languages.move_to_end(ident)
        return found

    def step(self, name: str, configured: Run, configured_language: Any) -> Run:
        return DetectedLanguageStep(self, name, configured, identity(configured_language))


class DetectedLanguageStep:
    """One word step: the page's language's filter, or the configured one (same splitter, or none usable)."""

    def __init__(self, splitters: LanguageSplitters, name: str, configured: Run, configured_identity: tuple):
        self.splitters = splitters
        self.name = name
        self.configured = configured
        self.configured_identity = configured_identity

    def __call__(self, doc: Document) -> Verdict:
        entry = self.splitters.entry(doc)
        if entry is None or entry["identity"] == self.configured_identity:
            return self.configured(doc)
        run = entry["runs"].get(self.name)
        if run is None:
            run = entry["runs"][self.name] = self.splitters.build(entry["key"], entry["words"], self.name)
            self.splitters.built += 1
        return run(doc)

    @property
    def rechecks(self) -> int:
        """The configured filter's lower-bound re-checks (``BoundedThenExact``), as before."""
        return getattr(self.configured, "rechecks", 0)
