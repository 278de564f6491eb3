"""checkpoint.keep: the oldest step tags beyond `keep` are removed, never the one `latest` names, never a
newer one, never anything that is not a step tag directory; an interrupted prune is finished by the next."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from train.checkpoint import directory_bytes, prune_checkpoints, step_tags


def make_tag(root: Path, step: int, files: int = 3) -> Path:
    tag = root / f"step{step}"
    tag.mkdir()
    for i in range(files):
        (tag / f"layer_0_expert_{i}_mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"y" * 100)
    return tag


def names(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()}


def others(root: Path) -> set[str]:
    """What a checkpoint directory holds besides tags, and must keep."""
    (root / "metrics.jsonl").write_text("{}\n")
    (root / "zero_to_fp32.py").write_text("# DeepSpeed's script\n")
    (root / "tensorboard").mkdir()
    (root / "final").mkdir()
    (root / "step3.txt").write_text("a file named like a tag")
    (root / "step1").write_text("a file, not a directory")
    (root / "stepx").mkdir()
    (root / "global_step2").mkdir()
    os.symlink(root / "final", root / "step0")    # a link is not a tag either
    return {"metrics.jsonl", "zero_to_fp32.py", "tensorboard", "final", "step3.txt", "step1", "stepx",
            "global_step2", "step0"}


def test_keeps_the_newest_tags_and_everything_else(tmp_path):
    kept = others(tmp_path)
    for step in (2, 4, 6, 8, 10):
        make_tag(tmp_path, step)
    (tmp_path / "latest").write_text("step10")
    removed = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["step2", "step4", "step6"]
    assert names(tmp_path) == kept | {"latest", "step8", "step10"}
    assert (tmp_path / "final").is_dir() and (tmp_path / "step1").read_text() == "a file, not a directory"
    assert prune_checkpoints(tmp_path, keep=2) == []   # idempotent


def test_sorted_by_step_number_not_by_name(tmp_path):
    for step in (9, 10, 100, 20):
        make_tag(tmp_path, step)
    (tmp_path / "latest").write_text("step100\n")
    assert [p.name for p in prune_checkpoints(tmp_path, keep=2)] == ["step9", "step10"]
    assert [s for s, _ in step_tags(tmp_path)] == [20, 100]


def test_never_the_latest_nor_a_newer_tag(tmp_path):
    for step in (2, 4, 6, 8):
        make_tag(tmp_path, step)
    # resumed from step4 (latest rolled back by hand): step6/step8 are a rolled-back run's, or being written
    (tmp_path / "latest").write_text("step4")
    assert [p.name for p in prune_checkpoints(tmp_path, keep=1)] == ["step2"]
    assert names(tmp_path) == {"latest", "step4", "step6", "step8"}


def test_without_latest_nothing_is_removed(tmp_path):
    for step in (2, 4, 6):
        make_tag(tmp_path, step)
    assert prune_checkpoints(tmp_path, keep=1) == []
    assert len(step_tags(tmp_path)) == 3


def test_a_hand_named_latest_is_kept_and_step_tags_keep_keep(tmp_path):
    for step in (2, 4, 6):
        make_tag(tmp_path, step)
    (tmp_path / "best").mkdir()
    (tmp_path / "latest").write_text("best")
    assert [p.name for p in prune_checkpoints(tmp_path, keep=2)] == ["step2"]
    assert names(tmp_path) == {"latest", "best", "step4", "step6"}


def test_a_crash_mid_prune_is_finished_by_the_next_prune(tmp_path, monkeypatch):
    kept = others(tmp_path)
    for step in (2, 4, 6, 8):
        make_tag(tmp_path, step)
    (tmp_path / "latest").write_text("step8")
    import shutil

    real_rmtree = shutil.rmtree

    def crash_after_one_file(path, *args, **kwargs):   # the process dies while deleting step2
        next(Path(path).iterdir()).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr("train.checkpoint.shutil.rmtree", crash_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoints(tmp_path, keep=2)
    # the partial directory no longer looks like a tag: DeepSpeed, the export CLI and a person see step4..8
    assert [s for s, _ in step_tags(tmp_path)] == [4, 6, 8]
    partial = tmp_path / ".step2.pruning"
    assert partial.is_dir() and len(list(partial.iterdir())) == 3
    monkeypatch.setattr("train.checkpoint.shutil.rmtree", real_rmtree)
    assert [p.name for p in prune_checkpoints(tmp_path, keep=2)] == ["step4"]
    assert names(tmp_path) == kept | {"latest", "step6", "step8"}


def test_a_partial_tag_dir_older_than_latest_is_removed_like_any_old_tag(tmp_path):
    make_tag(tmp_path, 2, files=1)           # e.g. a crash while DeepSpeed wrote it, long ago
    (tmp_path / "step2" / "mp_rank_00_model_states.pt").unlink()
    for step in (4, 6):
        make_tag(tmp_path, step)
    make_tag(tmp_path, 8, files=1)           # being written by a crashed save of step8: newer than latest
    (tmp_path / "latest").write_text("step6")
    assert [p.name for p in prune_checkpoints(tmp_path, keep=2)] == ["step2"]
    assert [s for s, _ in step_tags(tmp_path)] == [4, 6, 8]


def test_keep_must_be_positive_and_sizes_add_up(tmp_path):
    with pytest.raises(ValueError, match="checkpoint.keep must be >= 1"):
        prune_checkpoints(tmp_path, keep=0)
    assert directory_bytes(make_tag(tmp_path, 2, files=3)) == 3 * 10 + 100
