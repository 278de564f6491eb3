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
decision table written once; see docs/architecture.md.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from pipeline.sources.base import Unit

STAGES_DIR = "stages"
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

    @abstractmethod
    def run_unit(self, unit: Unit, run_dir: Path) -> dict[str, Any]:
        """Process one unit; return ``{"ledger": ..., ...}`` (written as the completion marker)."""
