"""Where a scheduled data run lives, what config it runs, and how a finished run is published.

Pure Python (stdlib + PyYAML) so the DAG files stay cheap to parse. The one rule that makes Airflow reruns
idempotent lives here: the run directory is a function of (output root, config name, dataset version) and
the version is a function of the crawl snapshot or the logical date, never of the Airflow run id or the
try number. A rerun of a data interval therefore lands in the same directory and resumes from the
pipeline's per-unit completion markers instead of writing a second copy of the shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

# The Airflow tasks in order; each runs `pipeline run ... --until <its last stage>`. The pipeline has more
# stages than tasks: the "dedup" task runs URL, document and line dedup (one Ray job, where most of a
# task's fixed cost is starting it), the "tokenize" task decontamination, tokenize and pack.
STAGES = ("crawl_filter", "quality", "dedup", "tokenize")
LAST_STAGE = {"crawl_filter": "crawl_filter", "quality": "quality", "dedup": "line_dedup", "tokenize": "tokenize"}
READY_NAME = "_READY.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class DataRun:
    version: str        # dataset version: the crawl snapshot, else the logical date (YYYY-MM-DD)
    run_dir: str        # the pipeline's --output
    config: str         # the resolved pipeline YAML the stage jobs run
    base_config: str


def dataset_version(snapshot: str | None, logical_date: datetime | None) -> str:
    """The snapshot id when given (e.g. CC-MAIN-2024-10), else the logical date; filesystem-safe."""
    if snapshot:
        raw = snapshot
    elif logical_date is not None:
        raw = logical_date.strftime("%Y-%m-%d")
    else:
        raise ValueError("no dataset version: a run without a logical date needs params.snapshot")
    version = _UNSAFE.sub("-", raw).strip("-.")
    if not version:
        raise ValueError(f"snapshot {snapshot!r} has no usable characters for a directory name")
    return version


def plan_run(base_config: str | Path, output_root: str | Path, snapshot: str | None,
             logical_date: datetime | None, input_paths: dict[str, list[str]] | None = None) -> DataRun:
    """Resolve the run: version, run directory and the config file the stage jobs run.

    The resolved config is written next to the run directory (``<root>/<name>/<version>.yaml``): the stage
    jobs may run on other machines, so it must sit on the same shared storage as the output. It is
    rewritten only when its content changes, and a changed content on a rerun is refused by the pipeline
    itself (config fingerprint), so a data interval can never silently mix two configurations.
    """
    base = Path(base_config).resolve()
    version = dataset_version(snapshot, logical_date)
    root = Path(output_root).resolve() / base.stem
    data = yaml.safe_load(base.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("sources"), list):
        raise ValueError(f"{base}: not a pipeline config (no sources list)")
    names = [s.get("name") for s in data["sources"]]
    for name, paths in (input_paths or {}).items():
        if name not in names:
            raise ValueError(f"input_paths: no source named {name!r} in {base} (sources: {', '.join(names)})")
        data["sources"][names.index(name)]["paths"] = [str(p) for p in paths]
    if snapshot:
        # ${JAMBA_SNAPSHOT} in a path selects the crawl; expanded here so the config on disk is explicit.
        for source in data["sources"]:
            source["paths"] = [str(p).replace("${JAMBA_SNAPSHOT}", snapshot) for p in source["paths"]]
    config = root / f"{version}.yaml"
    text = f"# resolved by airflow_dags/jamba_ops/runs.py from {base}\n" + yaml.safe_dump(data, sort_keys=False)
    if not config.exists() or config.read_text() != text:
        _atomic_write(config, text)
    return DataRun(version=version, run_dir=str(root / version), config=str(config), base_config=str(base))


def stage_command(run: DataRun | dict[str, Any], stage: str, python: str = "python") -> list[str]:
    """The command one stage task runs (as a Ray job entrypoint or a local subprocess)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    run = run if isinstance(run, dict) else asdict(run)
    return [python, "-m", "pipeline", "run", run["config"], "--output", run["run_dir"], "--until",
            LAST_STAGE[stage], "--no-progress"]


def publish(run_dir: str | Path, version: str) -> dict[str, Any]:
    """Verify every shard against the manifest, then mark the version ready (``_READY.json``, atomic).

    Idempotent: republishing an unchanged run keeps the marker byte-identical; a run whose manifest changed
    (it cannot, short of someone rewriting it) gets a new marker with the new digest.
    """
    from pipeline.shards import MANIFEST_NAME, Manifest, verify_run  # the project, only at run time

    run_dir = Path(run_dir)
    stats_path = run_dir / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    if not stats.get("invariant_ok"):
        violations = "; ".join(stats.get("violations", [])[:5]) or "no stats.json with invariant_ok"
        raise RuntimeError(f"{run_dir}: refusing to publish: the accounting invariant did not hold ({violations})")
    problems = verify_run(run_dir)
    if problems:
        raise RuntimeError(f"{run_dir}: verification failed: " + "; ".join(problems[:10]))
    manifest = Manifest.load(run_dir)
    digest = hashlib.sha256((run_dir / MANIFEST_NAME).read_bytes()).hexdigest()
    ready = {"version": version, "run_dir": str(run_dir.resolve()), "manifest_sha256": digest,
             "shards": len(manifest.shards), "rows": manifest.total_rows, "tokens": manifest.total_tokens,
             "config_fingerprint": manifest.config_fingerprint}
    path = run_dir / READY_NAME
    text = json.dumps(ready, indent=2, sort_keys=True) + "\n"
    if not path.exists() or path.read_text() != text:
        _atomic_write(path, text)
    return ready


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
