"""Per-core pipeline throughput on real data, side by side with the reference tools, in one run.

Measured on one core each (RAYON_NUM_THREADS=1, one process; our extraction child runs while its parent
waits, so one core is busy at a time), on the web benchmark corpus (``fetch-web``: ~2,650 real pages of
Python's docs, the Debian handbook in 10 locales, the Apache manual in 12; 13 WARC files):

1. WARC reading alone: warcio's ArchiveIterator, FastWARC's ArchiveIterator, and ours (gzip members +
   framing with exact accounting, FastWARC parsing each record): response pages/s and WARC MB/s.
2. web crawl-filter end to end (WARC -> URL -> extraction -> language ID -> C4 -> FineWeb -> Gopher -> bad words ->
   written Parquet), pages/s and WARC MB/s:
   ours-resiliparse, ours-trafilatura: ``CrawlFilterStage.run_unit`` over the web units (defaults:
              per-page time limit on, so extraction runs in the sandbox child)
   datatrove: ``LocalPipelineExecutor(tasks=1, workers=1)`` with WarcReader, Trafilatura(favour_precision)
              and URL, language, Gopher x2, C4, FineWeb, C4 bad-words filters with the same parameters, JsonlWriter
   plus our per-step breakdown (stats.json ``step_seconds``) and the extractor comparison: pages kept by
   each extractor, characters per kept page, agreement of the keep/drop decisions.
3. crawl filters alone on the same Resiliparse-extracted documents (no extraction, no I/O): ours vs
   datatrove's filter objects in FineWeb's order, with the decisions compared document by document.
4. tokenize (demo corpus): ``TokenizeStage.run_unit`` vs raw ``tokenizers.Tokenizer.encode_batch``.

Ratios (ours / reference, higher is better) are the result; absolute numbers vary with the machine.
Usage: python bench/pipeline_throughput.py [--scale demo|test] [--skip-datatrove] [--json PATH]
"""

from __future__ import annotations

import os

os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers is imported: one core for both sides
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _datatrove_lid_cache(lid_path: Path) -> None:
    """Put the local lid.176 model where datatrove's LanguageFilter looks before downloading."""
    from datatrove.io import cached_assets_path
    from datatrove.utils.lid import FT176LID
    from fsspec.core import strip_protocol

    folder = Path(cached_assets_path(library_name="datatrove", namespace="lid", subfolder="ft176"))
    target = folder / strip_protocol(FT176LID.MODEL_URL).replace("/", "_")  # datatrove's own naming
    if not target.exists():
        shutil.copyfile(lid_path, target)
    Path(f"{target}.completed").touch()


def _datatrove_badwords_cache() -> None:
    """Put our bad-words lists (npm's naughty-words, equal to datatrove's pinned LDNOOBW lists) where
    datatrove's C4BadWordsFilter looks before downloading, under its own file names."""
    from datatrove.io import cached_assets_path
    from datatrove.pipeline.filters import c4_filters
    from fsspec.core import strip_protocol

    from pipeline.realdata import badwords_lists

    lists = badwords_lists()
    folder = Path(cached_assets_path(library_name="datatrove", namespace="filters", subfolder="c4_badwords"))
    for lang in c4_filters._BADWORDS_LANGS:
        url = c4_filters._EN_BADWORDS_URL if lang == "en" else c4_filters._BADWORDS_URL + lang
        target = folder / strip_protocol(url).replace("/", "_")
        if not target.exists():
            shutil.copyfile(lists / f"{lang}.txt", target)
        Path(f"{target}.completed").touch()


def _datatrove_filters(cfg):
    from datatrove.pipeline.filters import (
        C4BadWordsFilter,
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
        LanguageFilter,
        URLFilter,
    )
    from tldextract import TLDExtract

    web = cfg.crawl_filter.web
    url = URLFilter(**web.url.params)
    url.tldextractor = TLDExtract(suffix_list_urls=(), cache_dir=None)
    return [url, LanguageFilter(languages=web.language.languages, language_threshold=web.language.threshold),
            GopherRepetitionFilter(**web.gopher_repetition.params), GopherQualityFilter(**web.gopher_quality.params),
            C4QualityFilter(**web.c4.params), FineWebQualityFilter(**web.fineweb.params),
            *([C4BadWordsFilter(**web.badwords.params)] if web.badwords.enabled else [])]  # C4: last


