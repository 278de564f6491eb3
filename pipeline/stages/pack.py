"""Consolidated shards: the per-unit token files of the tokenize stage packed into shards of about
``tokenize.shard_target_mb``, across units, deterministically.

The **pack plan** is made once every unit is tokenized, from the data alone: units in id order, rows in
file order, each row weighing ``row_weight`` (its token bytes plus a fixed per-row estimate). A shard ends
at the first row that brings it to the target (documents are never split), so every shard but the last
weighs at least the target and less than the target plus one document. Each cut is found from the per-unit
weights in the tokenize markers and the small ``num_tokens`` column of the one unit the cut falls in, so
planning opens at most one file per shard. Nothing depends on the number of workers or the order units finished in; the plan holds one piece
per (shard, unit) it touches, O(shards + units), and is written atomically (``stages/pack/plan.json``).

A **pack task** per shard (a map stage whose units are the shards) copies its pieces into
``shards/shard-<i:06d>.arrow`` with ``pipeline.shards.pack_shard``; its marker lists the shard (path, bytes,
sha256) and the pieces it was packed from, so a resume skips finished shards of the same plan and redoes
missing or changed ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import read_json, write_json
from pipeline.shards import SHARD_DIR, SHARD_SUFFIX, ShardReader, pack_shard, shard_schema, token_dtype
from pipeline.sources.base import Unit
from pipeline.stages.base import STAGES_DIR, MapStage
from pipeline.tokenizer import TokenizerInfo

STAGE = "pack"
PLAN_NAME = "plan.json"
PLAN_VERSION = 1
SHARD_PREFIX = "shard"
ROW_BYTES = 64   # per-row estimate of everything but the tokens: id, source, kind, offsets, counts, score


def row_weight(num_tokens: np.ndarray | int, itemsize: int) -> np.ndarray | int:
    """A row's weight in the plan: about the bytes it takes in a shard."""
    return num_tokens * itemsize + ROW_BYTES


def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}-{index:06d}"


def plan_path(run_dir: Path) -> Path:
    return run_dir / STAGES_DIR / STAGE / PLAN_NAME


def make_plan(units: Sequence[tuple[str, int, int]], target_bytes: int, itemsize: int,
              num_tokens: Callable[[str], np.ndarray]) -> dict[str, Any]:
    """The pack plan for ``units`` (id, rows, weight), taken in id order; ``num_tokens(unit_id)`` reads
    a unit's ``num_tokens`` column and is called only for the units a cut falls in."""
    table = sorted((uid, int(rows), int(weight)) for uid, rows, weight in units)
    live = [entry for entry in table if entry[1] > 0]
    ends = np.cumsum([w for _, _, w in live], dtype=np.int64)
    first_row = np.concatenate([[0], np.cumsum([r for _, r, _ in live], dtype=np.int64)])
    total_weight = int(ends[-1]) if len(live) else 0
    total_rows = int(first_row[-1])
    cuts: list[int] = []   # global row indices where a new shard starts
    start = 0              # the weight before the shard being filled
    while start + target_bytes < total_weight:
        goal = start + target_bytes
        u = int(np.searchsorted(ends, goal, side="left"))   # the first unit whose end reaches the goal
        uid, rows, weight = live[u]
        cumulative = np.cumsum(row_weight(num_tokens(uid), itemsize), dtype=np.int64)
        if len(cumulative) != rows or int(cumulative[-1]) != weight:
            raise ValueError(f"tokenize output of unit {uid} does not match its marker "
                             f"({len(cumulative)} rows, weight {int(cumulative[-1]) if len(cumulative) else 0}; "
                             f"marker: {rows} rows, weight {weight})")
        unit_start = int(ends[u]) - weight
        row = int(np.searchsorted(cumulative, goal - unit_start, side="left"))   # the row that reaches it
        cuts.append(int(first_row[u]) + row + 1)
        start = unit_start + int(cumulative[row])
    bounds = [0, *cuts, total_rows]
    shards: list[list[list[Any]]] = []
    u = 0
    for a, b in zip(bounds, bounds[1:]):
        if a == b:   # no rows at all
            continue
        pieces = []
        while u < len(live) and first_row[u] < b:
            lo, hi = max(a, int(first_row[u])), min(b, int(first_row[u + 1]))
            if lo < hi:
                pieces.append([live[u][0], lo - int(first_row[u]), hi - int(first_row[u])])
            if first_row[u + 1] <= b:
                u += 1
            else:
                break
        shards.append(pieces)
    return {"version": PLAN_VERSION, "target_bytes": target_bytes, "itemsize": itemsize, "row_bytes": ROW_BYTES,
            "units": [list(entry) for entry in table],
            "shards": [{"name": shard_name(i), "pieces": pieces} for i, pieces in enumerate(shards)]}


def load_plan(run_dir: Path) -> dict[str, Any] | None:
    path = plan_path(run_dir)
    if not path.exists():
        return None
    plan = read_json(path)
    return plan if plan.get("version") == PLAN_VERSION else None


def save_plan(run_dir: Path, plan: dict[str, Any]) -> None:
    if load_plan(run_dir) != plan:
        write_json(plan_path(run_dir), plan)


class PackStage(MapStage):
    """One unit per output shard (``shard_units``): copy the plan's pieces into ``shards/<name>.arrow``."""

    name = STAGE

    def __init__(self, tokenize_stage: MapStage, tokenizer: TokenizerInfo, plan: dict[str, Any]):
        self.tokenize_stage = tokenize_stage
        self.tokenizer = tokenizer
        self.pieces = {shard["name"]: shard["pieces"] for shard in plan["shards"]}
        self.order = [shard["name"] for shard in plan["shards"]]

    def shard_units(self) -> list[Unit]:
        return [Unit(id=name, source="", kind="") for name in self.order]

    def units_of(self, shard: str) -> list[str]:
        return [uid for uid, _, _ in self.pieces[shard]]

    def output_path(self, run_dir: Path, unit: Unit) -> Path:
        return run_dir / SHARD_DIR / f"{unit.id}{SHARD_SUFFIX}"

    def run_unit(self, unit: Unit, run_dir: Path) -> dict[str, Any]:
        schema = shard_schema(self.tokenizer.vocab_size, self.tokenizer.eos_id, self.tokenizer.fingerprint)
        pieces = [(self.tokenize_stage.output_path(run_dir, Unit(id=uid, source="", kind="")), start, stop)
                  for uid, start, stop in self.pieces[unit.id]]
        info = pack_shard(run_dir, pieces, f"{SHARD_DIR}/{unit.id}{SHARD_SUFFIX}", schema)
        return {"shard": asdict(info), "pieces": self.pieces[unit.id]}


def itemsize_of(tokenizer: TokenizerInfo) -> int:
    return token_dtype(tokenizer.vocab_size).itemsize


def read_num_tokens(path: Path) -> np.ndarray:
    with ShardReader(path) as reader:
        return reader.num_tokens()
