"""Decontamination benchmark: our n-gram matching vs datatrove's ``NGramsDecontFilter``, same documents.

Documents (real, from the package caches ``python -m pipeline fetch-demo --scale test`` fills): the text of
every page of the Python docs and of the Debian handbook in several languages (resiliparse extraction), the
test corpus' books in chapters, and this interpreter's standard library (top-level modules). A few of them
get a real benchmark item planted (HumanEval into code, MMLU into web pages, GSM8K into books). Benchmarks:
``python -m pipeline fetch-evals``' three sets.

* ours: ``EvalIndex.build`` (time, size), then ``EvalIndex.match_batch`` over batches of the stage's size
  and ``EvalIndex.match`` one document at a time, on one core (µs/doc, MB/s);
* datatrove: ``NGramsDecontIndexer`` builds its index on disk from a local JSONL through its ``JsonlReader``
  (query = prompt / question, label = solution / answer, with query and overlap n-grams: the n-grams we
  index), then ``NGramsDecontFilter.filter`` per document. Its indexer also loads lighteval tasks: with none
  asked for it still imports lighteval (not installed, and its tasks would be downloaded), so the bench
  gives it an empty stand-in registry and constructs the step without its dependency check; everything
  else is datatrove's own code;
* agreement: documents flagged by each, and documents whose words are identical (ours vs datatrove's
  ``simplify_text`` + its English spaCy tokenizer).

    .venv/bin/python bench/decontamination.py [--handbook-pages 40]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
import sysconfig
import tempfile
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HANDBOOK_LOCALES = ["en-US", "fr-FR", "de-DE", "es-ES", "ru-RU", "ja-JP", "zh-CN"]


def documents(handbook_pages: int) -> list[dict]:
    from pipeline.extract import ExtractSettings
    from pipeline.extract.html import HtmlToText
    from pipeline.realdata import build_demo_corpus, debian_package

    extract = HtmlToText(ExtractSettings())
    docs = []
    html = debian_package("python3.11-doc") / "root/usr/share/doc/python3.11/html"
    for page in sorted(html.rglob("*.html")):
        text = extract(page.read_bytes(), None).text
        if text:
            docs.append({"id": f"python-docs/{page.relative_to(html)}", "kind": "web", "text": text})
    handbook = debian_package("debian-handbook") / "root/usr/share/doc/debian-handbook/html"
    for locale in HANDBOOK_LOCALES:
        pages = sorted((handbook / locale).rglob("*.html"))
        for page in pages[:: max(1, len(pages) // handbook_pages)][:handbook_pages]:
            text = extract(page.read_bytes(), None).text
            if text:
                docs.append({"id": f"handbook/{locale}/{page.name}", "kind": "web", "text": text})
    corpus = build_demo_corpus(scale="test")
    for path in corpus.books:
        text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
        parts = re.split(r"\n(?=Chapter \d+\n)", text) if path.name.startswith("austen") else \
            ["\n\n".join(text.split("\n\n")[k:k + 60]) for k in range(0, len(text.split("\n\n")), 60)]
        docs += [{"id": f"books/{path.name}#{k}", "kind": "book", "text": part} for k, part in enumerate(parts)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        docs.append({"id": f"stdlib/{path.name}", "kind": "code", "text": path.read_text(errors="replace")})
    return docs


def eval_items(sets: dict[str, Path]) -> dict[str, list[dict]]:
    return {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in sets.items()}


def plant(docs: list[dict], items: dict[str, list[dict]], every: int = 25) -> dict[str, str]:
    """Every ``every``-th document of a kind gets one item inserted mid-text; returns doc id -> benchmark."""
    rng = np.random.default_rng(0)
    which = {"code": "humaneval", "web": "mmlu_dev", "book": "gsm8k_fewshot"}
    planted, seen = {}, {kind: 0 for kind in which}
    for doc in docs:
        seen[doc["kind"]] += 1
        if seen[doc["kind"]] % every:
            continue
        name = which[doc["kind"]]
        item = items[name][int(rng.integers(len(items[name])))]
        inserted = item["prompt"] + item["canonical_solution"] if name == "humaneval" else \
            f"{item['question']}\n{item['answer']}"
        at = len(doc["text"]) // 2
        doc["text"] = f"{doc['text'][:at]}\n\n{inserted}\n\n{doc['text'][at:]}"
        planted[doc["id"]] = name
    return planted


def datatrove_index(items: dict[str, list[dict]], folder: Path, n: int) -> float:
    """datatrove's indexer run from a local JSONL; returns its seconds."""
    from datatrove.pipeline.decont.n_grams import NGramsDecontConfig, NGramsDecontIndexer
    from datatrove.pipeline.readers import JsonlReader

    # lighteval stand-in: no task asked for, none loaded (see the module doc)
    registry = types.ModuleType("lighteval.tasks.registry")
    registry.Registry = type("Registry", (), {"__init__": lambda self, **kw: None,
                                              "get_task_dict": lambda self, tasks: {}})
    task = types.ModuleType("lighteval.tasks.lighteval_task")
    task.LightevalTask = type("LightevalTask", (), {"load_datasets": staticmethod(lambda tasks: None)})
    for name, module in (("lighteval", types.ModuleType("lighteval")),
                         ("lighteval.tasks", types.ModuleType("lighteval.tasks")),
                         ("lighteval.tasks.registry", registry), ("lighteval.tasks.lighteval_task", task)):
        sys.modules.setdefault(name, module)

    source = folder / "evals"
    source.mkdir(parents=True)
    with open(source / "items.jsonl", "w") as fh:
        for name, records in items.items():
            for rec in records:
                query, label = (rec["prompt"], rec["canonical_solution"]) if name == "humaneval" else \
                    (rec["question"], rec["answer"])
                fh.write(json.dumps({"id": rec["id"], "text": label, "query": query, "task": name}) + "\n")
    config = NGramsDecontConfig(n_grams=n, find_query_ngrams=True, find_overlap_ngrams=True)
    indexer = object.__new__(NGramsDecontIndexer)   # past the lighteval dependency check only
    indexer.__init__(str(folder / "index"), lighteval_tasks=[], config=config)
    started = time.perf_counter()
    indexer.run(data=JsonlReader(str(source))())
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--handbook-pages", type=int, default=40, help="pages per handbook locale")
    parser.add_argument("--datatrove-docs", type=int, default=0,
                        help="run datatrove on every k-th document only (0: all)")
    parser.add_argument("--output", default=str(ROOT / "bench/results/decontamination.json"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from datatrove.data import Document
    from datatrove.pipeline.decont.n_grams import NGramsDecontConfig, NGramsDecontFilter
    from datatrove.utils.text import simplify_text
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    from bench.common import write_result
    from pipeline.config import DecontaminationConfig
    from pipeline.decontaminate import EvalIndex, bulk_words, words
    from pipeline.realdata import EVAL_SETS, build_eval_sets
    from pipeline.stages.decontaminate import READ_BATCH

    sets = build_eval_sets()
    items = eval_items(sets)
    docs = documents(args.handbook_pages)
    planted = plant(docs, items)
    chars = sum(len(d["text"]) for d in docs)
    print(f"{len(docs)} documents, {chars / 1e6:.1f} M characters, {len(planted)} with a planted item", file=sys.stderr)

    cfg = DecontaminationConfig.model_validate(
        {"benchmarks": {name: {"paths": [str(p)], "fields": EVAL_SETS[name][1]} for name, p in sets.items()}})
    started = time.perf_counter()
    index = EvalIndex.build(cfg)
    build_seconds = time.perf_counter() - started
    index.match("warm up: the flag table is built on first use in each process")

    # as the stage does it: batches of READ_BATCH documents (one per kind at a time, as units are per source)
    ours: dict[str, dict] = {}
    by_kind: dict[str, list[dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    kind_seconds: dict[str, float] = {}
    cpu0 = time.process_time()
    for kind, group in by_kind.items():
        t0 = time.perf_counter()
        for k in range(0, len(group), READ_BATCH):
            chunk = group[k:k + READ_BATCH]
            for doc, found in zip(chunk, index.match_batch([d["text"] for d in chunk])):
                if found:
                    ours[doc["id"]] = {name: m.ngrams for name, m in found.items()}
        kind_seconds[kind] = time.perf_counter() - t0
    ours_seconds = sum(kind_seconds.values())
    ours_cpu = time.process_time() - cpu0
    # one document at a time (``match``)
    single = []
    for doc in docs:
        t0 = time.perf_counter()
        found = index.match(doc["text"])
        single.append(time.perf_counter() - t0)
        assert bool(found) == (doc["id"] in ours)

    with tempfile.TemporaryDirectory() as tmp:
        dt_build = datatrove_index(items, Path(tmp), cfg.ngram)
        index_files = sorted((Path(tmp) / "index").glob("*.index.hashes"))
        dt_hashes = {f.name.removesuffix(".index.hashes"): f.stat().st_size // 8 for f in index_files}
        dt_filter = NGramsDecontFilter(str(Path(tmp) / "index"),
                                       config=NGramsDecontConfig(n_grams=cfg.ngram, find_query_ngrams=True))
        t0 = time.perf_counter()
        dt_filter.load_index_hashes()
        dt_load = time.perf_counter() - t0
        dt_filter.filter(Document(text="warm up the tokenizer", id="warm"))
        sample = docs[:: args.datatrove_docs] if args.datatrove_docs else docs
        theirs: dict[str, str] = {}
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        for doc in sample:
            d = Document(text=doc["text"], id=doc["id"], metadata={})
            if dt_filter.filter(d) is not True:
                theirs[doc["id"]] = d.metadata.get("contaminated_task")
        dt_seconds = time.perf_counter() - t0
        dt_cpu = time.process_time() - cpu0

    tokenizer = load_word_tokenizer("en")
    same_words = sum(words(d["text"]) == tokenizer.word_tokenize(simplify_text(d["text"])) for d in sample)
    same_split = sum(words(d["text"]) == simplify_text(d["text"]).split() == bulk_words(d["text"]) for d in sample)
    sample_ids = {d["id"] for d in sample}
    ours_sample = {k for k in ours if k in sample_ids}
    sample_chars = sum(len(d["text"]) for d in sample)

    result = {
        "documents": len(docs), "characters": chars, "planted": len(planted),
        "load_average_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
        "ours": {
            "index_build_seconds": round(build_seconds, 3), "index_bytes": index.nbytes,
            "index": index.describe(),
            "batch": READ_BATCH, "us_per_doc": round(ours_seconds / len(docs) * 1e6, 1),
            "us_per_doc_by_kind": {k: round(kind_seconds[k] / len(v) * 1e6, 1) for k, v in sorted(by_kind.items())},
            "mb_per_s": round(chars / ours_seconds / 1e6, 2),
            "cpu_us_per_doc": round(ours_cpu / len(docs) * 1e6, 1),
            "one_at_a_time": {"us_per_doc": round(float(np.mean(single)) * 1e6, 1),
                              "median_us_per_doc": round(float(np.median(single)) * 1e6, 1),
                              "mb_per_s": round(chars / sum(single) / 1e6, 2)},
            "flagged": len(ours), "planted_found": sum(k in ours for k in planted),
            "planted_attributed": sum(k in ours and max(ours[k], key=ours[k].get) == b for k, b in planted.items()),
            "false_positives": sorted(k for k in ours if k not in planted),
        },
        "datatrove": {
            "index_build_seconds": round(dt_build, 3), "index_load_seconds": round(dt_load, 3),
            "index_hashes": dt_hashes, "documents": len(sample),
            "us_per_doc": round(dt_seconds / len(sample) * 1e6, 1),
            "mb_per_s": round(sample_chars / dt_seconds / 1e6, 3),
            "cpu_us_per_doc": round(dt_cpu / len(sample) * 1e6, 1),
            "flagged": len(theirs), "planted_found": sum(k in theirs for k in planted if k in sample_ids),
            "false_positives": sorted(k for k in theirs if k not in planted),
        },
        "agreement": {
            "flagged_by_both": len(ours_sample & set(theirs)),
            "only_ours": sorted(ours_sample - set(theirs)), "only_datatrove": sorted(set(theirs) - ours_sample),
            "documents_same_words_as_spacy": same_words, "documents_same_words_as_simplify_split": same_split,
            "documents_compared": len(sample),
        },
        "speedup_us_per_doc": round((dt_seconds / len(sample)) / (ours_seconds / len(docs)), 1),
    }
    write_result(args.output, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