def web_config(web_root: Path, extractor: str = "resiliparse"):
    from pipeline.config import parse_config

    parts = ["python-docs", "debian-handbook", "apache-manual", "charsets"]
    return parse_config({"sources": [{"name": p, "kind": "web", "paths": [str(web_root / p)]} for p in parts],
                         "crawl_filter": {"web": {"extractor": extractor}}})


def bench_warc_reading(warcs: list[Path]) -> dict:
    from fastwarc.warc import ArchiveIterator as FastIterator
    from fastwarc.warc import WarcRecordType
    from warcio.archiveiterator import ArchiveIterator as WarcioIterator

    from pipeline.config import SourceConfig
    from pipeline.ledger import Ledger
    from pipeline.sources import reader_for
    from pipeline.sources.base import InputFile

    def warcio_pages() -> int:
        n = 0
        for path in warcs:
            with open(path, "rb") as fh:
                for record in WarcioIterator(fh):
                    if record.rec_type == "response":
                        record.content_stream().read()
                        n += 1
        return n

    def fastwarc_pages() -> int:
        n = 0
        for path in warcs:
            for record in FastIterator(str(path), record_types=WarcRecordType.response, parse_http=True):
                record.reader.read()
                n += 1
        return n

    reader = reader_for(SourceConfig(name="w", kind="web", paths=[str(warcs[0])]))

    def ours_pages() -> int:
        ledger = Ledger()
        return sum(1 for path in warcs
                   for _ in reader.read(InputFile(str(path), path.name, path.stat().st_size), ledger))

    mb = sum(p.stat().st_size for p in warcs) / 1e6
    out = {"warc_mb": mb}
    for name, fn in (("warcio", warcio_pages), ("fastwarc", fastwarc_pages), ("ours", ours_pages)):
        fn()
        seconds = min(_timed(fn) for _ in range(3))
        out[f"{name}_s"] = seconds
        out[f"{name}_mb_per_s"] = mb / seconds
    out["responses"] = fastwarc_pages()
    out["ratio_vs_warcio"] = out["warcio_s"] / out["ours_s"]
    out["ratio_vs_fastwarc"] = out["fastwarc_s"] / out["ours_s"]
    return out


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run_ours(cfg, work: Path) -> tuple[float, dict, dict[str, int]]:
    """(seconds, stats per stage and source, kept characters per kept page id)."""
    import pyarrow.parquet as pq

    from pipeline.ledger import Ledger
    from pipeline.sources import plan_units
    from pipeline.stages.crawl_filter import CrawlFilterStage

    units = plan_units(cfg)
    stage = CrawlFilterStage(cfg)
    stage.run_unit(min(units, key=lambda u: u.size), work / "warmup")  # models loaded, child started
    ledger = Ledger()
    started = time.perf_counter()
    for unit in units:
        ledger.merge(Ledger.from_json(stage.run_unit(unit, work)["ledger"]))
    seconds = time.perf_counter() - started
    kept: dict[str, int] = {}
    for unit in units:
        table = pq.read_table(stage.output_path(work, unit), columns=["id", "text"]).to_pydict()
        kept.update({i: len(t) for i, t in zip(table["id"], table["text"])})
    stats = ledger.stats(["read", "crawl_filter"])
    assert stats["invariant_ok"], stats["violations"]
    return seconds, stats["stages"], kept


