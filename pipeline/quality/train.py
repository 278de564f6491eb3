"""``python -m pipeline quality train``: a fastText quality classifier from labelled real text.

Positive sources (books, reference documentation) and negative sources (web pages, UI strings,
changelogs, or the crawl-filtered web of an earlier run) are read with the pipeline's own readers, cut
into examples (whole documents or ~``chunk_chars`` chunks on paragraph/line boundaries), sampled
deterministically by a hash of (seed, example id), split into train / held-out by another hash, written
one example per line (``__label__x text``, newlines replaced), and trained with ``fasttext.train_supervised``
(word bigrams by default, as DCLM). The held-out split is scored by the saved model through the same code
path the pipeline uses, and precision, recall, F1 and ROC-AUC go into ``card.json`` next to the model.
"""

from __future__ import annotations

import hashlib
import heapq
import importlib.metadata
import logging
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.atomic import atomic_path, write_json
from pipeline.config import (
    ConfigError,
    SourceConfig,
    SourceFormat,
    SourceKind,
    _format_validation_error,
    expand,
    read_yaml,
)
from pipeline.ledger import Ledger
from pipeline.quality.metrics import binary_metrics
from pipeline.quality.model import QualityModel, one_line
from pipeline.shards import sha256_file

log = logging.getLogger("pipeline.quality")
MODEL_NAME = "model.bin"
CARD_NAME = "card.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LabelledSource(_Strict):
    """Where examples of one class come from: files (read like a pipeline source) or a run's filtered text."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    kind: SourceKind = "web"
    format: SourceFormat | None = None
    paths: list[str] = Field(default_factory=list)
    include: list[str] | None = None
    exclude: list[str] = Field(default_factory=list)
    run: str | None = None                  # a pipeline run directory: its crawl-filtered documents
    run_sources: list[str] = Field(default_factory=list)   # which of the run's sources (default: all)
    split: Literal["document", "chunks"] = "chunks"
    chunk_chars: int = Field(default=1500, ge=50)
    min_chars: int = Field(default=100, ge=0)
    max_examples: int | None = Field(default=None, ge=1)
    extractor: Literal["resiliparse", "trafilatura"] = "resiliparse"   # web pages: as in a pipeline run

    @model_validator(mode="after")
    def _one_origin(self) -> LabelledSource:
        if bool(self.paths) == bool(self.run):
            raise ValueError("give either paths or run")
        return self


class FastTextParams(_Strict):
    lr: float = Field(default=0.1, gt=0)
    dim: int = Field(default=100, ge=1)
    ws: int = Field(default=5, ge=1)
    epoch: int = Field(default=5, ge=1)
    min_count: int = Field(default=1, ge=1)
    word_ngrams: int = Field(default=2, ge=1)
    bucket: int = Field(default=2_000_000, ge=0)
    loss: Literal["softmax", "hs", "ns", "ova"] = "softmax"
    thread: int = Field(default=1, ge=1)    # 1: the same data and seed give the same model

    def as_kwargs(self) -> dict[str, Any]:
        return {"lr": self.lr, "dim": self.dim, "ws": self.ws, "epoch": self.epoch, "minCount": self.min_count,
                "wordNgrams": self.word_ngrams, "bucket": self.bucket, "loss": self.loss, "thread": self.thread}


class QualityTrainConfig(_Strict):
    output: str | None = None
    positive_label: str = "__label__hq"
    negative_label: str = "__label__cc"
    positive: list[LabelledSource] = Field(min_length=1)
    negative: list[LabelledSource] = Field(min_length=1)
    seed: int = Field(default=0, ge=0)
    holdout_fraction: float = Field(default=0.1, gt=0, lt=1)
    balance: bool = True                    # downsample the larger class to the size of the smaller
    fasttext: FastTextParams = Field(default_factory=FastTextParams)

    @model_validator(mode="after")
    def _labels(self) -> QualityTrainConfig:
        for key in ("positive_label", "negative_label"):
            value = getattr(self, key)
            if not value.startswith("__label__") or any(c.isspace() for c in value):
                raise ValueError(f"{key}: a fastText label looks like __label__name (no spaces)")
        if self.positive_label == self.negative_label:
            raise ValueError("positive_label and negative_label must differ")
        names = [s.name for s in self.positive + self.negative]
        if len(names) != len(set(names)):
            raise ValueError("source names must be unique across positive and negative")
        return self


def load_train_config(path: str | os.PathLike[str]) -> QualityTrainConfig:
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    try:
        cfg = QualityTrainConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(str(path), err)) from None
    for group in ("positive", "negative"):
        for i, src in enumerate(getattr(cfg, group)):
            try:
                src.paths = [expand(p) for p in src.paths]
                src.run = expand(src.run) if src.run else None
            except KeyError as exc:
                raise ConfigError(f"{path}: {group}[{i}]: environment variable {exc.args[0]} is not set") from None
            where = src.paths or [src.run]
            for j, entry in enumerate(where):
                if not Path(entry).exists():
                    key = f"paths[{j}]" if src.paths else "run"
                    raise ConfigError(f"{path}: {group}[{i}].{key}: {entry} does not exist")
    if cfg.output:
        cfg.output = expand(cfg.output)
    return cfg


# ------------------------------------------------------------------------------------------- examples
def chunk_text(text: str, chunk_chars: int) -> Iterator[str]:
    """~chunk_chars pieces on paragraph boundaries; paragraphs longer than that split on lines, then hard."""
    pieces: list[str] = []
    for para in text.split("\n\n"):
        para = para.strip()
        if not para:
            continue
        if len(para) <= chunk_chars:
            pieces.append(para)
            continue
        for line in para.split("\n"):
            line = line.strip()
            while len(line) > chunk_chars:
                pieces.append(line[:chunk_chars])
                line = line[chunk_chars:]
            if line:
                pieces.append(line)
    current: list[str] = []
    size = 0
    for piece in pieces:
        if current and size + len(piece) > chunk_chars:
            yield "\n".join(current)
            current, size = [], 0
        current.append(piece)
        size += len(piece) + 1
    if current:
        yield "\n".join(current)


def _source_documents(src: LabelledSource, ledger: Ledger) -> Iterator[tuple[str, str]]:
    """(document id, text) from files via the pipeline's reader, or from a run's crawl-filtered Parquet."""
    if src.run:
        from pipeline.document import read_documents

        files = sorted((Path(src.run) / "stages" / "crawl_filter").glob("*.parquet"))
        if not files:
            raise ConfigError(f"{src.name}.run: {src.run} has no crawl-filtered documents (stages/crawl_filter)")
        wanted = set(src.run_sources)
        for file in files:
            for doc in read_documents(file):
                if not wanted or doc.metadata["source"] in wanted:
                    yield doc.id, doc.text
        return
    from pipeline.sources import reader_for
    from pipeline.sources.base import list_source_files

    source = SourceConfig(name=src.name, kind=src.kind, format=src.format, paths=src.paths, include=src.include,
                          exclude=src.exclude)
    reader = reader_for(source)
    extractor = None
    if source.format == "warc":  # pages arrive as HTML: decode and extract them as the crawl filter does
        from pipeline.config import ExtractionConfig
        from pipeline.extract import ExtractSettings, PageExtractor

        defaults = ExtractionConfig()
        extractor = PageExtractor(ExtractSettings(extractor=src.extractor, resiliparse=defaults.resiliparse,
                                                  trafilatura=defaults.trafilatura), defaults.timeout_s)
    for file in list_source_files(source, f"{src.name}.paths"):
        for doc in reader.read(file, ledger):
            if extractor is None:
                yield doc.id, doc.text
                continue
            result = extractor(doc.body, doc.header_charset)
            if result.outcome == "kept":
                yield doc.id, result.text
    if extractor is not None:
        extractor.close()


def _hash01(seed: int, salt: str, key: str) -> float:
    h = hashlib.blake2b(f"{seed}\x00{salt}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / float(1 << 64)


def collect_examples(src: LabelledSource, seed: int) -> list[tuple[str, str]]:
    """(example id, one-line text): every qualifying example, or a hash-chosen ``max_examples`` of them."""
    ledger = Ledger()
    heap: list[tuple[float, str, str]] = []     # max-heap on the hash via negation: keep the smallest
    seen = 0
    for doc_id, text in _source_documents(src, ledger):
        parts = [text] if src.split == "document" else chunk_text(text, src.chunk_chars)
        for i, part in enumerate(parts):
            if len(part) < src.min_chars:
                continue
            example_id = f"{doc_id}:{i}"
            line = one_line(part).strip()
            seen += 1
            rank = _hash01(seed, src.name, example_id)
            if src.max_examples is None:
                heap.append((-rank, example_id, line))
            elif len(heap) < src.max_examples:
                heapq.heappush(heap, (-rank, example_id, line))
            elif -heap[0][0] > rank:
                heapq.heapreplace(heap, (-rank, example_id, line))
    if not heap:
        raise ConfigError(f"{src.name}: no examples of at least {src.min_chars} characters were found")
    log.info("quality train: %s: %d examples (of %d)", src.name, len(heap), seen)
    return [(example_id, line) for _, example_id, line in sorted(heap, key=lambda t: t[1])]


# ------------------------------------------------------------------------------------------- training
def train_classifier(cfg: QualityTrainConfig, output: Path, progress: bool = False) -> dict[str, Any]:
    """Build the labelled set, train, evaluate on the held-out split, write ``model.bin`` + ``card.json``."""
    started = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    classes: dict[str, list[tuple[str, str, str]]] = {"positive": [], "negative": []}
    sources_card = []
    for group, label in (("positive", cfg.positive_label), ("negative", cfg.negative_label)):
        for src in getattr(cfg, group):
            examples = collect_examples(src, cfg.seed)
            classes[group] += [(src.name, eid, text) for eid, text in examples]
            sources_card.append({"name": src.name, "class": group, "label": label, "kind": src.kind,
                                 "paths": src.paths, "run": src.run, "split": src.split,
                                 "chunk_chars": src.chunk_chars, "examples": len(examples),
                                 "chars": sum(len(t) for _, t in examples)})
    if cfg.balance:
        n = min(len(classes["positive"]), len(classes["negative"]))
        for group in classes:  # the hash-smallest n of each class
            ranked = sorted(classes[group], key=lambda e: _hash01(cfg.seed, "balance", e[1]))
            classes[group] = sorted(ranked[:n], key=lambda e: e[1])
    train_rows, holdout_rows = [], []
    for group, label in (("positive", cfg.positive_label), ("negative", cfg.negative_label)):
        for source, eid, text in classes[group]:
            row = (label, source, eid, text)
            (holdout_rows if _hash01(cfg.seed, "holdout", eid) < cfg.holdout_fraction else train_rows).append(row)
    # A fixed, label-mixed order: fastText's SGD sees the file in order.
    train_rows.sort(key=lambda r: _hash01(cfg.seed, "order", r[2]))
    if not holdout_rows or not train_rows:
        raise ConfigError("quality train: too few examples for a train / held-out split")

    with tempfile.TemporaryDirectory(prefix="quality-train-") as work:
        train_file = Path(work) / "train.txt"
        with open(train_file, "w", encoding="utf-8") as fh:
            for label, _, _, text in train_rows:
                fh.write(f"{label} {text}\n")
        params = cfg.fasttext.as_kwargs()
        model_path = output / MODEL_NAME
        with atomic_path(model_path) as tmp:
            attempts = _train_with_retries(train_file, params, cfg.seed, progress, tmp)
    trained = QualityModel.load(model_path, cfg.positive_label)
    labels = np.array([r[0] == cfg.positive_label for r in holdout_rows])
    scores = trained.score([r[3] for r in holdout_rows])
    metrics = binary_metrics(labels, scores)
    per_source = {}
    for source in sorted({r[1] for r in holdout_rows}):
        mask = np.array([r[1] == source for r in holdout_rows])
        per_source[source] = {"examples": int(mask.sum()), "mean_score": round(float(scores[mask].mean()), 6)}
    card = {
        "model": MODEL_NAME, "sha256": sha256_file(model_path), "bytes": model_path.stat().st_size,
        "labels": {"positive": cfg.positive_label, "negative": cfg.negative_label},
        "score": f"P({cfg.positive_label})",
        "sources": sources_card,
        "counts": {"train": len(train_rows), "holdout": len(holdout_rows),
                   "train_positive": sum(r[0] == cfg.positive_label for r in train_rows),
                   "holdout_positive": int(labels.sum())},
        "holdout": {"fraction": cfg.holdout_fraction, "split": "by hash of (seed, example id)",
                    "metrics": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()},
                    "per_source": per_source},
        "hyperparameters": {**params, "seed": cfg.seed, "balance": cfg.balance},
        "training_attempts": attempts,
        "versions": {"fasttext": _version("fasttext-numpy2-wheel", "fasttext-numpy2", "fasttext"),
                     "jamba-pretrain": _version("jamba-pretrain"), "python": platform.python_version()},
        "train_seconds": round(time.perf_counter() - started, 3),
    }
    write_json(output / CARD_NAME, card, sort_keys=False)
    return card


def _train_with_retries(train_file: Path, params: dict[str, Any], seed: int, progress: bool,
                        model_path: Path) -> list[dict[str, Any]]:
    """Train in a fresh process (``fasttext_worker``). fastText stops with "Encountered NaN" when SGD
    diverges: retry once as configured, then at half the learning rate, and say so in the card."""
    import multiprocessing

    from pipeline.quality.fasttext_worker import train_and_save

    attempts: list[dict[str, Any]] = []
    context = multiprocessing.get_context("spawn")
    for lr in (params["lr"], params["lr"], params["lr"] / 2):
        with context.Pool(1) as pool:
            try:
                pool.apply(train_and_save, (str(train_file), {**params, "lr": lr}, seed, 2 if progress else 0,
                                            str(model_path)))
            except RuntimeError as exc:
                attempts.append({"lr": lr, "error": str(exc)})
                log.warning("quality train: fastText failed at lr %g (%s); retrying", lr, exc)
                continue
        attempts.append({"lr": lr, "error": None})
        params["lr"] = lr
        return attempts
    raise ConfigError(f"quality train: fastText training failed {len(attempts)} times ({attempts[-1]['error']}); "
                      f"try a lower fasttext.lr or a different fasttext.dim / fasttext.bucket")


def _version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None
