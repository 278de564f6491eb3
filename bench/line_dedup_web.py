"""What line dedup did in a run: per source, documents and bytes in / kept, lines and bytes removed,
documents edited / emptied / too short; per phase, worker seconds per document.

    python -m pipeline fetch-web
    python -m pipeline run CONFIG --output DIR --until line_dedup     # e.g. the four web-corpus sources
    python bench/line_dedup_web.py DIR [DIR ...] [--cpu]

``--cpu`` also runs the two map phases again, in this process, over a scratch copy of each unit's input and
of the frequent files, and reports their CPU time per document (``time.process_time``: what a core spends,
whatever else the machine is doing; the markers' seconds are wall time).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def report(run: Path) -> dict:
    stages = run / "stages"
    summary = json.loads((stages / "line_dedup" / "reduce.done.json").read_text())

    def markers(stage: str) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted((stages / stage).glob("*.done.json"))
                if p.name != "reduce.done.json"]

    hashed, applied = markers("line_dedup_hashes"), markers("line_dedup")
    docs = sum(m["documents"] for m in hashed)
    ledger = {}
    for m in applied:
        for _stage, source, _kind, outcome, reason, n, nbytes in m["ledger"]["counts"]:
            entry = ledger.setdefault(source, {"in": 0, "kept": 0, "bytes_in": 0, "bytes_kept": 0, "dropped": {}})
            if outcome in ("in", "kept"):
                entry[outcome] += n
                entry[f"bytes_{outcome}"] += nbytes
            elif outcome == "dropped":
                entry["dropped"][reason] = entry["dropped"].get(reason, 0) + n
        for _stage, source, _group, key, value in m["ledger"]["tallies"]:
            ledger[source][key] = ledger[source].get(key, 0) + int(value)
    total = {k: sum(e.get(k, 0) for e in ledger.values())
             for k in ("in", "kept", "bytes_in", "bytes_kept", "lines_removed", "bytes_removed", "documents_edited")}
    dropped: dict[str, int] = {}
    for e in ledger.values():
        for reason, n in e["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + n
    total["dropped"] = dropped
    us = lambda seconds: round(1e6 * seconds / max(1, docs), 1)  # noqa: E731
    return {"run": str(run), "documents": docs, "total": total, "per_source": ledger,
            "distinct_lines": summary["distinct_lines"], "frequent_lines": summary["frequent_lines"],
            "count_histogram": summary["count_histogram"],
            "bytes_removed_fraction": round(total["bytes_removed"] / max(1, total["bytes_in"]), 4),
            "us_per_doc": {"hashes": us(sum(m["task_seconds"] for m in hashed)),
                           "reduce_tasks": us(summary["shuffle"]["task_seconds"]),
                           "reduce_wall": us(summary["seconds"]),
                           "apply": us(sum(m["task_seconds"] for m in applied))}}


def cpu_per_doc(run: Path) -> dict:
    import shutil
    import tempfile
    import time

    import yaml

    from pipeline.config import parse_config
    from pipeline.sources.base import Unit
    from pipeline.stages.base import MapStage
    from pipeline.stages.line_dedup import FREQUENT_DIR, LineDedupApplyStage, LineHashStage

    cfg = parse_config(yaml.safe_load((run / "config.yaml").read_text()))
    previous = "dedup" if cfg.dedup.enabled else "quality" if cfg.quality.enabled else "crawl_filter"

    class Given(MapStage):
        name = previous

        def run_unit(self, unit, run_dir):  # pragma: no cover
            raise NotImplementedError

    inputs = sorted(p for p in (run / "stages" / previous).glob("*.parquet") if p.is_file())
    seconds = {"hashes": 0.0, "apply": 0.0}
    docs = 0
    with tempfile.TemporaryDirectory(dir=run.parent) as scratch:
        root = Path(scratch)
        (root / "stages" / previous).mkdir(parents=True)
        shutil.copytree(run / "stages/line_dedup" / FREQUENT_DIR, root / "stages/line_dedup" / FREQUENT_DIR)
        for path in inputs:
            shutil.copy(path, root / "stages" / previous / path.name)
            unit = Unit(path.stem, path.stem.rsplit("-", 1)[0], "web")
            for key, stage in (("hashes", LineHashStage(cfg.line_dedup, Given())),
                               ("apply", LineDedupApplyStage(cfg.line_dedup, Given(), cfg.audit))):
                started = time.process_time()
                result = stage.run_unit(unit, root)
                seconds[key] += time.process_time() - started
            docs += sum(n for _s, _src, _k, outcome, _r, n, _b in result["ledger"]["counts"] if outcome == "in")
    return {"documents": docs, "cpu_us_per_doc": {k: round(1e6 * v / max(1, docs), 1) for k, v in seconds.items()}}


if __name__ == "__main__":
    cpu = "--cpu" in sys.argv
    for arg in (a for a in sys.argv[1:] if a != "--cpu"):
        out = report(Path(arg))
        if cpu:
            out["cpu"] = cpu_per_doc(Path(arg))
        print(json.dumps(out, indent=1))