def run_datatrove(cfg, warcs: list[Path], work: Path) -> tuple[float, int]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.readers import WarcReader
    from datatrove.pipeline.writers import JsonlWriter

    warc_dir = work / "warcs"
    warc_dir.mkdir()
    for i, path in enumerate(warcs):
        os.symlink(path, warc_dir / f"{i:02d}-{path.name}")
    pipeline = [WarcReader(str(warc_dir), glob_pattern="*.warc.gz"),
                # timeout generous enough that no page of the corpus times out: the same pages reach the filters
                Trafilatura(favour_precision=True, timeout=60.0),
                *_datatrove_filters(cfg), JsonlWriter(str(work / "datatrove-out"))]
    executor = LocalPipelineExecutor(pipeline=pipeline, tasks=1, workers=1, logging_dir=str(work / "dt-logs"))
    seconds = _timed(executor.run)
    return seconds, sum(1 for p in (work / "datatrove-out").glob("*") for _ in _lines(p))


def bench_crawl_filter(web_root: Path, warcs: list[Path], work: Path, skip_datatrove: bool) -> dict:
    mb = sum(p.stat().st_size for p in warcs) / 1e6
    out: dict = {"warc_mb": mb, "warc_files": len(warcs)}
    decisions: dict[str, dict[str, int]] = {}
    for extractor in ("resiliparse", "trafilatura"):
        cfg = web_config(web_root, extractor)
        seconds, stages, kept = run_ours(cfg, work / extractor)
        pages = sum(e["kept"] for e in stages["read"].values())
        steps: dict[str, float] = {}
        for entry in stages["crawl_filter"].values():
            for step, sec in entry.get("step_seconds", {}).items():
                steps[step] = steps.get(step, 0.0) + sec
        dropped: dict[str, int] = {}
        for entry in stages["crawl_filter"].values():
            for reason, n in entry["dropped"].items():
                key = reason.split(":")[0]
                dropped[key] = dropped.get(key, 0) + n
        out[extractor] = {"seconds": seconds, "pages": pages, "pages_per_s": pages / seconds,
                          "mb_per_s": mb / seconds, "kept": len(kept), "mean_kept_chars":
                          sum(kept.values()) / max(1, len(kept)), "step_ms_per_page":
                          {k: 1000 * v / pages for k, v in sorted(steps.items(), key=lambda kv: -kv[1])},
                          "dropped_by_step": dropped}
        decisions[extractor] = kept
    pages = out["resiliparse"]["pages"]
    a, b = set(decisions["resiliparse"]), set(decisions["trafilatura"])
    out["extractor_agreement"] = {"both_kept": len(a & b), "only_resiliparse": len(a - b),
                                  "only_trafilatura": len(b - a), "both_dropped": pages - len(a | b),
                                  "agreement": (pages - len(a ^ b)) / pages}
    if not skip_datatrove:
        cfg = web_config(web_root)
        seconds, kept = run_datatrove(cfg, warcs, work)
        out["datatrove"] = {"seconds": seconds, "pages_per_s": pages / seconds, "mb_per_s": mb / seconds,
                            "kept": kept}
        for extractor in ("resiliparse", "trafilatura"):
            out[extractor]["ratio_vs_datatrove"] = seconds / out[extractor]["seconds"]
    return out


def _lines(path: Path):
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        yield from fh


