"""Per-core pipeline throughput on the real demo corpus, side by side with the reference tools, in one run.

Measured on one core each (RAYON_NUM_THREADS=1, one process), in this order:

1. web crawl-filter, end to end: WARC -> trafilatura -> URL -> language ID -> Gopher repetition ->
   Gopher quality -> C4 -> FineWeb -> written output.
   ours:      ``CrawlFilterStage.run_unit`` over the web units (Parquet output)
   datatrove: ``LocalPipelineExecutor(tasks=1, workers=1)`` with WarcReader, Trafilatura and the same
              filters with the same parameters, JsonlWriter output
2. crawl filters alone on the same extracted documents (no extraction, no I/O): ours vs datatrove's
   filter objects called in the same loop.
3. tokenize: ``TokenizeStage.run_unit`` (read Parquet, encode, append EOS, write Arrow shards) vs raw
   ``tokenizers.Tokenizer.encode_batch`` on the same texts.

Ratios (ours / reference, higher is better) are the result; absolute numbers vary with the machine.
Usage: python bench/pipeline_throughput.py [--scale demo|test] [--json bench/results/pipeline_throughput.json]
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


def _datatrove_filters(cfg):
    from datatrove.pipeline.filters import (
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
            C4QualityFilter(**web.c4.params), FineWebQualityFilter(**web.fineweb.params)]


def bench_crawl_filter(cfg, units, work: Path) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.readers import WarcReader
    from datatrove.pipeline.writers import JsonlWriter

    from pipeline.ledger import Ledger
    from pipeline.stages.crawl_filter import CrawlFilterStage

    web_units = [u for u in units if u.kind == "web"]
    stage = CrawlFilterStage(cfg)
    stage.run_unit(web_units[0], work / "warmup")  # load models once, as a long-running worker would
    started = time.perf_counter()
    ledger = Ledger()
    for unit in web_units:
        ledger.merge(Ledger.from_json(stage.run_unit(unit, work / "ours")["ledger"]))
    ours_s = time.perf_counter() - started
    stats = ledger.stats(["read", "crawl_filter"])["stages"]
    records = sum(e["in"] for e in stats["read"].values())
    pages = sum(e["kept"] + e["dropped"].get("no_text_extracted", 0) for e in stats["read"].values())
    kept = sum(e["kept"] for e in stats["crawl_filter"].values())
    warc_bytes = sum(f.size for u in web_units for f in u.files)

    warc_dir = work / "warcs"
    warc_dir.mkdir()
    for unit in web_units:
        for f in unit.files:
            os.symlink(f.url, warc_dir / Path(f.url).name)
    pipeline = [WarcReader(str(warc_dir), glob_pattern="*.warc.gz"),
                # timeout generous enough that no page of the corpus times out: the same pages reach the filters
                Trafilatura(favour_precision=True, timeout=60.0),
                *_datatrove_filters(cfg), JsonlWriter(str(work / "datatrove-out"))]
    executor = LocalPipelineExecutor(pipeline=pipeline, tasks=1, workers=1, logging_dir=str(work / "dt-logs"))
    started = time.perf_counter()
    executor.run()
    datatrove_s = time.perf_counter() - started
    dt_kept = sum(1 for p in (work / "datatrove-out").glob("*") for _ in _lines(p))
    return {"pages": pages, "warc_records": records, "warc_mb": warc_bytes / 1e6, "kept_ours": kept,
            "kept_datatrove": dt_kept, "ours_s": ours_s, "datatrove_s": datatrove_s,
            "ours_pages_per_s": pages / ours_s, "datatrove_pages_per_s": pages / datatrove_s,
            "ours_mb_per_s": warc_bytes / 1e6 / ours_s, "datatrove_mb_per_s": warc_bytes / 1e6 / datatrove_s,
            "ratio": datatrove_s / ours_s}


def _lines(path: Path):
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        yield from fh


def bench_filters_only(cfg, work: Path) -> dict:
    from copy import deepcopy

    from pipeline.config import SourceConfig
    from pipeline.filters.registry import build_filters
    from pipeline.ledger import Ledger
    from pipeline.sources import reader_for
    from pipeline.sources.base import InputFile

    # The read stage's output (before any filter), so both sides see every extracted page.
    extracted = []
    for source in cfg.sources:
        if source.kind != "web":
            continue
        reader = reader_for(SourceConfig(**source.model_dump()))
        for entry in source.paths:
            for warc in sorted(Path(entry).rglob("*.warc.gz")):
                extracted += list(reader.read(InputFile(str(warc), warc.name, warc.stat().st_size), Ledger()))
    ours = build_filters("web", cfg.crawl_filter)
    theirs = _datatrove_filters(cfg)
    mb = sum(len(d.text.encode()) for d in extracted) / 1e6

    def run(filters, call) -> float:
        batch = deepcopy(extracted)
        started = time.perf_counter()
        for doc in batch:
            for flt in filters:
                if not call(flt, doc):
                    break
        return time.perf_counter() - started

    run(ours, lambda f, d: f(d)[0])  # warm-up: models and word splitters loaded
    run(theirs, lambda f, d: _keep(f.filter(d)))
    ours_s = run(ours, lambda f, d: f(d)[0])
    theirs_s = run(theirs, lambda f, d: _keep(f.filter(d)))
    n = len(extracted)
    return {"documents": n, "mb": mb, "ours_s": ours_s, "datatrove_s": theirs_s, "ours_docs_per_s": n / ours_s,
            "datatrove_docs_per_s": n / theirs_s, "ours_mb_per_s": mb / ours_s, "datatrove_mb_per_s": mb / theirs_s,
            "ratio": theirs_s / ours_s}


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
    parser.add_argument("--scale", default="demo", choices=["test", "demo", "full"])
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/pipeline_throughput.json")
    args = parser.parse_args()

    from pipeline.config import load_config
    from pipeline.realdata import build_demo_corpus, lid_model_path
    from pipeline.sources import plan_units

    corpus = build_demo_corpus(scale=args.scale)
    os.environ["JAMBA_DEMO_DATA"] = str(corpus.root)
    cfg = load_config(ROOT / "configs/pipeline/demo.yaml")
    units = plan_units(cfg)
    _datatrove_lid_cache(lid_model_path())
    results = {"scale": args.scale, "python": sys.version.split()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("crawl-filter end to end (web) ...", file=sys.stderr)
        results["crawl_filter_end_to_end"] = bench_crawl_filter(cfg, units, work)
        print("crawl filters only ...", file=sys.stderr)
        results["crawl_filters_only"] = bench_filters_only(cfg, work)
        print("tokenize ...", file=sys.stderr)
        results["tokenize"] = bench_tokenize(cfg, units, work)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")

    e2e, flt, tok = results["crawl_filter_end_to_end"], results["crawl_filters_only"], results["tokenize"]
    print(f"\n{'measure (1 core)':<44}{'ours':>12}{'reference':>12}{'ratio':>8}")
    print(f"{'web crawl-filter e2e, pages/s':<44}{e2e['ours_pages_per_s']:>12.2f}{e2e['datatrove_pages_per_s']:>12.2f}"
          f"{e2e['ratio']:>8.2f}   (datatrove LocalPipelineExecutor)")
    print(f"{'web crawl-filter e2e, WARC MB/s':<44}{e2e['ours_mb_per_s']:>12.2f}{e2e['datatrove_mb_per_s']:>12.2f}")
    print(f"{'crawl filters only, docs/s':<44}{flt['ours_docs_per_s']:>12.1f}{flt['datatrove_docs_per_s']:>12.1f}"
          f"{flt['ratio']:>8.2f}   (datatrove filter objects)")
    print(f"{'crawl filters only, text MB/s':<44}{flt['ours_mb_per_s']:>12.2f}{flt['datatrove_mb_per_s']:>12.2f}")
    print(f"{'tokenize incl. Arrow shards, text MB/s':<44}{tok['ours_mb_per_s']:>12.2f}{tok['raw_mb_per_s']:>12.2f}"
          f"{tok['ratio']:>8.2f}   (raw tokenizers encode_batch)")
    if tok["raw_fast_mb_per_s"]:
        print(f"{'':<44}{'':>12}{tok['raw_fast_mb_per_s']:>12.2f}{tok['ratio_vs_fast']:>8.2f}   "
              f"(raw encode_batch_fast, no offsets)")
    print(f"\npages {e2e['pages']} ({e2e['warc_mb']:.1f} MB of WARC), kept ours {e2e['kept_ours']} / datatrove "
          f"{e2e['kept_datatrove']}; tokenized {tok['documents']} documents, {tok['mb']:.1f} MB")
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
