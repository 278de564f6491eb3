"""Per-document cost of the crawl-filter steps, the new ones (bad words, PII, secrets, licences) beside the
existing ones, on real documents, one core, one process.

* web: pages of the web benchmark corpus (``python -m pipeline fetch-web``; every ``--web-stride``-th
  page), extracted with Resiliparse as the chain extracts them, through the whole text chain
  (``build_text_steps``): µs per page for each step, over the pages that reach it (the chain stops at
  the first drop), and the pages each step drops. Then on *every* extracted page, with its detected
  language: the bad-words step (pre-check, then datatrove) vs datatrove's ``C4BadWordsFilter`` regex alone
  (same lists; same decisions, checked), and PII redaction (e-mails + IPs; with phones).
* code: CPython's standard library (every ``--code-stride``-th ``.py`` file, tests included) through the
  code filters (``build_filters("code")``): µs per file for each, over the files that reach it; PII on
  the same files.
* secrets false positives: every stdlib ``.py`` file scanned with the default plugin set (files flagged,
  per type); ``--secrets-plugins all`` adds detect-secrets' full plugin set (every line through every
  plugin: ~7 minutes).

    .venv/bin/python bench/filters_cost.py [--web-stride 4] [--code-stride 2] [--secrets-plugins all]
"""

from __future__ import annotations

import argparse
import copy
import sys
import sysconfig
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import write_result  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    return sorted(p for p in STDLIB.rglob("*.py") if "site-packages" not in p.parts)


def per_doc_us(seconds: float, n: int) -> float:
    return round(seconds / max(n, 1) * 1e6, 1)


def web_pages(stride: int):
    from datatrove.data import Document

    from pipeline.config import SourceConfig
    from pipeline.extract import ExtractSettings, HtmlToText
    from pipeline.ledger import Ledger
    from pipeline.realdata import build_web_corpus
    from pipeline.sources import reader_for
    from pipeline.sources.base import InputFile

    corpus = build_web_corpus()
    reader = reader_for(SourceConfig(name="web", kind="web", paths=[str(corpus.root)]))
    to_text = HtmlToText(ExtractSettings())
    docs, i = [], 0
    for warc in corpus.warcs:
        for page in reader.read(InputFile(str(warc), warc.name, warc.stat().st_size), Ledger()):
            i += 1
            if i % stride:
                continue
            result = to_text(page.body, page.header_charset)
            if result.outcome == "kept":
                docs.append(Document(text=result.text, id=page.id, metadata=dict(page.metadata)))
    return docs


def bench_web(stride: int) -> dict:
    from datatrove.pipeline.filters import C4BadWordsFilter

    from pipeline.config import CrawlFilterConfig, PIIConfig
    from pipeline.filters.badwords import BadWords, load_lists
    from pipeline.filters.pii import PIIRedactor
    from pipeline.filters.web import build_text_steps, run_text_steps
    from pipeline.realdata import badwords_lists, lid_model_path

    docs = web_pages(stride)
    cfg = CrawlFilterConfig.model_validate({"web": {"language": {"model": str(lid_model_path())}}})
    steps = build_text_steps(cfg)
    run_text_steps(copy.deepcopy(docs[0]), steps, {})  # warm-up: models and word splitters loaded
    reached: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    seconds: dict[str, float] = {}
    languages = {}
    for doc in copy.deepcopy(docs):
        outcome, reason = run_text_steps(doc, steps, seconds)
        for step in steps:  # the steps it went through: up to the one that dropped it
            reached[step.name] += 1
            if outcome != "kept" and (reason or "").split(":")[0] == step.name:
                dropped[step.name] += 1
                break
        languages[doc.id] = doc.metadata.get("language")
    chain = {s.name: {"us_per_doc": per_doc_us(seconds.get(s.name, 0.0), reached[s.name]),
                      "docs_reaching": reached[s.name], "dropped": dropped[s.name]} for s in steps}

    # bad words and PII on every page, in its detected language
    lists = badwords_lists()
    pages = copy.deepcopy(docs)
    for doc in pages:
        doc.metadata["language"] = languages[doc.id] or "en"
    ours = BadWords({"fail_on_missing_language": False}, lists)
    reference = C4BadWordsFilter(fail_on_missing_language=False)
    load_lists(reference, lists)
    started = time.perf_counter()
    mine = [ours(doc)[0] for doc in pages]
    ours_s = time.perf_counter() - started
    started = time.perf_counter()
    theirs = [r if isinstance(r, bool) else r[0] for r in (reference.filter(doc) for doc in pages)]
    theirs_s = time.perf_counter() - started
    pii = {}
    for name, cfg_pii in (("pii_emails_ips", PIIConfig()), ("pii_with_phones", PIIConfig(phones=True))):
        redactor = PIIRedactor(cfg_pii)
        totals: Counter[str] = Counter()
        started = time.perf_counter()
        for doc in pages:
            totals.update(redactor.redact(doc.text)[1])
        pii[name] = {"us_per_doc": per_doc_us(time.perf_counter() - started, len(pages)), "found": dict(totals)}
    chars = sum(len(d.text) for d in pages)
    return {"pages": len(pages), "mean_chars": round(chars / len(pages)), "chain": chain,
            "badwords_all_pages": {"us_per_doc": per_doc_us(ours_s, len(pages)),
                                   "datatrove_regex_us_per_doc": per_doc_us(theirs_s, len(pages)),
                                   "datatrove_calls": ours.datatrove_calls, "dropped": mine.count(False),
                                   "decisions_differ": sum(a != b for a, b in zip(mine, theirs)),
                                   "languages": dict(Counter(d.metadata["language"] for d in pages).most_common(12))},
            **pii}