def bench_filters_only(web_root: Path, warcs: list[Path]) -> dict:
    from copy import deepcopy

    from datatrove.data import Document

    from pipeline.config import SourceConfig
    from pipeline.extract import ExtractSettings, HtmlToText
    from pipeline.filters.web import build_text_steps, run_text_steps
    from pipeline.ledger import Ledger
    from pipeline.sources import reader_for
    from pipeline.sources.base import InputFile

    cfg = web_config(web_root)
    reader = reader_for(SourceConfig(name="w", kind="web", paths=[str(web_root)]))
    to_text = HtmlToText(ExtractSettings())
    extracted = []
    for path in warcs:
        for page in reader.read(InputFile(str(path), path.name, path.stat().st_size), Ledger()):
            result = to_text(page.body, page.header_charset)
            if result.outcome == "kept":
                extracted.append(Document(text=result.text, id=page.id, metadata=dict(page.metadata)))
    ours = build_text_steps(cfg.crawl_filter)
    theirs = _datatrove_filters(cfg)[1:]  # FineWeb's order, without the URL filter (no text work)
    mb = sum(len(d.text.encode()) for d in extracted) / 1e6

    def run_theirs(batch) -> list[bool]:
        return [all(_keep(f.filter(d)) for f in theirs) for d in batch]

    def run_mine(batch) -> list[bool]:
        seconds: dict[str, float] = {}
        return [run_text_steps(d, ours, seconds)[0] == "kept" for d in batch]

    run_mine(deepcopy(extracted[:50]))  # warm-up: models and word splitters loaded
    run_theirs(deepcopy(extracted[:50]))
    batch = deepcopy(extracted)
    started = time.perf_counter()
    theirs_kept = run_theirs(batch)
    theirs_s = time.perf_counter() - started
    batch = deepcopy(extracted)
    started = time.perf_counter()
    ours_kept = run_mine(batch)
    ours_s = time.perf_counter() - started
    n = len(extracted)
    return {"documents": n, "mb": mb, "ours_s": ours_s, "datatrove_s": theirs_s, "ours_docs_per_s": n / ours_s,
            "datatrove_docs_per_s": n / theirs_s, "ours_mb_per_s": mb / ours_s, "datatrove_mb_per_s": mb / theirs_s,
            "ratio": theirs_s / ours_s, "kept": sum(ours_kept),
            "decisions_differ": sum(a != b for a, b in zip(ours_kept, theirs_kept))}


def _keep(result) -> bool:
    return result[0] if isinstance(result, tuple) else bool(result)


