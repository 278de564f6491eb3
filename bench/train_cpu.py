"""Trainer throughput and MFU on CPU: the tiny demo config through the real `deepspeed` launcher (2 CPU
ranks, gloo, ep_size 2), against the limit measured in the same run: this machine's fp32 matmul peak per
core (one rank per core).

    .venv/bin/python bench/train_cpu.py [--run runs/demo] [--steps 12]

Writes bench/results/train_cpu.json. Needs a pipeline run (`make demo`, or `python -m pipeline run
--config configs/pipeline/demo.yaml`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_result

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def matmul_peak_flops(size: int = 1024, seconds: float = 3.0) -> float:
    """Best fp32 GEMM FLOP/s of one thread (what one rank gets on its core)."""
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(size, size), torch.randn(size, size)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=str(ROOT / "runs/demo"), help="pipeline run directory")
    parser.add_argument("--config", default=str(ROOT / "configs/train/tiny-cpu.yaml"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default=str(ROOT / "bench/results/train_cpu.json"))
    args = parser.parse_args()
    if not (Path(args.run) / "manifest.json").exists():
        parser.error(f"{args.run}: no manifest.json (run the pipeline first)")

    peak = matmul_peak_flops()
    with tempfile.TemporaryDirectory() as tmp:
        launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
        cmd = [launcher, "--num_gpus", "2", "--module", "train", "--config", args.config,
               "--set", f"steps={args.steps}", "--set", f"data.runs=[{args.run}]",
               "--set", f"checkpoint.dir={tmp}/ckpt", "--set", f"checkpoint.every={10 * args.steps}",
               "--set", f"log.peak_tflops={peak / 1e12}"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return 1
        records = [json.loads(line) for line in (Path(tmp) / "ckpt/metrics.jsonl").read_text().splitlines()]
    steady = records[2:]  # the first steps include allocator and thread-pool warm-up
    result = {
        "command": " ".join(["python", "bench/train_cpu.py", *sys.argv[1:]]),
        "config": os.path.relpath(args.config, ROOT),
        "ranks": 2,
        "steps_measured": len(steady),
        "matmul_peak_gflops_per_core": peak / 1e9,
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in steady),
        "model_gflops_per_s_median": statistics.median(r["model_flops_per_s"] for r in steady) / 1e9,
        "mfu_median": statistics.median(r["mfu"] for r in steady),
        "peak_mem_mib": max(r["peak_mem_bytes"] for r in records) / 2**20,
        "loss_first_last": [records[0]["loss"], records[-1]["loss"]],
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
