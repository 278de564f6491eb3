r"""C4's bad-words filter: datatrove's ``C4BadWordsFilter`` decides, with its LDNOOBW lists handed in offline.

datatrove fetches each language's list from GitHub on first use (``cached_asset_path_or_download``). Here
the lists come from the npm registry instead (``pipeline.realdata.badwords_lists``: the npm package
``naughty-words``, whose files equal the two LDNOOBW commits datatrove pins), and are loaded *through
datatrove's own* ``_get_badwords``: for the few milliseconds of construction, the module's download
function is swapped for one that answers datatrove's pinned URL with the local file. So the word set, the
allowlist subtraction and the regex (word-flanked, or bare for ja/th/zh) are datatrove's code, run once per
language; afterwards every list is cached in the object and nothing is ever fetched.

The regex is slow on long pages (one alternation of ~400 words tried at every position: ~11 ms on a 15 K
character page), and almost every page is clean. So datatrove's filter runs only on pages where a cheap
pre-check finds a *candidate*; the pre-check is a necessary condition of datatrove's match, so a page without
a candidate is one datatrove keeps:

* for word-flanked languages, every word run (``\w+``) of an entry, being flanked by non-word characters
  or the ends in a match, is a whole word run of the lower-cased page. So an entry made of one run is a
  candidate only if it is one of the page's runs (a set lookup), and an entry with spaces or symbols only
  if all of its runs are, and then its own flanked pattern matches;
* for ja/th/zh (substrings, no flanking) every page is a candidate: datatrove's regex decides alone.

The entries are the list files' lines, stripped as datatrove strips them, before its allowlist is taken
out: a superset, so the pre-check can only say "candidate" more often than datatrove says "bad", never less.
When it says "candidate", datatrove's own ``filter()`` decides (and books its stats).

Two more things differ from calling datatrove's object directly, both for determinism and neither touching
the decision on a page without bad words:

* a language with no list (datatrove has 28) is kept and counted, never fetched, never an error (unless
  ``fail_on_missing_language`` is set, which raises as datatrove does);
* ``keep_fraction > 0``: datatrove draws one uniform per bad page from a single RNG across the stream, so
  which bad pages survive depends on unit order and on which worker got which unit. The draw here is a
  hash of (seed, document id), answered through datatrove's own ``self.uniform()`` call, so the same page
  gets the same answer in every run.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import Counter
from pathlib import Path
from typing import Any
from unittest import mock

from datatrove.data import Document

from pipeline.filters.base import Verdict, datatrove_verdict

_LOAD_LOCK = threading.Lock()  # the download function is swapped module-wide while lists load


class ListMissing(LookupError):
    """No local list for a language datatrove knows."""


def document_uniform(seed: int, doc_id: str) -> float:
    """A uniform draw in [0, 1) that depends only on the seed and the document id."""
    digest = hashlib.blake2b(f"badwords\x00{seed}\x00{doc_id}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) / float(1 << 53)


def load_lists(impl: Any, lists_dir: Path) -> list[str]:
    """Fill ``impl`` (a ``C4BadWordsFilter``) with every language of ``lists_dir`` through datatrove's own
    ``_get_badwords``; the languages loaded."""
    from datatrove.pipeline.filters import c4_filters

    def local_asset(remote_path: str, *args: Any, **kwargs: Any) -> str:
        if remote_path == c4_filters._EN_BADWORDS_URL:
            lang = "en"
        elif remote_path.startswith(c4_filters._BADWORDS_URL):
            lang = remote_path[len(c4_filters._BADWORDS_URL):]
        else:  # datatrove changed where its lists live: our copies would need checking again
            raise RuntimeError(f"unexpected badwords URL {remote_path!r}")
        path = lists_dir / f"{lang}.txt"
        if not path.is_file():
            raise ListMissing(lang)
        return str(path)

    loaded = []
    with _LOAD_LOCK, mock.patch.object(c4_filters, "cached_asset_path_or_download", local_asset):
        for lang in c4_filters._BADWORDS_LANGS:
            try:
                impl._get_badwords(lang)
            except ListMissing:
                continue
            loaded.append(lang)
    return loaded


class Precheck:
    """A necessary condition of datatrove's badwords match for one language (see the module doc)."""

    _RUN = re.compile(r"\w+")

    def __init__(self, path: Path, lang: str):
        with open(path, encoding="utf-8") as fh:
            entries = {line.strip() for line in fh}  # as datatrove reads them; allowlist not removed
        # ja/th/zh: datatrove matches bare substrings; no cheaper necessary condition is worth it there
        self.always = lang in ("ja", "th", "zh") or "" in entries
        self.words = frozenset(e for e in entries if self._RUN.fullmatch(e))
        # the other entries: their word runs (all must be runs of the page) and their own flanked regex
        # ("(?:\W|^)" before and "(?:\W|$)" after a match are the lookarounds used here)
        self.others = [(frozenset(self._RUN.findall(e)), e, re.compile(rf"(?<!\w){re.escape(e)}(?!\w)"))
                       for e in sorted(entries - self.words)]

    def candidate(self, lower: str) -> bool:
        if self.always:
            return True
        runs = set(self._RUN.findall(lower))
        if not self.words.isdisjoint(runs):
            return True
        # the substring test first: C's fast search, where the regex (no literal prefix) steps char by char
        return any(needed <= runs and entry in lower and regex.search(lower) for needed, entry, regex in self.others)


class BadWords:
    """Drops a page whose text (in its detected language) holds an LDNOOBW word; keeps and counts pages
    whose language has no list."""

    name = "badwords"

    def __init__(self, params: dict[str, Any], lists_dir: Path | None = None, precheck: bool = True):
        from datatrove.pipeline.filters import C4BadWordsFilter

        if lists_dir is None:
            from pipeline.realdata import badwords_lists

            lists_dir = badwords_lists()
        lists_dir = Path(lists_dir)
        self.impl = C4BadWordsFilter(**params)
        self.languages = frozenset(load_lists(self.impl, lists_dir))
        self.seed = params.get("seed") or 0
        self._draw = 0.0
        self.impl.uniform = lambda: self._draw  # datatrove's draw, answered per document
        # precheck=False: datatrove's regex on every page (the plain reference the pre-check is tested against)
        self.prechecks = {lang: Precheck(lists_dir / f"{lang}.txt", lang) for lang in self.languages} if precheck else {}
        self.datatrove_calls = 0
        self.missing_language: Counter[tuple[str, str]] = Counter()  # (source, language) -> pages kept

    def __call__(self, doc: Document) -> Verdict:
        lang = doc.metadata.get("language", self.impl.default_language)
        if lang not in self.languages:
            if self.impl.fail_on_missing_language:
                raise ValueError(f"no badwords list for language {lang!r}")
            self.missing_language[(doc.metadata.get("source", ""), lang)] += 1
            return True, None
        check = self.prechecks.get(lang)
        if check is not None and not check.candidate(doc.text.lower()):
            return True, None
        self.datatrove_calls += 1
        self._draw = document_uniform(self.seed, doc.id)
        kept, reason = datatrove_verdict(self.impl.filter(doc))
        if kept:
            return True, None
        return False, f"{self.name}:{reason}"

    def take_counts(self) -> Counter[tuple[str, str]]:
        """The pages kept for want of a list since the last call, per (source, language); resets them."""
        counts, self.missing_language = self.missing_language, Counter()
        return counts