def bench_tokenize(cfg, units, work: Path) -> dict:
    import pyarrow.parquet as pq

    from pipeline.stages.crawl_filter import CrawlFilterStage
    from pipeline.stages.tokenize import TokenizeStage
    from pipeline.tokenizer import load_tokenizer, prepare_tokenizer

    run_dir = work / "tok"
    crawl = CrawlFilterStage(cfg)
    for unit in units:
        crawl.run_unit(unit, run_dir)
    files = [crawl.output_path(run_dir, u) for u in units]
    info = prepare_tokenizer(run_dir, None, cfg.tokenize.eos_token, cfg.tokenize.train.vocab_size,
                             cfg.tokenize.train.min_frequency, int(cfg.tokenize.train.sample_mb * 2**20), files)
    texts = [t for f in files for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    tokenizer = load_tokenizer(run_dir / info.path)
    batch = cfg.tokenize.batch_size

    def raw(method: str = "encode_batch") -> float:
        encode = getattr(tokenizer, method)
        started = time.perf_counter()
        for i in range(0, len(texts), batch):
            encode(texts[i:i + batch], add_special_tokens=False)
        return time.perf_counter() - started

    stage = TokenizeStage(crawl, info, cfg.tokenize.shard_target_mb, batch)

    def ours() -> float:
        started = time.perf_counter()
        for unit in units:
            stage.run_unit(unit, run_dir)
        return time.perf_counter() - started

    raw(), ours()  # warm-up
    raw_s = min(raw() for _ in range(2))
    fast_s = min(raw("encode_batch_fast") for _ in range(2)) if hasattr(tokenizer, "encode_batch_fast") else None
    ours_s = min(ours() for _ in range(2))
    return {"documents": len(texts), "mb": mb, "ours_s": ours_s, "raw_encode_batch_s": raw_s,
            "raw_encode_batch_fast_s": fast_s, "ours_mb_per_s": mb / ours_s, "raw_mb_per_s": mb / raw_s,
            "raw_fast_mb_per_s": mb / fast_s if fast_s else None, "ratio": raw_s / ours_s,
            "ratio_vs_fast": fast_s / ours_s if fast_s else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="demo", choices=["test", "demo", "full"], help="corpus for tokenize")
    parser.add_argument("--skip-datatrove", action="store_true", help="skip the (slow) datatrove end-to-end run")
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/pipeline_throughput.json")
    args = parser.parse_args()

    from pipeline.config import load_config
    from pipeline.realdata import build_demo_corpus, build_web_corpus, lid_model_path
    from pipeline.sources import plan_units

    web = build_web_corpus()
    corpus = build_demo_corpus(scale=args.scale)
    os.environ["JAMBA_DEMO_DATA"] = str(corpus.root)
    cfg = load_config(ROOT / "configs/pipeline/demo.yaml")
    units = plan_units(cfg)
    _datatrove_lid_cache(lid_model_path())
    _datatrove_badwords_cache()
    results = {"scale": args.scale, "python": sys.version.split()[0], "web_corpus": str(web.root)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("WARC reading ...", file=sys.stderr)
        results["warc_reading"] = bench_warc_reading(web.warcs)
        print("crawl-filter end to end (web) ...", file=sys.stderr)
        results["crawl_filter_end_to_end"] = bench_crawl_filter(web.root, web.warcs, work / "e2e", args.skip_datatrove)
        print("crawl filters only ...", file=sys.stderr)
        results["crawl_filters_only"] = bench_filters_only(web.root, web.warcs)
        print("tokenize ...", file=sys.stderr)
        results["tokenize"] = bench_tokenize(cfg, units, work)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print_report(results)
    print(f"results: {args.json}")
    return 0


def print_report(results: dict) -> None:
    rd, e2e, flt, tok = (results[k] for k in ("warc_reading", "crawl_filter_end_to_end", "crawl_filters_only",
                                               "tokenize"))
    res, tra, dt = e2e["resiliparse"], e2e["trafilatura"], e2e.get("datatrove")
    print(f"\n{'measure (1 core)':<46}{'ours':>10}{'reference':>11}{'ratio':>8}")
    print(f"{'WARC reading, MB/s (vs warcio)':<46}{rd['ours_mb_per_s']:>10.1f}{rd['warcio_mb_per_s']:>11.1f}"
          f"{rd['ratio_vs_warcio']:>8.2f}")
    print(f"{'WARC reading, MB/s (vs FastWARC iterator)':<46}{rd['ours_mb_per_s']:>10.1f}"
          f"{rd['fastwarc_mb_per_s']:>11.1f}{rd['ratio_vs_fastwarc']:>8.2f}")
    for name, run in (("resiliparse", res), ("trafilatura", tra)):
        ref = f"{dt['pages_per_s']:>11.2f}{run['ratio_vs_datatrove']:>8.2f}" if dt else ""
        print(f"{'web crawl-filter e2e, pages/s, ours-' + name:<46}{run['pages_per_s']:>10.2f}{ref}")
    if dt:
        print(f"{'web crawl-filter e2e, WARC MB/s, ours-resiliparse':<46}{res['mb_per_s']:>10.3f}{dt['mb_per_s']:>11.3f}")
    print(f"{'crawl filters only, docs/s':<46}{flt['ours_docs_per_s']:>10.1f}{flt['datatrove_docs_per_s']:>11.1f}"
          f"{flt['ratio']:>8.2f}   decisions differing: {flt['decisions_differ']}")
    print(f"{'tokenize incl. Arrow shards, text MB/s':<46}{tok['ours_mb_per_s']:>10.2f}{tok['raw_mb_per_s']:>11.2f}"
          f"{tok['ratio']:>8.2f}")
    print(f"\npages {res['pages']} ({e2e['warc_mb']:.1f} MB of WARC); kept: resiliparse {res['kept']}, trafilatura "
          f"{tra['kept']}" + (f", datatrove {dt['kept']}" if dt else ""))
    agree = e2e["extractor_agreement"]
    print(f"extractors agree on {agree['agreement']:.1%} of pages ({agree['both_kept']} kept by both, "
          f"{agree['only_resiliparse']} only resiliparse, {agree['only_trafilatura']} only trafilatura); "
          f"characters per kept page: {res['mean_kept_chars']:.0f} vs {tra['mean_kept_chars']:.0f}")
    for name, run in (("resiliparse", res), ("trafilatura", tra)):
        steps = ", ".join(f"{k} {v:.2f}" for k, v in run["step_ms_per_page"].items())
        print(f"ms per page, ours-{name}: {steps}")


if __name__ == "__main__":
    raise SystemExit(main())
