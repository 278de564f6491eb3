"""Accounting: every document a stage takes in is kept, dropped for a reason, or errored for a reason.

A ``Ledger`` is filled by one unit of work and merged on the driver. ``stats()`` turns the merged ledger
into the ``stats.json`` layout and checks the invariant ``in == kept + dropped + errored`` for every stage
and source, plus the chain invariant: what a stage kept is exactly what the next stage took in.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

OUTCOMES = ("in", "kept", "dropped", "errored")


@dataclass
class Ledger:
    # (stage, source, kind, outcome, reason) -> [documents, bytes]
    counts: dict[tuple[str, str, str, str, str], list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    seconds: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    # (stage, source, group, key) -> value: side counts that are not outcomes (charsets seen, seconds per step)
    tallies: dict[tuple[str, str, str, str], float] = field(default_factory=lambda: defaultdict(float))
    # Poison records of this unit (an exception while handling one record): written to the stage's
    # quarantine file by the stage, not carried in the completion marker.
    quarantined: list[dict[str, Any]] = field(default_factory=list)

    def _add(self, stage: str, source: str, kind: str, outcome: str, reason: str, n: int, nbytes: int) -> None:
        cell = self.counts[(stage, source, kind, outcome, reason)]
        cell[0] += n
        cell[1] += nbytes

    def took(self, stage: str, source: str, kind: str, n: int = 1, nbytes: int = 0) -> None:
        self._add(stage, source, kind, "in", "", n, nbytes)

    def kept(self, stage: str, source: str, kind: str, n: int = 1, nbytes: int = 0) -> None:
        self._add(stage, source, kind, "kept", "", n, nbytes)

    def dropped(self, stage: str, source: str, kind: str, reason: str, n: int = 1, nbytes: int = 0) -> None:
        self._add(stage, source, kind, "dropped", reason, n, nbytes)

    def errored(self, stage: str, source: str, kind: str, reason: str, n: int = 1, nbytes: int = 0) -> None:
        self._add(stage, source, kind, "errored", reason, n, nbytes)

    def add_seconds(self, stage: str, source: str, seconds: float) -> None:
        self.seconds[(stage, source)] += seconds

    def poison(self, stage: str, source: str, kind: str, reason: str, nbytes: int = 0, *, doc_id: str,
               locator: str, error: str) -> None:
        """Book one record as errored and keep what is needed to find it again."""
        self.errored(stage, source, kind, reason, 1, nbytes)
        self.quarantined.append({"stage": stage, "source": source, "id": doc_id, "locator": locator,
                                 "reason": reason, "error": error[:1000]})

    def tally(self, stage: str, source: str, group: str, key: str, value: float = 1) -> None:
        self.tallies[(stage, source, group, key)] += value

    def merge(self, other: Ledger) -> None:
        for key, (n, b) in other.counts.items():
            self._add(*key, n, b)
        for key, s in other.seconds.items():
            self.seconds[key] += s
        for key, v in other.tallies.items():
            self.tallies[key] += v

    def to_json(self) -> dict[str, Any]:
        return {
            "counts": [[*k, v[0], v[1]] for k, v in sorted(self.counts.items())],
            "seconds": [[stage, src, s] for (stage, src), s in sorted(self.seconds.items())],
            "tallies": [[*k, v] for k, v in sorted(self.tallies.items())],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Ledger:
        ledger = cls()
        for stage, source, kind, outcome, reason, n, b in data["counts"]:
            ledger._add(stage, source, kind, outcome, reason, n, b)
        for stage, src, s in data["seconds"]:
            ledger.seconds[(stage, src)] += s
        for stage, src, group, key, v in data.get("tallies", []):
            ledger.tallies[(stage, src, group, key)] += v
        return ledger

    def stats(self, stage_order: list[str]) -> dict[str, Any]:
        """The stats.json body: per stage, per source, with the accounting invariants checked."""
        table: dict[str, dict[str, dict[str, Any]]] = {}
        for (stage, source, kind, outcome, reason), (n, b) in sorted(self.counts.items()):
            entry = table.setdefault(stage, {}).setdefault(source, _empty_entry(kind))
            if outcome in ("in", "kept"):
                entry[outcome] += n
                entry[f"bytes_{outcome}"] += b
            else:
                entry[outcome][reason] = entry[outcome].get(reason, 0) + n
        for (stage, source), s in self.seconds.items():
            if stage in table and source in table[stage]:
                table[stage][source]["seconds"] = round(table[stage][source]["seconds"] + s, 3)
        for (stage, source, group, key), v in sorted(self.tallies.items()):
            if stage in table and source in table[stage]:
                table[stage][source].setdefault(group, {})[key] = round(v, 4) if group.endswith("seconds") else int(v)

        violations: list[str] = []
        for stage, sources in table.items():
            for source, e in sources.items():
                total = e["kept"] + sum(e["dropped"].values()) + sum(e["errored"].values())
                e["invariant_ok"] = total == e["in"]
                if total != e["in"]:
                    violations.append(f"{stage}/{source}: in={e['in']} but kept+dropped+errored={total}")
        ordered = [s for s in stage_order if s in table]
        for prev, nxt in zip(ordered, ordered[1:]):
            for source, e in table[prev].items():
                took = table[nxt].get(source, {}).get("in", 0)
                if took != e["kept"]:
                    violations.append(f"{prev}->{nxt}/{source}: {prev} kept {e['kept']} but {nxt} took in {took}")
        stages = {s: table[s] for s in ordered + sorted(set(table) - set(ordered))}
        return {"stages": stages, "invariant_ok": not violations, "violations": violations}


def _empty_entry(kind: str) -> dict[str, Any]:
    return {"kind": kind, "in": 0, "kept": 0, "dropped": {}, "errored": {}, "bytes_in": 0, "bytes_kept": 0,
            "seconds": 0.0}
