"""``python -m train.plot METRICS.jsonl --out loss.png``: the loss curve of a training run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def plot(metrics: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records: dict[int, dict] = {}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record  # the last word on a step (a resumed run rewrites steps)
    steps = sorted(records)
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=[3, 1])
    ax_loss.plot(steps, [records[s]["loss"] for s in steps], label="LM loss")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.set_title(f"{metrics.parent.name}: {len(steps)} steps")
    ax_lr.plot(steps, [records[s]["lr"] for s in steps], color="tab:orange")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__)
    parser.add_argument("metrics", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(f"wrote {plot(args.metrics, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
