"""``python -m pipeline plan-dedup --docs N``: disk and per-task memory of the dedup stage for N documents.

The sizes follow the stage's own files and arrays (pipeline/stages/dedup.py):
* signature file per document: num_perm x 8 bytes, node + exact key (16), flag (1), id (~28 in Arrow);
* band entries per document: (bands + 1 exact) x (key 8 + node 8 + loc 8 + flag 1);
* a candidates task holds 1/partitions of all band entries, plus sort permutations and its star edges;
* connected-component tasks hold 1/partitions of the edges (16 bytes each way) with their sort copies;
* the largest cluster's edges sit in one task whatever the partitioning (linear in its size);
* a shuffle merge holds one partition of its fan-in inputs: at most 1/partitions of a step's data.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pipeline.config import DedupConfig

GIB = 2**30
SORT_COPIES = 3           # lexsort permutation + gathered copies alongside the input arrays


def parse_size(text: str) -> int:
    """'2GiB' (2^30), '2GB' (10^9), '512MB', or a number of bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read the size {text!r} (write e.g. 2GiB)")
    return int(float(m.group(1)) * ((1024 if m.group(3) else 1000) ** "_KMGT".index(m.group(2).upper() or "_")))


@dataclass
class DedupPlan:
    docs: int
    partitions: int
    bands: int
    rows: int
    disk: dict[str, int]
    task_memory: dict[str, int]
    recommended_partitions: int

    def summary(self) -> str:
        def g(x: int) -> str:
            return f"{x / GIB:10.2f} GiB"

        lines = [f"dedup plan for {self.docs:,} documents: {self.bands} bands x {self.rows} rows, "
                 f"{self.partitions} partitions",
                 "  disk (under DIR/stages/dedup*):"]
        lines += [f"    {k:<38}{g(v)}" for k, v in self.disk.items()]
        lines.append(f"    {'total':<38}{g(sum(self.disk.values()))}")
        lines.append("  peak memory per task:")
        lines += [f"    {k:<38}{g(v)}" for k, v in self.task_memory.items()]
        lines.append(f"  fewest partitions within the per-task budget: {self.recommended_partitions}")
        return "\n".join(lines)


def plan_dedup(docs: int, cfg: DedupConfig, duplicate_fraction: float = 0.3, unit_mb: float = 64.0,
               mean_doc_kb: float = 4.0, task_budget: int = 2 * GIB) -> DedupPlan:
    from pipeline.stages.dedup import dedup_params

    params = dedup_params(cfg)
    bands, rows, P = params["bands"], params["rows"], cfg.partitions
    keys_per_doc = (bands if cfg.minhash else 0) + (1 if cfg.exact else 0)
    sig_bytes = cfg.num_perm * 8 + 16 + 1 + 28
    entry_bytes = 8 + 8 + 8 + 1
    dups = int(docs * duplicate_fraction)
    edges = dups * keys_per_doc                   # star edges before cross-partition de-duplication
    disk = {"signatures": docs * sig_bytes, "band entries": docs * keys_per_doc * entry_bytes,
            "removed.parquet + removals": dups * (3 * 28 + 8 + 17)}
    unit_docs = max(1, int(unit_mb * 1024 / mean_doc_kb))
    candidates = docs * keys_per_doc * entry_bytes / P * (1 + SORT_COPIES) + edges / P * 48
    components = 2 * edges / P * 16 * (1 + SORT_COPIES)
    memory = {"signatures (per unit)": int(unit_mb * 2**20 * 2 + unit_docs * (sig_bytes + keys_per_doc * entry_bytes)
                                           + 8192 * cfg.num_perm * 8 * 3),
              "candidates (per partition)": int(candidates),
              "connected components (per partition)": int(components),
              "keepers (per partition)": int(dups / P * 64),
              # a merge holds one partition of its inputs: at most 1/partitions of the band entries, copied
              "merge (per task)": int(docs * keys_per_doc * entry_bytes / P * 2)}
    widest = max(memory["candidates (per partition)"], memory["connected components (per partition)"])
    recommended = max(1, math.ceil(widest * P / task_budget))
    return DedupPlan(docs, P, bands, rows, disk, memory, recommended)


def check_budget(cfg: DedupConfig, unit_mb: float = 64.0) -> DedupPlan | None:
    """Refuse (``ConfigError``, one line with the numbers) a dedup configuration whose per-task estimate for
    ``expected_docs`` exceeds ``task_memory``; the plan when both are set, else None (nothing to check)."""
    from pipeline.config import ConfigError

    if not (cfg.enabled and cfg.expected_docs and cfg.task_memory):
        return None
    budget = parse_size(cfg.task_memory)
    plan = plan_dedup(cfg.expected_docs, cfg, unit_mb=unit_mb, task_budget=budget)
    step, worst = max(plan.task_memory.items(), key=lambda kv: kv[1])
    if worst > budget and step.startswith("signatures"):
        raise ConfigError(f"dedup: a signatures task needs {worst / GIB:.2f} GiB per unit, over dedup.task_memory "
                          f"{budget / GIB:.2f} GiB; lower run.unit_target_mb (now {unit_mb:g})")
    if worst > budget:
        raise ConfigError(
            f"dedup: {cfg.partitions} partitions need {worst / GIB:.2f} GiB per task ({step}) for "
            f"{cfg.expected_docs:,} documents, over dedup.task_memory {budget / GIB:.2f} GiB; set dedup.partitions "
            f">= {plan.recommended_partitions} (python -m pipeline plan-dedup --docs {cfg.expected_docs})")
    return plan
