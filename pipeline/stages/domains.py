"""Per-domain statistics of the web sources: pages kept, dropped and errored per registered domain.

Every crawl-filter unit of a web source writes its counts per (source, domain) as one partitioned file
(``pipeline.audit.DomainCounter``, partition = a hash of source and domain). One reduce task per partition
(after fan-in merges when there are many units, ``GraphSteps.shuffled``) sums its domains and returns the
top ``top_domains`` by kept and by dropped pages and its number of distinct domains: a domain lives in
exactly one partition, so the top lists merged on the driver are the exact top lists of the run, and no
task ever holds more than its partition's domains (a Common Crawl dump has tens of millions).
"""

from __future__ import annotations

import heapq
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import read_json, write_json
from pipeline.audit import DOMAIN_OUTCOMES
from pipeline.config import AuditConfig
from pipeline.dedup.shuffle import read_partition
from pipeline.sources.base import Unit

MIB = 2**20
SHOWN = ("domain", "kept", "dropped", "errored")


def reduce_domains(k: int, inputs: list[str], top: int) -> dict[str, Any]:
    """Partition ``k``: totals per (source, domain); per source the distinct domains and the top lists."""
    cols = read_partition(inputs, k, ("source", "domain", *DOMAIN_OUTCOMES))
    if len(cols["source"]) == 0:
        return {"sources": {}}
    keys = np.array([f"{s}\x00{d}" for s, d in zip(cols["source"], cols["domain"])], dtype=object)
    unique, inverse = np.unique(keys, return_inverse=True)
    sums = {o: np.bincount(inverse, weights=cols[o], minlength=len(unique)).astype(np.int64) for o in DOMAIN_OUTCOMES}
    out: dict[str, Any] = {}
    for i, key in enumerate(unique.tolist()):
        source, domain = key.split("\x00", 1)
        entry = out.setdefault(source, {"distinct": 0, "rows": []})
        entry["distinct"] += 1
        entry["rows"].append([domain, *(int(sums[o][i]) for o in DOMAIN_OUTCOMES)])
    for entry in out.values():
        rows = entry.pop("rows")
        entry["top_kept"] = _top(rows, 1, top)
        entry["top_dropped"] = _top(rows, 2, top)
    return {"sources": out}


def _top(rows: list[list[Any]], column: int, n: int) -> list[list[Any]]:
    """The ``n`` rows with the most in ``column`` (ties by domain name), those with none left out."""
    return heapq.nsmallest(n, (r for r in rows if r[column] > 0), key=lambda r: (-r[column], r[0]))


def domain_summary(run_dir: Path, units: list[Unit], domains_path, cfg: AuditConfig, log=None) -> dict[str, Any]:
    """stats.json's ``domains``: per web source the distinct domains and the top domains by kept and by
    dropped pages (rows: domain, kept, dropped, errored). Resumable: the result is stored once."""
    from pipeline.stages.base import STAGES_DIR
    from pipeline.stages.dedup import GraphSteps

    out = run_dir / STAGES_DIR / "crawl_filter"
    marker = out / "domains.done.json"
    if marker.exists():
        return read_json(marker)
    files = [str(p) for p in (domains_path(run_dir, u) for u in sorted(units, key=lambda u: u.id)) if p.exists()]
    if not files or cfg.top_domains == 0:
        return {}
    P = cfg.domain_partitions
    steps = GraphSteps(out / "domains-reduce", run_dir, {"merge": 64 * MIB, "domains": 256 * MIB}, log)
    inputs, _ = steps.shuffled("in", files, P, 64)
    parts = steps.run("reduce", "domains", [(reduce_domains, (k, inputs, cfg.top_domains)) for k in range(P)])
    summary: dict[str, Any] = {}
    for part in parts:
        for source, entry in part["sources"].items():
            merged = summary.setdefault(source, {"distinct_domains": 0, "top_kept": [], "top_dropped": []})
            merged["distinct_domains"] += entry["distinct"]
            merged["top_kept"] = _top(merged["top_kept"] + entry["top_kept"], 1, cfg.top_domains)
            merged["top_dropped"] = _top(merged["top_dropped"] + entry["top_dropped"], 2, cfg.top_domains)
    summary = {source: {**entry, "columns": list(SHOWN)} for source, entry in sorted(summary.items())}
    write_json(marker, summary)
    shutil.rmtree(steps.dir, ignore_errors=True)
    return summary
