"""The on-disk shuffle: partitioned files in both layouts, merging with bounded fan-in, and the per-task
count of memory maps and open files."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.dedup.shuffle import (
    MapProbe,
    PartitionedFile,
    merge_plan,
    merge_task,
    read_partition,
    write_partitioned,
)
from pipeline.dedup.steps import SignatureFiles, make_loc, node_partition, removal_partition


def _producers(tmp_path, count: int, partitions: int, rows: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    files, truth = [], {k: [] for k in range(partitions)}
    for i in range(count):
        u = rng.integers(0, 1 << 40, rows, dtype=np.int64)
        v = rng.integers(0, 1 << 40, rows, dtype=np.int64)
        part = node_partition(u, partitions)
        path = tmp_path / f"p{i:03d}.arrow"
        write_partitioned(path, {"u": u, "v": v}, part, partitions)
        files.append(str(path))
        for k in range(partitions):
            truth[k].append((u[part == k], v[part == k]))
    return files, truth


def test_partitions_read_back_exactly_in_producer_order(tmp_path):
    files, truth = _producers(tmp_path, 5, 7)
    for k in range(7):
        got = read_partition(files, k, ("u", "v"))
        assert np.array_equal(got["u"], np.concatenate([t[0] for t in truth[k]]))
        assert np.array_equal(got["v"], np.concatenate([t[1] for t in truth[k]]))


def test_merging_in_levels_keeps_every_row_of_every_partition(tmp_path):
    """11 producers at fan-in 3: 11 -> 4 -> 2 files; each partition reads the same rows as from the
    producers directly, in the same order, and no merge held more than its fan-in of files mapped."""
    P, F = 6, 3
    files, truth = _producers(tmp_path, 11, P)
    assert merge_plan(11, F) == [11, 4, 2]
    assert merge_plan(90_000, 64) == [90_000, 1407, 22] and merge_plan(64, 64) == [64]
    level, peak = files, 0
    for depth in (1, 2):
        outs = []
        for g in range(0, len(level), F):
            out = tmp_path / f"m{depth}-{g:03d}.arrow"
            result = merge_task(level[g:g + F], str(out), P, str(tmp_path))
            peak = max(peak, result["max_maps"])
            outs.append(str(out))
        level = outs
    assert len(level) == 2
    assert 1 <= peak <= F
    for k in range(P):
        got = read_partition(level, k, ("u", "v"))
        assert np.array_equal(got["u"], np.concatenate([t[0] for t in truth[k]]))
        with PartitionedFile(level[0]) as f:
            assert f.partitions == P                       # batches layout: one batch per partition, empty too


def test_empty_partitions_and_empty_files(tmp_path):
    path = tmp_path / "empty.arrow"
    write_partitioned(path, {"u": np.zeros(0, np.int64), "v": np.zeros(0, np.int64)}, np.zeros(0, np.int64), 4)
    merged = tmp_path / "merged.arrow"
    assert merge_task([str(path), str(path)], str(merged), 4, str(tmp_path))["rows"] == 0
    for k in range(4):
        assert len(read_partition([str(path), str(merged)], k, ("u", "v"))["u"]) == 0


def test_reading_a_partition_leaves_no_file_mapped(tmp_path):
    files, _ = _producers(tmp_path, 4, 3)
    probe = MapProbe(tmp_path)
    got = read_partition(files, 1, ("u", "v"))
    probe.sample()
    assert probe.peak()["max_maps"] == 0 and len(got["u"]) > 0      # copies, maps released file by file
    with PartitionedFile(files[0]):
        probe.sample()
        assert probe.peak()["max_maps"] == 1


def test_signature_reads_hold_a_bounded_number_of_files(tmp_path):
    """Random access over 40 unit files with at most 4 mapped: values come back in request order."""
    num_perm, units = 8, 40
    paths, expected = [], {}
    for unit in range(units):
        sigs = np.arange(5 * num_perm, dtype=np.uint64).reshape(5, num_perm) + np.uint64(1000 * unit)
        table = pa.table({"id": [f"u{unit}-r{r}" for r in range(5)], "exact": np.full(5, unit, np.uint64),
                          "sig": pa.FixedSizeListArray.from_arrays(pa.array(sigs.reshape(-1)), num_perm)})
        path = tmp_path / f"s{unit:03d}.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        paths.append(str(path))
        for r in range(5):
            expected[int(make_loc(0, unit, np.array([r]))[0])] = (f"u{unit}-r{r}", sigs[r])
    rng = np.random.default_rng(1)
    locs = rng.choice(np.array(sorted(expected), dtype=np.int64), 150)
    probe = MapProbe(tmp_path)
    files = SignatureFiles([paths], max_open=4, probe=probe)
    got = files.rows(locs, ("id", "sig", "exact"))
    assert got["id"] == [expected[int(x)][0] for x in locs]
    assert np.array_equal(got["sig"], np.stack([expected[int(x)][1] for x in locs]))
    assert np.array_equal(got["exact"], (locs >> 32).astype(np.uint64))
    assert probe.peak()["max_maps"] <= 4
    assert files.opened == len(np.unique(locs >> 32))   # grouped: each file opened once, not once per row
    assert files.rows(np.zeros(0, np.int64), ("sig",))["sig"].shape == (0, 0)


def test_removal_partitions_are_unit_ranges():
    units = np.arange(1000)
    part = removal_partition(units, 1000, 16)
    assert part.min() == 0 and part.max() == 15 and np.all(np.diff(part) >= 0)   # contiguous ranges
    assert np.all(np.bincount(part) >= 62)
