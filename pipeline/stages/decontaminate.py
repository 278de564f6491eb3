"""Decontaminate: drop documents, or cut the passages, that share word n-grams with evaluation sets.

A map stage after line dedup and before tokenize. The index of every configured benchmark
(``pipeline.decontaminate.EvalIndex``: a few MB of sorted n-gram hashes) is built once on the driver when
the stage is constructed and travels inside the stage object, which the runner puts in Ray's object store
once; a unit only streams its documents through it.

Per document of a kind in ``decontamination.kinds`` (others pass unchanged): ``drop`` drops any document
with a matched n-gram as ``contaminated:<benchmark>``; ``remove_spans`` cuts the matched spans with their
margin, keeps the rest (``metadata["decontaminated"]`` says what was cut) or drops the document the same way
when fewer than ``min_words_left`` words remain. Ledger tallies per source, group ``contamination``:
``<benchmark>:documents`` (documents with a match), ``<benchmark>:ngrams`` (matched n-grams),
``<benchmark>:spans_removed`` (its matched spans cut out of documents that were kept). Dropped documents
are offered to the unit's ``DropSampler``. The unit result carries, per benchmark, the ids of the items
found (``items_hit``) and the counts ``decontamination_summary`` adds up for stats.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path
from pipeline.audit import DropSampler
from pipeline.config import AuditConfig, DecontaminationConfig
from pipeline.decontaminate import Decision, EvalIndex, decide
from pipeline.document import DOC_SCHEMA
from pipeline.ledger import Ledger
from pipeline.sources.base import Unit
from pipeline.stages.base import MapStage

STAGE = "decontaminate"
TALLY_GROUP = "contamination"
READ_BATCH = 128     # documents matched as one batch (Arrow kernels over their texts)
COUNTERS = ("documents", "ngrams", "dropped", "spans_removed")
FIRST_ITEMS = 10     # item ids listed per benchmark in the summary


class DecontaminateStage(MapStage):
    name = STAGE

    def __init__(self, cfg: DecontaminationConfig, audit: AuditConfig, input_stage: MapStage,
                 index: EvalIndex | None = None):
        self.cfg = cfg
        self.audit = audit
        self.input_stage = input_stage
        self.index = index if index is not None else EvalIndex.build(cfg)
        self.kinds = frozenset(cfg.kinds)

    def run_unit(self, unit: Unit, run_dir: Path) -> dict[str, Any]:
        started = time.perf_counter()
        ledger = Ledger()
        sampler = DropSampler(self.audit.dropped_per_reason, self.audit.dropped_max_chars)
        counts = {name: dict.fromkeys(COUNTERS, 0) for name in self.index.benchmarks}
        hit_items: dict[str, set[str]] = {name: set() for name in self.index.benchmarks}
        kept_total = 0
        source = pq.ParquetFile(self.input_stage.output_path(run_dir, unit))
        with atomic_path(self.output_path(run_dir, unit)) as tmp, \
                pq.ParquetWriter(tmp, DOC_SCHEMA, compression="zstd") as writer:
            for batch in source.iter_batches(batch_size=READ_BATCH):
                cols = {name: batch.column(name).to_pylist() for name in DOC_SCHEMA.names}
                keep = np.ones(batch.num_rows, dtype=bool)
                edited = False
                found = self._match_batch(batch)
                for i, (doc_id, src, kind, text) in enumerate(zip(cols["id"], cols["source"], cols["source_kind"],
                                                                   cols["text"])):
                    nbytes = len(text.encode("utf-8", "surrogatepass"))
                    ledger.took(STAGE, src, kind, 1, nbytes)
                    if kind not in self.kinds:
                        ledger.kept(STAGE, src, kind, 1, nbytes)
                        continue
                    try:
                        decision = decide(self.index, self.cfg, text, found.get(i))
                    except Exception as exc:  # noqa: BLE001 - one poison document, not the unit
                        keep[i] = False
                        ledger.poison(STAGE, src, kind, f"decontaminate:{type(exc).__name__}", nbytes, doc_id=doc_id,
                                      locator=json.loads(cols["metadata"][i]).get("locator", ""), error=repr(exc))
                        continue
                    if not decision.matches:
                        ledger.kept(STAGE, src, kind, 1, nbytes)
                        continue
                    self._book_matches(ledger, src, decision, counts, hit_items)
                    if decision.dropped:
                        keep[i] = False
                        ledger.dropped(STAGE, src, kind, decision.reason, 1, nbytes)
                        counts[decision.reason.split(":", 1)[1]]["dropped"] += 1
                        meta = json.loads(cols["metadata"][i])
                        meta["contamination"] = _match_summary(decision)
                        sampler.offer(decision.reason, doc_id, src, text, meta)
                        continue
                    edited = True
                    for name, match in decision.matches.items():
                        counts[name]["spans_removed"] += len(match.spans)
                        ledger.tally(STAGE, src, TALLY_GROUP, f"{name}:spans_removed", len(match.spans))
                    meta = json.loads(cols["metadata"][i])
                    meta["decontaminated"] = {**_match_summary(decision), "cuts": len(decision.cuts),
                                              "chars_removed": len(text) - len(decision.text)}
                    cols["text"][i] = decision.text
                    cols["metadata"][i] = json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str)
                    ledger.kept(STAGE, src, kind, 1, len(decision.text.encode("utf-8", "surrogatepass")))
                kept_total += int(keep.sum())
                table = pa.Table.from_batches([batch]) if not edited else pa.table(
                    {name: pa.array(cols[name], DOC_SCHEMA.field(name).type) for name in DOC_SCHEMA.names})
                writer.write_table(table.filter(pa.array(keep)).cast(DOC_SCHEMA))
        sampler.write(self.dropped_path(run_dir, unit))
        self.write_quarantine(run_dir, unit, ledger)
        ledger.add_seconds(STAGE, unit.source, time.perf_counter() - started)
        order = {name: {item: k for k, item in enumerate(bench.item_ids)}
                 for name, bench in self.index.benchmarks.items() if hit_items[name]}
        return {"ledger": ledger.to_json(), "documents": kept_total, "contamination": counts,
                "items_hit": {name: sorted(ids, key=order[name].__getitem__) if ids else []
                              for name, ids in hit_items.items()}}

    def _match_batch(self, batch: pa.RecordBatch) -> dict[int, dict]:
        """Row -> its matches, for the rows of the configured kinds, looked up as one batch; {} when the batch
        cannot be (each document is then matched alone, so that only a poison one is lost)."""
        rows = np.flatnonzero(pc.is_in(batch.column("source_kind"), value_set=pa.array(sorted(self.kinds)))
                              .to_numpy(zero_copy_only=False))
        try:
            matches = self.index.match_batch(batch.column("text").take(pa.array(rows)))
        except Exception:  # noqa: BLE001 - one document Arrow cannot take must not fail the batch
            return {}
        return dict(zip(rows.tolist(), matches))

    @staticmethod
    def _book_matches(ledger: Ledger, src: str, decision: Decision, counts: dict[str, dict[str, int]],
                      hit_items: dict[str, set[str]]) -> None:
        for name, match in decision.matches.items():
            counts[name]["documents"] += 1
            counts[name]["ngrams"] += match.ngrams
            hit_items[name].update(match.items)
            ledger.tally(STAGE, src, TALLY_GROUP, f"{name}:documents", 1)
            ledger.tally(STAGE, src, TALLY_GROUP, f"{name}:ngrams", match.ngrams)


def _match_summary(decision: Decision) -> dict[str, Any]:
    """What a sampled or edited document's metadata says about its matches (the first items only)."""
    return {"benchmarks": {name: {"ngrams": m.ngrams, "items": m.items[:FIRST_ITEMS], "spans": m.spans[:FIRST_ITEMS]}
                           for name, m in sorted(decision.matches.items())}}


