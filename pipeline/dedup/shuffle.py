"""An on-disk shuffle with bounded fan-in: the way dedup's graph moves partitions between steps.

A *partitioned file* is one Arrow IPC file holding a producer's rows for every destination partition
``0..P-1``, in partition order. Two layouts, read the same way (``read_partition``):

* **offsets** (what producers write, from one in-memory table): rows sorted by partition, the
  ``P + 1`` row offsets in the schema metadata;
* **batches** (what merges write, streaming): record batch ``k`` holds partition ``k`` (possibly empty).

A shuffle step with N producers and P consumers never lets one task open N files. If N exceeds the
fan-in F, *merge* tasks combine groups of F files into one partitioned file each (partition by partition,
so a merge holds one partition of its F inputs at a time), level after level, until at most F files
remain; each consumer then reads its partition from those. Every task holds at most F files open and
memory-mapped; the driver sees one small result per task. Files are written atomically and are pure
functions of their inputs, so a step that was interrupted resumes by skipping the files that exist.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.atomic import atomic_path

OFFSETS_KEY = b"partition_offsets"


def partition_order(part: np.ndarray, partitions: int) -> tuple[np.ndarray, list[int]]:
    """The permutation that sorts rows by partition (stable) and the P + 1 row offsets; O(n log n)."""
    order = np.argsort(part, kind="stable")
    offsets = np.searchsorted(part[order], np.arange(partitions + 1)).tolist()
    return order, offsets


def write_partitioned(path: Path | str, columns: dict[str, np.ndarray], part: np.ndarray, partitions: int,
                      metadata: dict[str, str] | None = None) -> int:
    """Rows ``columns`` (equal-length arrays) destined to partition ``part[i]`` -> one partitioned file
    (offsets layout). Returns the number of rows."""
    order, offsets = partition_order(np.asarray(part, dtype=np.int64), partitions)
    table = pa.table({name: pa.array(np.asarray(values)[order]) for name, values in columns.items()})
    meta = {OFFSETS_KEY.decode(): json.dumps(offsets), **(metadata or {})}
    table = table.replace_schema_metadata(meta)
    write_ipc(path, table)
    return table.num_rows


def write_ipc(path: Path | str, table: pa.Table) -> None:
    with atomic_path(Path(path)) as tmp, pa.OSFile(str(tmp), "wb") as sink, \
            pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


class PartitionedFile:
    """One partitioned file, memory-mapped while open (a context manager: the map is released on exit)."""

    def __init__(self, path: Path | str):
        self.path = str(path)
        self._source = pa.memory_map(self.path)
        self._reader = pa.ipc.open_file(self._source)
        meta = self._reader.schema.metadata or {}
        self._offsets = json.loads(meta[OFFSETS_KEY]) if OFFSETS_KEY in meta else None
        self._table = self._reader.read_all() if self._offsets is not None else None  # zero-copy views

    @property
    def schema(self) -> pa.Schema:
        return self._reader.schema

    @property
    def partitions(self) -> int:
        return len(self._offsets) - 1 if self._offsets is not None else self._reader.num_record_batches

    def partition(self, k: int) -> pa.Table:
        if self._offsets is not None:
            return self._table.slice(self._offsets[k], self._offsets[k + 1] - self._offsets[k])
        return pa.Table.from_batches([self._reader.get_batch(k)])

    def close(self) -> None:
        self._table = None
        self._reader = None
        self._source.close()

    def __enter__(self) -> PartitionedFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


Columns = dict[str, np.ndarray]
Transform = Callable[[Columns], Columns]


def _columns(table: pa.Table, names: Sequence[str]) -> Columns:
    """Numpy copies of the named columns (copies: nothing keeps the file's memory map alive)."""
    return {name: np.array(table.column(name).to_numpy(), copy=True) for name in names}


def read_partition(paths: Sequence[str], k: int, names: Sequence[str],
                   transforms: Sequence[Transform | None] | None = None) -> Columns:
    """Partition ``k`` of every file, in the given order, as numpy columns; one file open at a time."""
    pieces: list[Columns] = []
    for i, path in enumerate(paths):
        with PartitionedFile(path) as f:
            piece = _columns(f.partition(k), names)
        if transforms is not None and transforms[i] is not None:
            piece = transforms[i](piece)
        pieces.append(piece)
    return {name: np.concatenate([p[name] for p in pieces]) if pieces else np.zeros(0) for name in names}


def merge_task(inputs: Sequence[str], out: str, partitions: int, root: str,
               transforms: Sequence[Transform | None] | None = None) -> dict[str, int]:
    """Combine partitioned files into one (batches layout), partition by partition: all inputs stay
    mapped (at most the fan-in), one partition of them in memory at a time."""
    probe = MapProbe(root)
    rows = 0
    files = [PartitionedFile(p) for p in inputs]
    try:
        schema = files[0].schema.remove_metadata()
        probe.sample()
        with atomic_path(Path(out)) as tmp, pa.OSFile(str(tmp), "wb") as sink, \
                pa.ipc.new_file(sink, schema) as writer:
            for k in range(partitions):
                pieces = []
                for i, f in enumerate(files):
                    piece = _columns(f.partition(k), schema.names)
                    if transforms is not None and transforms[i] is not None:
                        piece = transforms[i](piece)
                    pieces.append(piece)
                merged = {n: np.concatenate([p[n] for p in pieces]) for n in schema.names}
                writer.write_batch(pa.record_batch([pa.array(merged[n], schema.field(n).type) for n in schema.names],
                                                   schema=schema))
                rows += len(merged[schema.names[0]])
            probe.sample()
    finally:
        for f in files:
            f.close()
    return {"rows": rows, **probe.peak()}


def merge_plan(count: int, fan_in: int) -> list[int]:
    """The number of files at each level of merging ``count`` producer files with fan-in F, the producers
    first: e.g. 90,000 unit files at F = 64 -> [90000, 1407, 22]; a consumer reads the last level."""
    levels = [count]
    while levels[-1] > fan_in:
        levels.append(-(-levels[-1] // fan_in))
    return levels


# ------------------------------------------------------------------------------ measuring what a task holds
class MapProbe:
    """The most memory maps and open files a task held, counting only files under ``root`` (the run's
    directory: the data this task reads and writes), from /proc/self (Linux; zeros elsewhere)."""

    def __init__(self, root: Path | str):
        self.root = str(Path(root).resolve())
        self.maps = self.files = 0

    def sample(self) -> None:
        try:
            with open("/proc/self/maps") as fh:
                mapped = {line.split(None, 5)[5].strip() for line in fh if self.root in line}
            fds = 0
            for fd in os.listdir("/proc/self/fd"):
                try:
                    if os.readlink(f"/proc/self/fd/{fd}").startswith(self.root):
                        fds += 1
                except OSError:
                    continue
        except (OSError, IndexError):
            return
        self.maps = max(self.maps, len(mapped))
        self.files = max(self.files, fds)

    def peak(self) -> dict[str, int]:
        return {"max_maps": self.maps, "max_open_files": self.files}
