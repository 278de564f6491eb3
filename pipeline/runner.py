"""Run the pipeline on Ray: plan units, map each stage over them, resume, account, publish.

Why Ray tasks (not Ray Data): the unit is our unit of atomic output, of completion markers and of resume.
A task per (stage, unit) maps onto that one-to-one, so a rerun after a crash skips exactly the finished
units and a retried task rewrites exactly its own files. Ray Data's streaming blocks would give finer
parallelism but no stable, resumable output naming. Heavy per-worker state (fastText models,
tokenizers) is cached in the worker process, which Ray reuses across tasks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import time
import traceback
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.atomic import read_json, write_json
from pipeline.config import ConfigError, PipelineConfig
from pipeline.ledger import Ledger
from pipeline.shards import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SHARD_DIR,
    Manifest,
    ShardInfo,
    build_totals,
    sha256_file,
)
from pipeline.sources import plan_fingerprint, plan_units
from pipeline.sources.base import READ_STAGE, Unit
from pipeline.stages.base import MapStage
from pipeline.stages.crawl_filter import CrawlFilterStage
from pipeline.stages.dedup import DedupApplyStage, DedupSignatureStage, dedup_params, removal_parts, run_graph
from pipeline.stages.line_dedup import LineDedupApplyStage, LineHashStage, run_line_reduce
from pipeline.stages.quality import (
    QualityScoreStage,
    QualitySelectStage,
    compute_thresholds,
    model_digests,
    quality_summary,
)
from pipeline.stages.tokenize import TokenizeStage
from pipeline.tokenizer import TokenizerInfo, prepare_tokenizer, train_sample

log = logging.getLogger("pipeline")
STAGE_ORDER = [READ_STAGE, "crawl_filter", "quality", "url_dedup", "dedup", "line_dedup", "decontaminate", "tokenize"]
TOKENIZER_TRAIN_CPUS = 8   # BPE training's threads at most


class RunError(RuntimeError):
    """The run cannot continue; the message says why and what to do."""


@dataclass
class RunReport:
    run_dir: Path
    stats: dict[str, Any]
    manifest: Manifest | None  # None when the run stopped early (``until``): nothing is published yet
    seconds: float
    units: int
    resumed_units: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- Ray
_STAGES: OrderedDict[str, MapStage] = OrderedDict()


def _stage_of(ref: Any) -> MapStage:
    """The stage behind an object reference, deserialised once per worker process (a few kept): a stage may
    hold per-run tables that grow with the units (dedup's unit index), which Ray would otherwise unpickle
    for every task, making the cost per unit grow with the run."""
    import ray

    key = ref.hex()
    if key not in _STAGES:
        _STAGES[key] = ray.get(ref)
        while len(_STAGES) > 4:
            _STAGES.popitem(last=False)
    return _STAGES[key]


def _execute_unit(stage: MapStage | list, unit: Unit, run_dir: str) -> dict[str, Any]:
    """The body of one Ray task: process the unit, then write its completion marker, which lists the unit's
    outputs (path, bytes, sha256) so that a resume can tell a marker whose outputs went missing. ``stage``
    is the stage, or ``[ref]``: a reference in a list, which Ray passes unresolved (``_stage_of``)."""
    if isinstance(stage, list):
        stage = _stage_of(stage[0])
    root = Path(run_dir)
    started = time.perf_counter()
    result = stage.run_unit(unit, root)
    result["unit"] = unit.id
    result["task_seconds"] = round(time.perf_counter() - started, 4)   # busy time: wall x CPUs - this = overhead
    outputs = stage.unit_outputs(root, unit, result)
    dropped = stage.dropped_path(root, unit)
    if dropped.exists() and dropped not in outputs:   # the audit sample (pipeline.audit)
        outputs.append(dropped)
    result["outputs"] = [{"path": str(path.relative_to(root)), "bytes": path.stat().st_size,
                          "sha256": sha256_file(path)} for path in outputs]
    write_json(stage.marker_path(root, unit), result)
    return result


def _packed(pack: Any, shard: Unit, run_dir: Path) -> bool:
    """Whether a shard's pack marker exists, is of this plan, and its output is intact."""
    marker = pack.marker_path(run_dir, shard)
    if not marker.exists():
        return False
    result = read_json(marker)
    return result.get("pieces") == pack.pieces[shard.id] and outputs_intact(run_dir, result)


def _compact(result: dict[str, Any]) -> dict[str, Any]:
    """What the driver keeps of a unit's result until the run is published: not its outputs (checked from the
    marker file on resume), and the ledger as one JSON string (hundreds of bytes rather than a tree of small
    objects: the driver's memory per unit stays small at 10^5 units)."""
    kept = {k: v for k, v in result.items() if k != "outputs"}
    if isinstance(kept.get("ledger"), dict):
        kept["ledger"] = json.dumps(kept["ledger"], separators=(",", ":"))
    return kept


def outputs_intact(run_dir: Path, result: dict[str, Any]) -> bool:
    """Every output a marker lists still exists with its size (checksums are verified by ``inspect``)."""
    for out in result.get("outputs", ()):
        try:
            if (run_dir / out["path"]).stat().st_size != out["bytes"]:
                return False
        except FileNotFoundError:
            return False
    return True


# Distributions whose version changes what a run writes (extraction, filters, word splits, tokens, files).
OUTPUT_DISTRIBUTIONS = ("jamba-pretrain", "datatrove", "resiliparse", "fastwarc", "trafilatura", "spacy",
                        "fasttext-numpy2-wheel", "tokenizers", "pyarrow")


def output_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in OUTPUT_DISTRIBUTIONS:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "absent"
    return versions


def _sha256s(models: dict[str, Any]) -> dict[str, str]:
    """name -> sha256 from run.json's quality_models (a digest alone in runs recorded before sizes were)."""
    return {name: entry["sha256"] if isinstance(entry, dict) else entry for name, entry in models.items()}


def _remove_leftovers(directory: Path, depth: int = 4) -> None:
    """Temporary files of a killed run are never part of a result: remove them. One ``scandir`` pass over the
    directories outputs are written to (run dir, stages/<stage>, its subdirectories, shards), using the
    entry types the listing returns (no stat per file, no recursion into anything deeper)."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
        elif depth > 1 and entry.is_dir(follow_symlinks=False) and entry.name not in ("logs",):
            _remove_leftovers(Path(entry.path), depth - 1)


class StageWorker:
    """A Ray actor holding one stage: heavy resources (fastText models) load once, in ``__init__``."""

    def __init__(self, stage: MapStage):
        self.stage = stage
        warm = getattr(stage, "warm", None)
        if warm is not None:
            warm()

    def run(self, unit: Unit, run_dir: str) -> dict[str, Any]:
        return _execute_unit(self.stage, unit, run_dir)


def init_ray(address: str | None, num_cpus: int | None) -> None:
    import ray

    if ray.is_initialized():
        return
    env_vars = {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env_vars}, "log_to_driver": True,
                              "logging_level": logging.WARNING}
    if address:
        in_job = bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_JOB_SUBMISSION_ID"))
        if not in_job:
            # A client outside `ray job submit`: ship this package to the workers.
            kwargs["runtime_env"]["py_modules"] = [str(Path(__file__).resolve().parent)]
        ray.init(address=address, **kwargs)
    else:
        # The local Ray's processes inherit this process's environment: the workers get the variables that
        # way, without a job runtime_env (whose set-up costs each run's first tasks about a second). They are
        # set only while Ray starts: this driver keeps its own threads.
        del kwargs["runtime_env"]
        dashboard = os.environ.get("JAMBA_RAY_DASHBOARD", "1") != "0"
        with _environment(env_vars):
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=dashboard, dashboard_host="127.0.0.1",
                     **kwargs)


@contextlib.contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    """``variables`` set in this process's environment for the block, then put back as they were."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


# --------------------------------------------------------------------------------------------- run
class PipelineRun:
    def __init__(self, config: PipelineConfig, run_dir: Path, ray_address: str | None = None,
                 progress: bool = True, until: str | None = None):
        self.config = config
        # Stop after this stage (one scheduler task per stage, e.g. Airflow); a later call resumes from markers.
        if until is not None and until not in STAGE_ORDER[1:]:
            raise RunError(f"until: unknown stage {until!r} (one of {', '.join(STAGE_ORDER[1:])})")
        self.until = until
        self.run_dir = Path(run_dir).resolve()
        self.ray_address = ray_address or config.run.ray_address
        self.progress = progress and sys.stderr.isatty() or os.environ.get("JAMBA_PROGRESS") == "1"
        self.units: list[Unit] = []

    # ----------------------------------------------------------------- setup
    def _claim_run_dir(self) -> None:
        """One config per run directory: a rerun resumes; a different config is refused."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        run_info = self.run_dir / "run.json"
        fingerprint, plan = self.config.fingerprint(), plan_fingerprint(self.units)
        versions = output_versions()
        if run_info.exists():
            previous = read_json(run_info)
            changed = [f"{name} {previous['versions'].get(name)} -> {version}" for name, version in versions.items()
                       if "versions" in previous and previous["versions"].get(name) != version]
            if changed:
                raise RunError(f"the software that shapes the outputs changed since {self.run_dir} was started "
                               f"({', '.join(changed)}); use a new --output directory or the old versions")
            if previous.get("config_fingerprint") != fingerprint:
                raise RunError(
                    f"{self.run_dir} holds a run of a different configuration "
                    f"({previous.get('config_fingerprint')} != {fingerprint}); use a new --output directory")
            if _sha256s(previous.get("quality_models", {})) != _sha256s(self.model_digests):
                raise RunError(f"the quality model file(s) changed since {self.run_dir} was started; use a new "
                               f"--output directory")
            if previous.get("plan_fingerprint") != plan:
                raise RunError(
                    f"the input files, or how they are cut into units, changed since {self.run_dir} was started (plan "
                    f"{previous.get('plan_fingerprint')} != {plan}); use a new --output directory")
        else:
            write_json(run_info, {"config_fingerprint": fingerprint, "plan_fingerprint": plan,
                                  "units": len(self.units), "quality_models": self.model_digests,
                                  "versions": versions})
        resolved = self.config.model_dump(mode="json")
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        _remove_leftovers(self.run_dir)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / ".lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunError(f"another pipeline run is using {self.run_dir}") from None
            yield

    def _setup_logging(self) -> logging.Handler:
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.run_dir / "logs" / "pipeline.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        return handler

    # ----------------------------------------------------------------- stages
    def map_stage(self, stage: MapStage, units: list[Unit] | None = None) -> dict[str, dict[str, Any]]:
        """Run ``stage`` over every unit (of ``units``, default the run's) without a completion marker whose
        outputs are intact; return all those units' results."""
        import ray
        from tqdm import tqdm

        units = self.units if units is None else units
        results: dict[str, dict[str, Any]] = {}
        todo: list[Unit] = []
        redone = 0
        for unit in units:
            marker = stage.marker_path(self.run_dir, unit)
            result = read_json(marker) if marker.exists() else None
            if result is not None and outputs_intact(self.run_dir, result):
                results[unit.id] = _compact(result)
            else:
                redone += result is not None
                todo.append(unit)
        if redone:
            log.warning("stage %s: %d unit(s) have a completion marker but missing or changed outputs; redoing them",
                        stage.name, redone)
        self.resumed[stage.name] = len(results)
        log.info("stage %s: %d units to run, %d already complete", stage.name, len(todo), len(results))
        if not todo:
            return results
        started = time.perf_counter()
        retries = self.config.run.max_task_retries
        stage_ref = ray.put(stage)
        cpus = int(ray.available_resources().get("CPU", 1)) or 1
        max_in_flight = self.config.run.max_in_flight or max(2, 4 * cpus)
        run_dir = str(self.run_dir)
        if getattr(stage, "uses_actors", False):
            # Long-lived workers, each loading the stage's models once; a lost actor is restarted and its
            # in-flight unit retried (the unit rewrites only its own files, atomically).
            # Each actor declares the memory of its models, so Ray places actors by memory as well as CPU; the
            # pool follows the cluster as it grows (an autoscaled cluster starts with the head alone).
            actor_cls = ray.remote(StageWorker).options(num_cpus=1, memory=stage.actor_memory(),
                                                        max_restarts=retries, max_task_retries=retries)
            actors: list[Any] = []
            load: dict[int, int] = {}
            busy: dict[Any, int] = {}
            capacity = [max_in_flight]

            def grow(remaining: int) -> None:
                target = max(1, min(int(ray.cluster_resources().get("CPU", 1)), remaining + len(busy)))
                while len(actors) < target:
                    load[len(actors)] = 0
                    actors.append(actor_cls.remote(stage_ref))
                capacity[0] = min(max_in_flight, 2 * len(actors))

            grow(len(todo))

            def submit(unit: Unit) -> Any:
                index = min(load, key=load.get)
                load[index] += 1
                ref = actors[index].run.remote(unit, run_dir)
                busy[ref] = index
                return ref

            def release(ref: Any) -> None:
                load[busy.pop(ref)] -= 1
        else:
            remote = ray.remote(_execute_unit).options(num_cpus=1, max_retries=retries, retry_exceptions=False)
            actors = []
            capacity = [max_in_flight]

            def grow(remaining: int) -> None:  # more tasks in flight as nodes join
                if not self.config.run.max_in_flight:
                    capacity[0] = max(2, 4 * int(ray.cluster_resources().get("CPU", 1)))

            def submit(unit: Unit) -> Any:
                return remote.remote([stage_ref], unit, run_dir)

            def release(ref: Any) -> None:
                pass
        failures: dict[str, str] = {}
        pending: dict[Any, Unit] = {}
        queue = list(reversed(todo))
        bar = tqdm(total=len(units), initial=len(results), desc=f"{stage.name:>12}", unit="unit",
                   disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        with bar:
            last_grow = time.monotonic()
            while queue or pending:
                if queue and time.monotonic() - last_grow > 5.0:  # the cluster's size, every few seconds
                    grow(len(queue))
                    last_grow = time.monotonic()
                while queue and len(pending) < capacity[0]:
                    unit = queue.pop()
                    pending[submit(unit)] = unit
                # Many completions per call: the list of pending refs is built once per batch of results,
                # not once per result.
                refs = list(pending)
                done, _ = ray.wait(refs, num_returns=max(1, min(len(refs), len(refs) // 8)), timeout=1.0)
                for ref in done:
                    unit = pending.pop(ref)
                    release(ref)
                    try:
                        results[unit.id] = _compact(ray.get(ref))
                    except Exception as exc:  # a unit-level failure is a bug or a lost node: report, go on
                        failures[unit.id] = _short_error(exc)
                        log.error("stage %s unit %s failed: %s", stage.name, unit.describe(), exc)
                    bar.update(1)
        if actors:
            self.actors[stage.name] = len(actors)   # the pool's final size: it follows the cluster as it grows
        for actor in actors:
            ray.kill(actor)
        if failures:
            listing = "; ".join(f"{u}: {e}" for u, e in sorted(failures.items())[:5])
            raise RunError(f"stage {stage.name}: {len(failures)} unit(s) failed ({listing}). Completed units "
                           f"are kept; rerun the same command to retry only the failed ones.")
        self.wall_seconds[stage.name] = round(time.perf_counter() - started, 3)
        return results

    def run(self) -> RunReport:
        started = time.perf_counter()
        from pipeline.dedup.plan import check_budget

        check_budget(self.config.dedup, self.config.run.unit_target_mb)  # before any work: refuse, with numbers
        self.url_dedup_summary: dict | None = None
        if self.config.url_dedup.enabled:
            from pipeline.stages.url_dedup import check_url_index

            check_url_index(self.config.url_dedup, self.run_dir)         # an unusable index: refused here
        self.eval_index = self._eval_index()                             # a bad evaluation file: refused here
        self.model_digests = self._check_quality_models()
        self.units = plan_units(self.config)
        self.resumed: dict[str, int] = {}
        self.wall_seconds: dict[str, float] = {}
        self.actors: dict[str, int] = {}
        with self._lock():
            handler = self._setup_logging()
            try:
                self._claim_run_dir()
                log.info("run %s: %d sources, %d units", self.run_dir, len(self.config.sources), len(self.units))
                init_ray(self.ray_address, self.config.run.num_cpus)
                crawl = CrawlFilterStage(self.config)
                crawl_results = self.map_stage(crawl)
                self.domains = self._domains(crawl)
                if self.until == "crawl_filter":
                    return self._stopped(started)
                after_quality, quality_results, quality_done = self._quality(crawl)
                if self.until == "quality":
                    return self._stopped(started)
                after_urls, url_results, self.url_dedup_summary = self._url_dedup(after_quality)
                if self.until == "url_dedup":
                    return self._stopped(started)
                last, dedup_results, dedup_summary = self._dedup(after_urls)
                if self.until == "dedup":
                    return self._stopped(started)
                last, line_results, line_summary = self._line_dedup(last)
                if self.until == "line_dedup":
                    return self._stopped(started)
                last, decont_results, decont_summary = self._decontaminate(last)
                if self.until == "decontaminate":
                    return self._stopped(started)
                tok_cfg = self.config.tokenize
                tokenizer = prepare_tokenizer(
                    self.run_dir, tok_cfg.tokenizer, tok_cfg.eos_token, tok_cfg.train.vocab_size,
                    tok_cfg.train.min_frequency, int(tok_cfg.train.sample_mb * 1024 * 1024),
                    [last.output_path(self.run_dir, u) for u in self.units], train=self._train_tokenizer)
                score_key = self.config.quality.score_key if self.config.quality.enabled else None
                tokenize = TokenizeStage(last, tokenizer, tok_cfg.shard_target_mb, tok_cfg.batch_size, score_key)
                tok_results, shards = self._tokenize(tokenize, tokenizer)
                report = self._publish([crawl_results, quality_results, url_results, dedup_results, line_results,
                                        decont_results, tok_results],
                                       tokenizer, time.perf_counter() - started, dedup_summary, quality_done, shards,
                                       [tokenize.output_path(self.run_dir, u) for u in self.units],
                                       summaries={"line_dedup": line_summary, "decontamination": decont_summary})
            finally:
                log.removeHandler(handler)
                handler.close()
        return report

    def _domains(self, crawl: CrawlFilterStage) -> dict[str, Any]:
        """Top domains by kept and dropped pages per web source (``pipeline.stages.domains``)."""
        from pipeline.stages.domains import domain_summary

        started = time.perf_counter()
        web = [u for u in self.units if u.kind == "web"]
        summary = domain_summary(self.run_dir, web, crawl.domains_path, self.config.audit, log) if web else {}
        self.wall_seconds["domains"] = round(time.perf_counter() - started, 3)
        return summary

    def _stopped(self, started: float) -> RunReport:
        log.info("stopped after stage %s (until); rerun without --until to finish", self.until)
        stats = {"stopped_after": self.until, "units": len(self.units), "resumed_units": self.resumed,
                 "wall_seconds": self.wall_seconds, "actors": self.actors}
        return RunReport(self.run_dir, stats, None, time.perf_counter() - started, len(self.units), self.resumed)

    def _check_quality_models(self) -> dict[str, dict[str, Any]]:
        """Check every configured quality model before any work (a missing or corrupt file stops here), from
        its layout, without loading it; digests are reused from run.json while size and mtime match."""
        from pipeline.quality.model import QualityModelError

        if not self.config.quality.enabled:
            return {}
        run_info = self.run_dir / "run.json"
        recorded = read_json(run_info).get("quality_models", {}) if run_info.exists() else {}
        try:
            return model_digests(self.config.quality, recorded)
        except QualityModelError as exc:
            raise ConfigError(str(exc)) from None

    def _quality(self, crawl: MapStage) -> tuple[MapStage, dict, Any]:
        """Scores (map, actors), exact global thresholds, selection (map); or nothing when disabled."""
        cfg = self.config.quality
        if not cfg.enabled:
            return crawl, {}, None
        kinds = {s.name: s.kind for s in self.config.sources}
        scorer = QualityScoreStage(cfg, crawl, kinds)
        score_results = self.map_stage(scorer)
        started = time.perf_counter()
        import ray

        cpus = int(ray.cluster_resources().get("CPU", 1))  # the cluster's, not the driver host's
        thresholds = compute_thresholds(self.run_dir, scorer, self.units, cfg, kinds, tasks=max(1, cpus))
        self.wall_seconds["quality_thresholds"] = round(time.perf_counter() - started, 3)
        selector = QualitySelectStage(cfg, scorer, kinds, thresholds, self.config.audit)
        return selector, self.map_stage(selector), (kinds, score_results, thresholds)

    def _url_dedup(self, previous_stage: MapStage) -> tuple[MapStage, dict, dict | None]:
        """URL keys (map), the reduce by URL (global), removal (map); or nothing when disabled
        (``pipeline.stages.url_dedup``)."""
        from pipeline.stages.url_dedup import (
            URLDedupApplyStage,
            URLKeyStage,
            run_url_reduce,
            write_key_params,
        )

        cfg = self.config.url_dedup
        if not cfg.enabled:
            return previous_stage, {}, None
        unit_index = self._unit_index()
        keys = URLKeyStage(cfg, previous_stage, unit_index)
        keyed = self.map_stage(keys)
        write_key_params(self.run_dir, cfg, sum(r.get("with_url", 0) for r in keyed.values()))
        started = time.perf_counter()
        summary = run_url_reduce(self.run_dir, self.units, cfg, log, documents=keyed)
        self.wall_seconds["url_dedup_reduce"] = round(time.perf_counter() - started, 3)
        apply = URLDedupApplyStage(cfg, previous_stage, unit_index, self.config.audit)
        return apply, self.map_stage(apply), summary

    def _unit_index(self) -> dict[str, int]:
        """Unit id -> its position in id order: how the global stages' locations name a unit."""
        return {u.id: i for i, u in enumerate(sorted(self.units, key=lambda u: u.id))}

    def _dedup(self, crawl: MapStage) -> tuple[MapStage, dict, dict | None]:
        """Signatures (map), the duplicate graph (global), removal (map); or nothing when disabled."""
        cfg = self.config.dedup
        if not cfg.enabled:
            return crawl, {}, None
        unit_index = self._unit_index()
        signatures = DedupSignatureStage(cfg, crawl, unit_index)
        signed = self.map_stage(signatures)
        write_json(signatures.stage_dir(self.run_dir) / "params.json", dedup_params(cfg))
        started = time.perf_counter()
        documents = sum(r.get("documents", 0) for r in signed.values())
        summary = run_graph(self.run_dir, self.units, cfg, log, documents=documents)
        self.wall_seconds["dedup_graph"] = round(time.perf_counter() - started, 3)
        apply = DedupApplyStage(crawl, unit_index, removal_parts(cfg, len(self.units)), self.config.audit)
        return apply, self.map_stage(apply), summary

    def _line_dedup(self, previous: MapStage) -> tuple[MapStage, dict, dict | None]:
        """Line hashes (map), the frequent lines (global), their removal (map); or nothing when disabled or
        when no source is of the configured kinds."""
        cfg = self.config.line_dedup
        if not cfg.enabled or not any(s.kind in cfg.kinds for s in self.config.sources):
            return previous, {}, None
        self.map_stage(LineHashStage(cfg, previous))
        started = time.perf_counter()
        summary = run_line_reduce(self.run_dir, self.units, cfg, log)
        self.wall_seconds["line_dedup_reduce"] = round(time.perf_counter() - started, 3)
        apply = LineDedupApplyStage(cfg, previous, self.config.audit)
        return apply, self.map_stage(apply), summary

    def _eval_index(self):
        """The evaluation sets' n-gram index, built once on the driver (small: it travels inside the stage)."""
        cfg = self.config.decontamination
        if not cfg.benchmarks:
            return None
        from pipeline.decontaminate import EvalIndex

        try:
            return EvalIndex.build(cfg)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"decontamination.benchmarks: {exc}") from None

    def _decontaminate(self, previous: MapStage) -> tuple[MapStage, dict, dict | None]:
        """n-gram overlap with the evaluation sets (map); or nothing when no benchmark is configured."""
        if self.eval_index is None:
            return previous, {}, None
        from pipeline.stages.decontaminate import DecontaminateStage, decontamination_summary

        cfg = self.config.decontamination
        stage = DecontaminateStage(cfg, self.config.audit, previous, self.eval_index)
        results = self.map_stage(stage)
        return stage, results, decontamination_summary(cfg, self.eval_index, results.values())

    # ----------------------------------------------------------------- tokenize
    def _train_tokenizer(self, *args: Any) -> str:
        """``prepare_tokenizer``'s training (sampling and BPE) in one Ray task rather than in the driver, with
        the threads of up to ``TOKENIZER_TRAIN_CPUS`` CPUs of one node (the result does not depend on them)."""
        import ray

        per_node = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=1)
        cpus = max(1, min(per_node, TOKENIZER_TRAIN_CPUS))
        env = {"TOKENIZERS_PARALLELISM": "true", "RAYON_NUM_THREADS": str(cpus)}
        task = ray.remote(train_sample).options(num_cpus=cpus, max_retries=self.config.run.max_task_retries,
                                                runtime_env={"env_vars": env})
        started = time.perf_counter()
        result = ray.get(task.remote(*args))
        self.wall_seconds["tokenizer_training"] = round(time.perf_counter() - started, 3)
        return result

    def _tokenize(self, tokenize: TokenizeStage, tokenizer: TokenizerInfo) -> tuple[dict, list[ShardInfo]]:
        """Tokenize each unit into its token file, plan the shards, pack them (``pipeline/stages/pack.py``).

        With a stored plan, only the units feeding a shard that is not packed intact are (re)tokenized: a
        finished run's token files are deleted once it is published, and a rerun of it does no work."""
        from pipeline.stages import pack as packing

        run_dir = self.run_dir
        by_id = {u.id: u for u in self.units}
        plan = packing.load_plan(run_dir)
        needed = set(by_id)
        if plan is not None:
            stored = packing.PackStage(tokenize, tokenizer, plan)
            needed = {uid for shard in stored.shard_units() if not _packed(stored, shard, run_dir)
                      for uid in stored.units_of(shard.id)}
            needed |= {u.id for u in self.units if not tokenize.marker_path(run_dir, u).exists()}
        todo = [u for u in self.units if u.id in needed]
        if not todo:
            log.info("stage tokenize: 0 units to run, %d already complete (packed into intact shards)",
                     len(self.units))
        results = self.map_stage(tokenize, todo) if todo else {}
        outdated = [uid for uid, r in results.items() if "weight" not in r]   # markers of the per-unit shard layout
        if outdated:
            log.warning("stage tokenize: %d marker(s) of an older layout; redoing those units", len(outdated))
            for uid in outdated:
                tokenize.marker_path(run_dir, by_id[uid]).unlink()
            results.update(self.map_stage(tokenize, [by_id[uid] for uid in outdated]))
        self.resumed[tokenize.name] = len(self.units) - len(todo) + self.resumed.get(tokenize.name, 0)
        for unit in self.units:
            if unit.id not in results:
                results[unit.id] = _compact(read_json(tokenize.marker_path(run_dir, unit)))
        table = [[u.id, results[u.id]["rows"], results[u.id]["weight"]] for u in self.units]
        itemsize = packing.itemsize_of(tokenizer)
        fresh = plan is None or plan["units"] != sorted(table) or plan["target_bytes"] != tokenize.target_bytes \
            or plan["itemsize"] != itemsize
        if fresh:
            if plan is not None:
                log.warning("stage pack: the stored plan does not match the tokenized units; planning again")
                if len(todo) < len(self.units):   # every token file must exist to plan
                    results.update(self.map_stage(tokenize))
            started = time.perf_counter()
            plan = packing.make_plan(
                table, tokenize.target_bytes, itemsize,
                lambda uid: packing.read_num_tokens(tokenize.output_path(run_dir, by_id[uid])))
            packing.save_plan(run_dir, plan)
            self.wall_seconds["pack_plan"] = round(time.perf_counter() - started, 3)
        pack = packing.PackStage(tokenize, tokenizer, plan)
        for shard in pack.shard_units():   # a marker of another plan is no marker of this one
            marker = pack.marker_path(run_dir, shard)
            if marker.exists() and read_json(marker).get("pieces") != pack.pieces[shard.id]:
                marker.unlink()
        packed = self.map_stage(pack, pack.shard_units())
        return results, [ShardInfo(**packed[name]["shard"]) for name in pack.order]

    # ----------------------------------------------------------------- outputs
    def _publish(self, stage_results: list[dict], tokenizer: TokenizerInfo, seconds: float,
                 dedup_summary: dict | None, quality_done: Any = None, shards: list[ShardInfo] | None = None,
                 consumed: list[Path] | None = None, summaries: dict[str, dict | None] | None = None) -> RunReport:
        """Stats, then the manifest of ``shards`` if the accounting holds; then the token files the shards
        were packed from (``consumed``) are deleted."""
        shards = shards or []
        ledger = Ledger()
        for results in stage_results:
            for unit in self.units:
                if unit.id in results:
                    booked = results[unit.id]["ledger"]
                    ledger.merge(Ledger.from_json(json.loads(booked) if isinstance(booked, str) else booked))
        stats = ledger.stats(STAGE_ORDER)
        if quality_done is not None:
            kinds, score_results, thresholds = quality_done
            models = {name: {"path": spec.path, "label": spec.label,
                             "sha256": self.model_digests.get(name, {}).get("sha256")}
                      for name, spec in self.config.quality.models.items()}
            stats["quality"] = quality_summary(self.config.quality, kinds, score_results, self.units, thresholds,
                                               stats, models)
        if self.url_dedup_summary is not None:
            stats["url_dedup"] = self.url_dedup_summary
        if dedup_summary is not None:
            stats["dedup"] = dedup_summary
        if self.domains:
            stats["domains"] = self.domains
        for key, summary in (summaries or {}).items():   # global stages' summaries (line_dedup)
            if summary is not None:
                stats[key] = summary
        kinds = {s.name: s.kind for s in self.config.sources}
        manifest = Manifest(format_version=FORMAT_VERSION, config_fingerprint=self.config.fingerprint(),
                            tokenizer=tokenizer.to_json(), shards=shards, totals=build_totals(shards, kinds))
        for source in self.config.sources:
            manifest.totals.setdefault(source.name, {"kind": source.kind, "rows": 0, "tokens": 0})
        for source, total in manifest.totals.items():   # the shards hold exactly what tokenize kept
            kept = stats["stages"].get("tokenize", {}).get(source, {}).get("kept", 0)
            if total["rows"] != kept:
                stats["invariant_ok"] = False
                stats["violations"].append(f"shards: {source}: {total['rows']} rows, tokenize kept {kept}")
        stats["units"] = len(self.units)
        stats["shards"] = len(shards)
        stats["resumed_units"] = self.resumed
        stats["wall_seconds"] = self.wall_seconds          # this invocation's work (resumed stages: absent)
        stats["actors"] = self.actors                      # actor stages: the pool size they reached
        stats["tokens"] = manifest.total_tokens
        write_json(self.run_dir / "stats.json", stats, sort_keys=False)  # stages in pipeline order
        if not stats["invariant_ok"]:
            # Nothing is published from a run whose accounting does not add up (an earlier manifest neither).
            (self.run_dir / MANIFEST_NAME).unlink(missing_ok=True)
            raise RunError("accounting invariant violated: " + "; ".join(stats["violations"][:5]))
        manifest.save(self.run_dir)
        listed = {Path(s.path).name for s in shards}
        for stray in (self.run_dir / SHARD_DIR).glob("*.arrow"):
            if stray.name not in listed:  # a shard of an older, different run layout can't be valid here
                stray.unlink()
        for path in consumed or ():   # packed into the published shards; a rerun needs them no more
            path.unlink(missing_ok=True)
        log.info("run complete: %d shards, %d tokens", len(shards), manifest.total_tokens)
        return RunReport(self.run_dir, stats, manifest, seconds, len(self.units), self.resumed)


def _short_error(exc: BaseException) -> str:
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()
    return text[-1][:300] if text else type(exc).__name__