def decontamination_summary(cfg: DecontaminationConfig, index: EvalIndex,
                            results: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The stats.json section: per benchmark, what was indexed and what the run found, from the unit results
    (``DecontaminateStage.run_unit``'s return values, or their completion markers)."""
    totals = {name: dict.fromkeys(COUNTERS, 0) for name in index.benchmarks}
    found: dict[str, set[str]] = {name: set() for name in index.benchmarks}
    for result in results:
        for name, counts in result.get("contamination", {}).items():
            if name in totals:
                for key in COUNTERS:
                    totals[name][key] += int(counts.get(key, 0))
        for name, ids in result.get("items_hit", {}).items():
            if name in found:
                found[name].update(ids)
    benchmarks = {}
    for name, bench in index.benchmarks.items():
        order = {item: k for k, item in enumerate(bench.item_ids)}
        hit = sorted(found[name], key=lambda item: order.get(item, len(order)))
        benchmarks[name] = {
            "items": bench.items, "items_indexed": bench.items_indexed, "items_short": bench.items_short,
            "items_uninformative": bench.items_uninformative, "ngrams_indexed": int(len(bench.unique)),
            "ngrams_uninformative": bench.ngrams_uninformative, "ngrams_shared": bench.ngrams_shared,
            "documents_matched": totals[name]["documents"], "ngrams_matched": totals[name]["ngrams"],
            "dropped": totals[name]["dropped"], "spans_removed": totals[name]["spans_removed"],
            "items_hit": len(hit), "fraction_hit": round(len(hit) / bench.items, 6) if bench.items else 0.0,
            "first_items_hit": hit[:FIRST_ITEMS],
        }
    return {"ngram": cfg.ngram, "mode": cfg.mode, "kinds": list(cfg.kinds), "index_bytes": index.nbytes,
            "benchmarks": benchmarks}