def bench_code(stride: int) -> dict:
    from pipeline.config import CrawlFilterConfig, PIIConfig
    from pipeline.filters.pii import PIIRedactor
    from pipeline.filters.registry import build_filters

    files = stdlib_files()[::stride]
    docs = []
    from datatrove.data import Document

    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        rel = str(path.relative_to(STDLIB))
        docs.append(Document(text=text, id=rel, metadata={"path": rel, "source": "stdlib", "source_kind": "code"}))
    filters = build_filters("code", CrawlFilterConfig())
    seconds: dict[str, float] = defaultdict(float)
    reached: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    licences: Counter[str] = Counter()
    for doc in copy.deepcopy(docs):
        for flt in filters:
            reached[flt.name] += 1
            started = time.perf_counter()
            kept, reason = flt(doc)
            seconds[flt.name] += time.perf_counter() - started
            if not kept:
                dropped[reason] += 1
                break
        else:
            licences.update(doc.metadata.get("licences") or ["(none)"])
    redactor = PIIRedactor(PIIConfig())
    totals: Counter[str] = Counter()
    started = time.perf_counter()
    for doc in docs:
        totals.update(redactor.redact(doc.text)[1])
    pii_s = time.perf_counter() - started
    return {"files": len(docs), "mean_chars": round(sum(len(d.text) for d in docs) / len(docs)),
            "filters": {f.name: {"us_per_doc": per_doc_us(seconds[f.name], reached[f.name]),
                                 "docs_reaching": reached[f.name]} for f in filters},
            "dropped": dict(dropped), "licences": dict(licences.most_common(10)),
            "pii_emails_ips": {"us_per_doc": per_doc_us(pii_s, len(docs)), "found": dict(totals)}}


def bench_secrets_fp(plugin_sets: list[str]) -> dict:
    from pipeline.filters.secrets import SecretScanner, all_plugins

    out = {}
    files = stdlib_files()
    for name in plugin_sets:
        scanner = SecretScanner(all_plugins() if name == "all" else None)
        flagged: dict[str, set[str]] = defaultdict(set)
        n = 0
        started = time.perf_counter()
        for path in files:
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            n += 1
            for _, secret_type, _ in scanner.scan(text, str(path)):
                flagged[secret_type].add(str(path.relative_to(STDLIB)))
        elapsed = time.perf_counter() - started
        any_file = set().union(*flagged.values()) if flagged else set()
        out[name] = {"plugins": list(scanner.plugins), "files": n, "files_flagged": len(any_file),
                     "files_flagged_outside_tests": sum(1 for f in any_file if "test" not in f.split("/")[0]
                                                        and "/test" not in f),
                     "per_type": {t: len(fs) for t, fs in sorted(flagged.items())},
                     "ms_per_file": round(elapsed / n * 1e3, 2)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--web-stride", type=int, default=4, help="every N-th page of the web corpus")
    parser.add_argument("--code-stride", type=int, default=2, help="every N-th stdlib .py file")
    parser.add_argument("--secrets-plugins", choices=["default", "all"], default="default")
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/filters_cost.json")
    args = parser.parse_args()
    result = {"web": bench_web(args.web_stride), "code": bench_code(args.code_stride),
              "secrets_false_positives": bench_secrets_fp(["default"] + (["all"] if args.secrets_plugins == "all" else []))}
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
