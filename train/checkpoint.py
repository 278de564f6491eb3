"""The trainer's checkpoint directory: DeepSpeed tags ``step{N}/`` and the ``latest`` file naming one of them,
next to files that are not checkpoints (``metrics.jsonl``, ``tensorboard/``, exports, DeepSpeed's
``zero_to_fp32.py``).

``checkpoint.keep`` bounds the disk: after a tag is saved (on every rank) rank 0 calls
:func:`prune_checkpoints`, which removes the oldest step tags so that ``keep`` remain. A released-size tag is
~0.7 TB, so what it removes is chosen conservatively:

* only directories named exactly ``step<digits>`` (never a file, a symlink or anything else);
* never the tag ``latest`` names, and never a tag newer than it: such a tag is either being written (a crash
  mid-save of the next tag) or left over from a run that was rolled back, and a later save overwrites it;
* a tag is first renamed to ``.step{N}.pruning`` and then deleted, so a crash mid-delete never leaves a
  partial directory that looks like a tag; the next prune finishes deleting it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

STEP_TAG = re.compile(r"^step(\d+)$")
PRUNING = re.compile(r"^\.step(\d+)\.pruning$")


def read_latest(directory: str | os.PathLike[str]) -> str | None:
    try:
        tag = (Path(directory) / "latest").read_text().strip()
    except FileNotFoundError:
        return None
    return tag or None


def step_tags(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, path)`` of every step tag directory, oldest first."""
    tags = []
    for path in Path(directory).iterdir():
        match = STEP_TAG.match(path.name)
        if match and path.is_dir() and not path.is_symlink():
            tags.append((int(match.group(1)), path))
    return sorted(tags)


def prune_checkpoints(directory: str | os.PathLike[str], keep: int) -> list[Path]:
    """Remove the oldest step tags of ``directory`` beyond ``keep`` (the tag ``latest`` names counts as one
    of them); returns the removed tag directories. Call it only once every rank has finished saving."""
    if keep < 1:
        raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
    directory = Path(directory)
    removed = []
    for path in sorted(directory.iterdir()):   # what an earlier prune was deleting when it stopped
        if PRUNING.match(path.name) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
    latest = read_latest(directory)
    if latest is None:   # nothing says which tag is complete: delete nothing
        return removed
    tags = step_tags(directory)
    latest_match = STEP_TAG.match(latest)
    if latest_match:
        latest_step = int(latest_match.group(1))
        older = [(step, path) for step, path in tags if step < latest_step]
        kept_older = keep - 1 if (directory / latest).is_dir() else keep
    else:                # a tag named by hand: it is never a candidate, the step tags keep `keep`
        older, kept_older = tags, keep
    doomed = older[:max(0, len(older) - kept_older)]
    for step, path in doomed:
        staging = path.with_name(f".step{step}.pruning")
        path.rename(staging)
        shutil.rmtree(staging)
        removed.append(path)
    return removed


def directory_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of the regular files under ``path`` (a tag's size on disk, to compare with the plan)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                total += os.path.getsize(full)
    return total
