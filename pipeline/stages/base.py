"""The stage contract.

A *map stage* turns one unit's input into one unit's output, independently of every other unit:

* it reads its input (the raw source files for the first stage, the previous stage's Parquet otherwise),
* books every document in the unit's ``Ledger`` (in = kept + dropped + errored),
* writes its output atomically (temporary name, then rename),
* returns a small JSON-able result; the runner writes it as the unit's completion marker
  ``stages/<stage>/<unit>.done.json`` *after* the outputs exist, so a rerun skips exactly the units
  that finished.

Stages are plain picklable objects holding their configuration; heavy resources (models, tokenizers)
are built lazily on first use in each worker process and cached there, so a Ray worker loads a model
once, not once per unit.

Global stages (MinHash dedup, percentile selection) follow the same outline in several map phases plus a
decision table written once; pack (``pack.py``) is a map stage whose units are the output shards of a plan
made once every unit is tokenized; see docs/architecture.md.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_path
from pipeline.sources.base import Unit

STAGES_DIR = "stages"
QUARANTINE_DIR = "quarantine"
_WORKER_CACHE: dict[tuple[str, ...], Any] = {}


def worker_cached(key: tuple[str, ...], build):
    """Build once per worker process (Ray reuses worker processes across tasks)."""
    if key not in _WORKER_CACHE:
        _WORKER_CACHE[key] = build()
    return _WORKER_CACHE[key]


class MapStage(ABC):
    name: str

    def stage_dir(self, run_dir: Path) -> Path:
        return run_dir / STAGES_DIR / self.name

    def output_path(self, run_dir: Path, unit: Unit) -> Path:
        return self.stage_dir(run_dir) / f"{unit.id}.parquet"

    def marker_path(self, run_dir: Path, unit: Unit) -> Path:
        return self.stage_dir(run_dir) / f"{unit.id}.done.json"

    def actor_memory(self) -> int:
        """Bytes each actor of an actor stage declares to Ray (``uses_actors``)."""
        return 512 * 2**20

    def unit_outputs(self, run_dir: Path, unit: Unit, result: dict[str, Any]) -> list[Path]:
        """The files one unit's run wrote (listed in its completion marker)."""
        path = self.output_path(run_dir, unit)
        return [path] if path.exists() else []

    def dropped_path(self, run_dir: Path, unit: Unit) -> Path:
        """The unit's sample of dropped documents (``pipeline.audit``); listed in its marker when written."""
        from pipeline.audit import DROPPED_DIR

        return self.stage_dir(run_dir) / DROPPED_DIR / f"{unit.id}.parquet"

    def quarantine_path(self, run_dir: Path, unit: Unit) -> Path:
        return self.stage_dir(run_dir) / QUARANTINE_DIR / f"{unit.id}.jsonl"

    def write_quarantine(self, run_dir: Path, unit: Unit, ledger) -> int:
        """The unit's poison records as JSON lines (id, source, locator, stage, reason, error), atomically;
        a stale file of an earlier attempt is removed when there are none."""
        path = self.quarantine_path(run_dir, unit)
        if not ledger.quarantined:
            path.unlink(missing_ok=True)
            return 0
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n"
                                   for entry in ledger.quarantined))
        return len(ledger.quarantined)

    @abstractmethod
    def run_unit(self, unit: Unit, run_dir: Path) -> dict[str, Any]:
        """Process one unit; return ``{"ledger": ..., ...}`` (written as the completion marker)."""
