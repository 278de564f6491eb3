"""Multilingual costs, µs per document, on real pages (the Debian Administrator's Handbook: en-US, de-DE and
the translated zh-CN / ja-JP pages; dpkg's Korean and Thai catalogs):

1. MinHash signature (normalise + shingle + 112 permutations): ``cjk_shingles`` characters vs words, and the
   normalisation as it was before character shingles (per-character loop stripping combining marks, then
   ``\\w+``) with the same hashing.
2. The two Gopher filters as the web crawl filter runs them, with the page's detected-language splitter
   (``word_splitter: detected``) vs the configured English one; splitters loaded before timing.

Thread CPU time, the best of ``--rounds`` interleaved rounds (the machine is shared).

    .venv/bin/python bench/multilingual.py --rounds 15
"""

from __future__ import annotations

import argparse
import gettext
import json
import re
import sys
import time
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CJK = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")
LATIN = re.compile(r"[A-Za-z]")


def corpora() -> dict[str, list[str]]:
    from pipeline.extract import ExtractSettings, HtmlToText
    from pipeline.realdata import debian_package

    html = debian_package("debian-handbook") / "root/usr/share/doc/debian-handbook/html"
    to_text = HtmlToText(ExtractSettings())
    texts = {}
    for locale in ("en-US", "de-DE", "zh-CN", "ja-JP"):
        pages = [to_text(p.read_bytes(), "utf-8") for p in sorted((html / locale).glob("*.html"))]
        pages = [r.text for r in pages if r.outcome == "kept" and len(r.text) >= 2000]
        if locale in ("zh-CN", "ja-JP"):   # the translated pages (many are still English)
            pages = [t for t in pages if len(CJK.findall(t)) >= 0.45 * (len(CJK.findall(t)) + len(LATIN.findall(t)))]
        texts[locale] = pages
    locale_dir = debian_package("dpkg") / "root/usr/share/locale"
    for language in ("ko", "th"):
        with open(locale_dir / language / "LC_MESSAGES" / "dpkg.mo", "rb") as f:
            catalog = gettext.GNUTranslations(f)._catalog
        messages = [v for k, v in sorted(catalog.items(), key=lambda kv: str(kv[0])) if k and len(v) > 60]
        texts[language] = ["\n".join(messages[i::8]) for i in range(8)]   # 8 texts: more than datatrove memoises
    return texts


def best(fns: dict, texts: list, rounds: int) -> dict[str, float]:
    times = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            started = time.thread_time()
            for text in texts:
                fn(text)
            times[name] = min(times[name], time.thread_time() - started)
    return {name: round(t / len(texts) * 1e6, 1) for name, t in times.items()}


def minhash(texts: dict[str, list[str]], rounds: int) -> dict:
    from pipeline.dedup import minhash as mh

    characters, words = mh.MinHasher(), mh.MinHasher(cjk_shingles="words")

    def before(text: str):
        text = unicodedata.normalize("NFKD", text.lower())
        if not text.isascii():
            text = "".join(ch for ch in text if not unicodedata.combining(ch))
        hashes = mh.shingle_hashes(mh._WORD.findall(mh._DIGIT.sub("0", text)), 5, distinct=False)
        return characters.signature_of_hashes(hashes)

    fns = {"before": before, "characters": characters.signature, "words": words.signature}
    for fn in fns.values():
        fn("warm up")
    return {locale: {"docs": len(pages), "chars_per_doc": round(sum(map(len, pages)) / len(pages)),
                     **best(fns, pages, rounds)} for locale, pages in texts.items()}


def gopher(texts: dict[str, list[str]], rounds: int) -> dict:
    from datatrove.data import Document

    from pipeline.config import CrawlFilterConfig
    from pipeline.filters.splitters import table_key
    from pipeline.filters.web import build_text_steps, run_text_steps

    order = ("gopher_repetition", "gopher_quality")
    steps = {mode: build_text_steps(CrawlFilterConfig.model_validate({"web": {"word_splitter": mode}}), order)
             for mode in ("detected", "configured")}
    label = {"en-US": "en", "de-DE": "de", "zh-CN": "zh", "ja-JP": "ja", "ko": "ko", "th": "th"}
    def run(mode: str, language: str):
        return lambda text: run_text_steps(Document(text=text, id="x", metadata={"language": language}),
                                           steps[mode], {})

    out = {}
    for locale, pages in texts.items():
        fns = {"detected": run("detected", label[locale]), "configured_en": run("configured", label[locale])}
        for fn in fns.values():   # loads the splitter; and datatrove memoises the last 5 splits: cycle past them
            fn(pages[0])
        out[locale] = {"splitter": table_key(label[locale]), "docs": len(pages), **best(fns, pages, rounds)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "multilingual.json"))
    args = parser.parse_args()
    texts = corpora()
    results = {"minhash_us_per_doc": minhash(texts, args.rounds),
               "gopher_us_per_doc": gopher(texts, max(3, args.rounds // 3))}
    print(json.dumps(results, indent=1))
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
