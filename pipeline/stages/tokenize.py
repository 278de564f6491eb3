"""Tokenize kept documents (HF tokenizers, batched), EOS appended, into one token file per unit
(``stages/tokenize/<unit>.arrow``, the shard format); ``pipeline.stages.pack`` packs them into shards."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.document import metadata_scores
from pipeline.ledger import Ledger
from pipeline.shards import SHARD_SUFFIX, ShardWriter
from pipeline.sources.base import Unit
from pipeline.stages.base import STAGES_DIR, MapStage, worker_cached
from pipeline.stages.pack import row_weight
from pipeline.tokenizer import TokenizerInfo, load_tokenizer

STAGE = "tokenize"


class TokenizeStage(MapStage):
    name = STAGE

    def __init__(self, input_stage: MapStage, tokenizer: TokenizerInfo, shard_target_mb: float, batch_size: int,
                 score_key: str | None = None):
        self.input_stage = input_stage
        self.score_key = score_key   # metadata key of the quality score carried into the shards
        self.tokenizer = tokenizer
        self.target_bytes = int(shard_target_mb * 1024 * 1024)
        self.batch_size = batch_size

    def output_path(self, run_dir: Path, unit: Unit) -> Path:
        return self.stage_dir(run_dir) / f"{unit.id}{SHARD_SUFFIX}"

    def run_unit(self, unit: Unit, run_dir: Path) -> dict[str, Any]:
        tokenizer = worker_cached((STAGE, self.tokenizer.fingerprint),
                                  lambda: load_tokenizer(run_dir / self.tokenizer.path))
        encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        ledger = Ledger()
        started = time.perf_counter()
        writer = ShardWriter(run_dir, unit.id, self.tokenizer.vocab_size, self.tokenizer.eos_id,
                             self.tokenizer.fingerprint, target_bytes=None, directory=f"{STAGES_DIR}/{STAGE}")
        dtype = writer.dtype
        rows = tokens_total = weight = 0
        eos = np.array([self.tokenizer.eos_id], dtype=dtype)
        source_in = self.input_stage.output_path(run_dir, unit)
        try:
            pf = pq.ParquetFile(source_in)
            columns = ["id", "source", "source_kind", "text"] + (["metadata"] if self.score_key else [])
            for batch in pf.iter_batches(batch_size=self.batch_size, columns=columns):
                ids = batch.column("id").to_pylist()
                scores = (metadata_scores(batch.column("metadata").to_pylist(), self.score_key) if self.score_key
                          else np.full(batch.num_rows, np.nan))
                sources = batch.column("source").to_pylist()
                kinds = batch.column("source_kind").to_pylist()
                texts = batch.column("text").to_pylist()
                encodings, errors = _encode_isolating(encode, texts)
                for doc_id, source, kind, text, enc, score, error in zip(ids, sources, kinds, texts, encodings,
                                                                          scores, errors):
                    nbytes = len(text.encode("utf-8", "surrogatepass"))
                    ledger.took(STAGE, source, kind, 1, nbytes)
                    if enc is None:
                        ledger.poison(STAGE, source, kind, f"tokenize:{error.split(':')[0]}", nbytes, doc_id=doc_id,
                                      locator="", error=error)
                        continue
                    tokens = np.concatenate([np.asarray(enc.ids, dtype=dtype), eos])
                    writer.add(doc_id, source, kind, tokens, score)
                    rows += 1
                    tokens_total += len(tokens)
                    weight += row_weight(len(tokens), dtype.itemsize)
                    ledger.kept(STAGE, source, kind, 1, nbytes)
            written = writer.close()
        except BaseException:
            writer.abort()
            raise
        ledger.add_seconds(STAGE, unit.source, time.perf_counter() - started)
        self.write_quarantine(run_dir, unit, ledger)
        if not written:   # nothing kept: no file (none of an earlier attempt either)
            self.output_path(run_dir, unit).unlink(missing_ok=True)
        # rows and weight feed the pack plan (pipeline.stages.pack), which packs this file into shards
        return {"ledger": ledger.to_json(), "rows": rows, "tokens": tokens_total, "weight": weight}


def _encode_isolating(encode, texts: list[str]) -> tuple[list, list[str]]:
    """Encodings of a batch; if the batch call fails, each text alone, so only the poison one is lost."""
    try:
        return encode(texts, add_special_tokens=False), [""] * len(texts)
    except Exception:  # noqa: BLE001 - find the document that broke the batch
        encodings, errors = [], []
        for text in texts:
            try:
                encodings.append(encode([text], add_special_tokens=False)[0])
                errors.append("")
            except Exception as exc:  # noqa: BLE001
                encodings.append(None)
                errors.append(f"{type(exc).__name__}: {exc}")
        return encodings, errors
