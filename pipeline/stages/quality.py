"""Quality: score every document with a fastText classifier, then select by the source's policy.

Three phases, like dedup (docs/architecture.md):

1. ``QualityScoreStage`` (map, on Ray *actors* that each load their fastText models once): every document
   gets ``metadata[score_key]`` = P(label) under its policy's model; nothing is dropped here. Besides the
   scored documents it writes ``<unit>.scores.arrow`` (source, score) for the threshold pass.
2. ``compute_thresholds`` (global): for each ``percentile`` source, the exact threshold by two radix-select
   passes over the score files (``pipeline.quality.select``); written once to ``thresholds.json``.
3. ``QualitySelectStage`` (map): keeps or drops each document by its policy; the ledger books the drops
   (``quality_below_threshold``, ``quality_below_percentile``, ``quality_pareto``) and unscorable documents.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path, read_json, write_json
from pipeline.audit import DropSampler
from pipeline.config import AuditConfig, QualityConfig
from pipeline.document import DOC_SCHEMA
from pipeline.ledger import Ledger
from pipeline.quality import select
from pipeline.quality.model import FastTextHeader, QualityModel, QualityModelError, check_model_file
from pipeline.shards import sha256_file
from pipeline.sources.base import Unit
from pipeline.stages.base import STAGES_DIR, MapStage, worker_cached

STAGE = "quality"            # the ledger's name for the whole step
SCORE_STAGE = "quality_score"
SELECT_STAGE = "quality_select"
SCORES_SCHEMA = pa.schema([("source", pa.string()), ("score", pa.float32())])
DROP_REASONS = {"threshold": "quality_below_threshold", "percentile": "quality_below_percentile",
                "pareto": "quality_pareto"}


def load_models(cfg: QualityConfig) -> dict[str, QualityModel]:
    """Every model a policy uses, opened and checked (the driver calls this before any work starts).

    Raises ``QualityModelError`` whose message starts with the config key of the failing model.
    """
    used = {p.model for p in cfg.policies.values() if p.mode != "exempt"}
    models = {}
    for name, spec in cfg.models.items():
        if name in used:
            try:
                models[name] = QualityModel.load(spec.path, spec.label, spec.max_chars)
            except QualityModelError as exc:
                raise QualityModelError(f"quality.models.{name}: {exc}") from None
    return models


def check_models(cfg: QualityConfig) -> dict[str, FastTextHeader]:
    """Every model a policy uses, checked from its file layout (no fastText load: the driver never holds a
    GB-scale classifier; the scoring actors load it). Errors start with the config key."""
    used = {p.model for p in cfg.policies.values() if p.mode != "exempt"}
    headers = {}
    for name, spec in cfg.models.items():
        if name in used:
            try:
                headers[name] = check_model_file(spec.path, spec.label)
            except QualityModelError as exc:
                raise QualityModelError(f"quality.models.{name}: {exc}") from None
    return headers


def model_digests(cfg: QualityConfig, recorded: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """{name: {sha256, bytes, mtime_ns}} of the models in use. A model whose size and modification time match
    what ``recorded`` (a run's run.json) says keeps its recorded digest: hashed once per run, not per call."""
    digests = {}
    for name in check_models(cfg):
        path = Path(cfg.models[name].path).expanduser()
        stat = path.stat()
        before = (recorded or {}).get(name)
        if isinstance(before, dict) and (before.get("bytes"), before.get("mtime_ns")) == (stat.st_size,
                                                                                          stat.st_mtime_ns):
            digests[name] = before
        else:
            digests[name] = {"sha256": sha256_file(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return digests


def actor_memory(cfg: QualityConfig) -> int:
    """Bytes a scoring actor holds: its models (fastText keeps the matrices as stored) and a working margin,
    declared to Ray so that it places actors by memory as well as by CPU."""
    used = {p.model for p in cfg.policies.values() if p.mode != "exempt"}
    files = sum(Path(spec.path).expanduser().stat().st_size for name, spec in cfg.models.items() if name in used)
    return int(files * 1.2) + 512 * 2**20


class QualityScoreStage(MapStage):
    name = SCORE_STAGE
    uses_actors = True   # the runner keeps one long-lived actor per CPU: models load once per actor

    def __init__(self, cfg: QualityConfig, input_stage: MapStage, kinds: dict[str, str]):
        self.cfg = cfg
        self.input_stage = input_stage
        self.kinds = kinds                          # source name -> kind

    def warm(self) -> None:
        self._models()

    def actor_memory(self) -> int:
        return actor_memory(self.cfg)

    def _models(self) -> dict[str, QualityModel]:
        key = tuple(f"{n}={s.path}:{s.label}:{s.max_chars}" for n, s in sorted(self.cfg.models.items()))
        return worker_cached((SCORE_STAGE, *key), lambda: load_models(self.cfg))

    def scores_path(self, run_dir: Path, unit: Unit) -> Path:
        return self.stage_dir(run_dir) / f"{unit.id}.scores.arrow"

    def unit_outputs(self, run_dir: Path, unit: Unit, result: dict[str, Any]) -> list[Path]:
        return [p for p in (self.output_path(run_dir, unit), self.scores_path(run_dir, unit)) if p.exists()]

    def run_unit(self, unit: Unit, run_dir: Path) -> dict[str, Any]:
        models = self._models()
        policy = self.cfg.policy_for(unit.source, self.kinds[unit.source])
        model = None if policy.mode == "exempt" else models[policy.model]
        ledger = Ledger()
        started = time.perf_counter()
        pf = pq.ParquetFile(self.input_stage.output_path(run_dir, unit))
        all_scores: list[np.ndarray] = []  # 4 bytes a document, for the histogram and the result
        errors: dict[str, int] = defaultdict(int)
        # Both outputs are written batch by batch: the unit is never held whole.
        with atomic_path(self.output_path(run_dir, unit)) as tmp, \
                pq.ParquetWriter(tmp, DOC_SCHEMA, compression="zstd") as writer, \
                atomic_path(self.scores_path(run_dir, unit)) as scores_tmp, \
                pa.OSFile(str(scores_tmp), "wb") as sink, pa.ipc.new_file(sink, SCORES_SCHEMA) as scores_out:
            meta_index = DOC_SCHEMA.get_field_index("metadata")
            for batch in pf.iter_batches(batch_size=self.cfg.batch_size):
                n = batch.num_rows
                if model is None:
                    scores = np.full(n, np.nan, dtype=np.float32)
                else:
                    # Texts are converted once (fastText needs Python strings) and written back from the
                    # original Arrow column; only the metadata column is rebuilt.
                    scores = _score_batch(model, batch.column("text").to_pylist(), errors)
                    metas = []
                    for meta_json, score in zip(batch.column("metadata").to_pylist(), scores):
                        meta = json.loads(meta_json)
                        if np.isnan(score):
                            meta[f"{self.cfg.score_key}_error"] = True
                        else:
                            meta[self.cfg.score_key] = round(float(score), 7)
                        metas.append(json.dumps(meta, sort_keys=True, ensure_ascii=False))
                    columns = list(batch.columns)
                    columns[meta_index] = pa.array(metas, pa.string())
                    batch = pa.RecordBatch.from_arrays(columns, schema=DOC_SCHEMA)
                writer.write_batch(batch)
                scores_out.write_batch(pa.RecordBatch.from_arrays(
                    [batch.column("source"), pa.array(scores, pa.float32(), mask=np.isnan(scores))],
                    schema=SCORES_SCHEMA))
                all_scores.append(scores)
        scores = np.concatenate(all_scores) if all_scores else np.zeros(0, np.float32)
        ledger.add_seconds(STAGE, unit.source, time.perf_counter() - started)
        valid = scores[~np.isnan(scores)]
        return {"ledger": ledger.to_json(), "documents": len(scores), "scored": int(valid.size),
                "score_errors": dict(errors), "score_sum": float(valid.astype(np.float64).sum()),
                "histogram": select.score_histogram(valid, self.cfg.histogram_bins) if valid.size else
                [0] * self.cfg.histogram_bins}


def _score_batch(model: QualityModel, texts: list[str], errors: dict[str, int]) -> np.ndarray:
    """Scores for a batch; one text that fastText rejects is scored NaN (an error), not the batch."""
    try:
        return model.score(texts)
    except Exception:
        scores = np.empty(len(texts), dtype=np.float32)
        for i, text in enumerate(texts):
            try:
                scores[i] = model.score([text])[0]
            except Exception as exc:  # noqa: BLE001 - booked as an errored document by the select stage
                scores[i] = np.nan
                errors[type(exc).__name__] += 1
        return scores


# ------------------------------------------------------------------------------- phase 2: thresholds
def _high_task(paths: list[str], sources: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out: dict[str, list] = defaultdict(list)
    for keys_by_source in _keys_by_source(paths, sources):
        for source, keys in keys_by_source.items():
            out[source].append(select.high_counts(keys))
    return {s: _sparse_sum(parts) for s, parts in out.items()}


def _low_task(paths: list[str], buckets: dict[str, list[int]]) -> dict[tuple[str, int], tuple]:
    out: dict[tuple[str, int], list] = defaultdict(list)
    for keys_by_source in _keys_by_source(paths, list(buckets)):
        for source, keys in keys_by_source.items():
            for bucket in buckets[source]:
                out[(source, bucket)].append(select.low_counts(keys, bucket))
    return {k: _sparse_sum(parts) for k, parts in out.items()}


def _keys_by_source(paths: list[str], sources: list[str]):
    wanted = set(sources)
    for path in paths:
        table = pa.ipc.open_file(pa.memory_map(path)).read_all()
        src = np.asarray(table.column("source").to_pylist(), dtype=object)
        score = table.column("score").to_numpy(zero_copy_only=False)
        result = {}
        for source in wanted.intersection(np.unique(src).tolist() if len(src) else []):
            chosen = score[(src == source) & ~np.isnan(score)]
            if chosen.size:
                result[source] = select.score_keys(chosen.astype(np.float32))
        yield result


def _sparse_sum(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    index = np.concatenate([p[0] for p in parts])
    counts = np.concatenate([p[1] for p in parts])
    keys, inverse = np.unique(index, return_inverse=True)
    return keys, np.bincount(inverse, weights=counts).astype(np.int64)


def compute_thresholds(run_dir: Path, stage: QualityScoreStage, units: list[Unit], cfg: QualityConfig,
                       kinds: dict[str, str], tasks: int) -> dict[str, Any]:
    """Exact per-source percentile thresholds over the whole run; resumable as a whole (marker last)."""
    import ray

    marker = stage.stage_dir(run_dir) / "thresholds.json"
    if marker.exists():
        return read_json(marker)
    wanted = {}
    for source, kind in kinds.items():
        policy = cfg.policy_for(source, kind)
        if policy.mode == "percentile":
            wanted[source] = select.keep_percent_to_q(policy.keep_percent)
    result: dict[str, Any] = {"method": "exact radix select over float32 scores; numpy.percentile 'linear'",
                              "thresholds": {}}
    paths = sorted({str(stage.scores_path(run_dir, u)) for u in units if u.source in wanted})
    if wanted and paths:
        groups = [paths[i::tasks] for i in range(min(tasks, len(paths)))]
        high = ray.remote(_high_task).options(num_cpus=1, max_retries=3)
        highs: dict[str, list] = defaultdict(list)
        for part in ray.get([high.remote(g, list(wanted)) for g in groups]):
            for source, sparse in part.items():
                highs[source].append(sparse)
        plan: dict[str, dict] = {}
        for source, q in wanted.items():
            if source not in highs:
                continue                      # no scored document: nothing to select from
            hist = select.dense(highs[source])
            n = int(hist.sum())
            lo, hi, weight = select.percentile_ranks(n, q)
            plan[source] = {"n": n, "q": q, "weight": weight,
                            "ranks": [select.locate(hist, lo), select.locate(hist, hi)]}
        buckets = {s: sorted({b for b, _ in p["ranks"]}) for s, p in plan.items()}
        low = ray.remote(_low_task).options(num_cpus=1, max_retries=3)
        lows: dict[tuple[str, int], list] = defaultdict(list)
        for part in ray.get([low.remote(g, buckets) for g in groups]):
            for key, sparse in part.items():
                lows[key].append(sparse)
        for source, p in plan.items():
            values = []
            for bucket, rank_in_bucket in p["ranks"]:
                low_value, _ = select.locate(select.dense(lows[(source, bucket)]), rank_in_bucket)
                values.append(select.key_value(bucket, low_value))
            threshold = select.lerp(values[0], values[1], p["weight"])
            result["thresholds"][source] = {"threshold": threshold, "percentile": p["q"], "scored": p["n"],
                                            "order_statistics": values}
    write_json(marker, result)
    return result


# --------------------------------------------------------------------------------- phase 3: select
class QualitySelectStage(MapStage):
    name = SELECT_STAGE

    def __init__(self, cfg: QualityConfig, score_stage: QualityScoreStage, kinds: dict[str, str],
                 thresholds: dict[str, Any], audit: AuditConfig | None = None):
        self.cfg = cfg
        self.audit = audit or AuditConfig(dropped_per_reason=0)
        self.score_stage = score_stage
        self.kinds = kinds
        self.thresholds = {s: t["threshold"] for s, t in thresholds.get("thresholds", {}).items()}

    def output_path(self, run_dir: Path, unit: Unit) -> Path:
        return run_dir / STAGES_DIR / STAGE / f"{unit.id}.parquet"

    def marker_path(self, run_dir: Path, unit: Unit) -> Path:
        return run_dir / STAGES_DIR / STAGE / f"{unit.id}.done.json"

    def stage_dir(self, run_dir: Path) -> Path:
        return run_dir / STAGES_DIR / STAGE

    def run_unit(self, unit: Unit, run_dir: Path) -> dict[str, Any]:
        policy = self.cfg.policy_for(unit.source, self.kinds[unit.source])
        ledger = Ledger()
        started = time.perf_counter()
        pf = pq.ParquetFile(self.score_stage.output_path(run_dir, unit))
        scores_table = pa.ipc.open_file(pa.memory_map(str(self.score_stage.scores_path(run_dir, unit)))).read_all()
        scores = scores_table.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
        done = kept_total = 0
        sampler = DropSampler(self.audit.dropped_per_reason, self.audit.dropped_max_chars)
        # Decided and written batch by batch (every policy decides each document alone: a threshold, the
        # run's percentile threshold, or a Pareto draw from its id): the unit is never held whole.
        with atomic_path(self.output_path(run_dir, unit)) as tmp, \
                pq.ParquetWriter(tmp, pf.schema_arrow, compression="zstd") as writer:
            for batch in pf.iter_batches(batch_size=self.cfg.batch_size):
                n = batch.num_rows
                part = scores[done:done + n]
                done += n
                ids = batch.column("id").to_pylist()
                nbytes = pc.binary_length(batch.column("text")).to_pylist()     # UTF-8 bytes, no Python strings
                keep = self._decide(policy, unit.source, part, ids)
                unscored = np.isnan(part) & (policy.mode != "exempt")
                for i, (source, kind) in enumerate(zip(batch.column("source").to_pylist(),
                                                       batch.column("source_kind").to_pylist())):
                    ledger.took(STAGE, source, kind, 1, nbytes[i])
                    if unscored[i]:
                        ledger.errored(STAGE, source, kind, "quality_score_failed", 1, nbytes[i])
                    elif keep[i]:
                        ledger.kept(STAGE, source, kind, 1, nbytes[i])
                    else:
                        ledger.dropped(STAGE, source, kind, DROP_REASONS[policy.mode], 1, nbytes[i])
                        sampler.offer(DROP_REASONS[policy.mode], ids[i], source,
                                      lambda i=i, b=batch: b.column("text")[i].as_py(),
                                      lambda i=i, b=batch, p=part: {**json.loads(b.column("metadata")[i].as_py()),
                                                                    "quality_score": float(p[i])})
                kept = keep & ~unscored
                kept_total += int(kept.sum())
                if kept.any():
                    writer.write_batch(batch.filter(pa.array(kept)))
            if done != len(scores):
                raise ValueError(f"{unit.id}: {done} documents but {len(scores)} scores")
        sampler.write(self.dropped_path(run_dir, unit))
        ledger.add_seconds(STAGE, unit.source, time.perf_counter() - started)
        return {"ledger": ledger.to_json(), "documents": done, "kept": kept_total}

    def _decide(self, policy, source: str, scores: np.ndarray, ids: list[str]) -> np.ndarray:
        n = len(ids)
        if policy.mode in ("keep", "exempt"):
            return np.ones(n, dtype=bool)
        if policy.mode == "threshold":
            return scores >= policy.min_score
        if policy.mode == "percentile":
            if source not in self.thresholds:     # no document of this source was scored
                return np.zeros(n, dtype=bool)
            return scores >= self.thresholds[source]
        return select.pareto_keep(np.nan_to_num(scores, nan=0.0), ids, policy.seed, policy.alpha)


def quality_summary(cfg: QualityConfig, kinds: dict[str, str], score_results: dict[str, dict],
                    units: list[Unit], thresholds: dict[str, Any], stats: dict[str, Any],
                    models: dict[str, dict]) -> dict[str, Any]:
    """stats.json's ``quality`` section: per source, policy, model, threshold, histogram, kept fraction."""
    per_source: dict[str, dict[str, Any]] = {}
    bins = cfg.histogram_bins
    for unit in units:
        r = score_results.get(unit.id)
        if r is None:
            continue
        entry = per_source.setdefault(unit.source, {"documents": 0, "scored": 0, "score_sum": 0.0,
                                                    "histogram": [0] * bins, "score_errors": {}})
        entry["documents"] += r["documents"]
        entry["scored"] += r["scored"]
        entry["score_sum"] += r["score_sum"]
        entry["histogram"] = [a + b for a, b in zip(entry["histogram"], r["histogram"])]
        for k, v in r["score_errors"].items():
            entry["score_errors"][k] = entry["score_errors"].get(k, 0) + v
    quality_stage = stats.get("stages", {}).get(STAGE, {})
    out: dict[str, Any] = {"models": models, "histogram_edges": [i / bins for i in range(bins + 1)], "sources": {}}
    for source, entry in per_source.items():
        policy = cfg.policy_for(source, kinds[source])
        booked = quality_stage.get(source, {})
        took = booked.get("in", 0)
        summary = {"policy": policy.model_dump(mode="json"), "documents": entry["documents"],
                   "scored": entry["scored"],
                   "mean_score": round(entry["score_sum"] / entry["scored"], 6) if entry["scored"] else None,
                   "histogram": entry["histogram"], "score_errors": entry["score_errors"],
                   "kept": booked.get("kept", 0), "kept_fraction": round(booked.get("kept", 0) / took, 6) if took else None}
        if source in thresholds.get("thresholds", {}):
            summary["threshold"] = thresholds["thresholds"][source]["threshold"]
        elif policy.mode == "threshold":
            summary["threshold"] = policy.min_score
        out["sources"][source] = summary
    return out

