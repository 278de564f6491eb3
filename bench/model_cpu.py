"""CPU forward+backward throughput and peak memory: our Jamba vs transformers' JambaForCausalLM (its
pure-PyTorch path), same config and weights, measured side by side in one run.

Each model runs in its own fresh process (so peak RSS is its own), on the same checkpoint written once.
Usage: python bench/model_cpu.py [--config configs/model/jamba-small.yaml] [--seq 2048] [--batch 1] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(impl: str, checkpoint: str, seq: int, batch: int, steps: int) -> dict:
    import resource
    import time

    import torch

    torch.manual_seed(0)
    if impl == "ours":
        sys.path.insert(0, str(ROOT))
        from model.hf import load_hf

        model = load_hf(checkpoint).train()
    else:
        from transformers import JambaForCausalLM

        model = JambaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).train()
    vocab = model.config.vocab_size if impl == "hf" else model.cfg.vocab_size
    ids = torch.randint(0, vocab, (batch, seq))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(steps + 1):
        started = time.perf_counter()
        loss = model(ids, labels=ids, output_router_logits=True).loss  # same call for both
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i:  # the first step warms up allocators and caches
            times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    best = min(times)
    return {"impl": impl, "step_s": best, "tokens_per_s": batch * seq / best, "loss": float(loss),
            "peak_rss_mb": peak / 1024, "peak_rss_over_weights_mb": (peak - base_rss) / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs/model/jamba-small.yaml")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/model_cpu.json")
    parser.add_argument("--impls", default="ours,hf", help="which to run (comma-separated)")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.seq, args.batch, args.steps)))
        return 0

    import torch

    sys.path.insert(0, str(ROOT))
    from model import Jamba, JambaConfig
    from model.hf import save_hf

    cfg = JambaConfig.from_yaml(args.config)
    torch.manual_seed(0)
    results = {"config": str(args.config), "seq": args.seq, "batch": args.batch, "torch": torch.__version__,
               "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(Jamba(cfg), tmp)
        for impl in args.impls.split(","):
            print(f"{impl} ...", file=sys.stderr)
            proc = subprocess.run([sys.executable, __file__, "--worker", impl, tmp, "--seq", str(args.seq),
                                   "--batch", str(args.batch), "--steps", str(args.steps)],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            results[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
    if "hf" not in results or "ours" not in results:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results, indent=2))
        return 0
    ours, hf = results["ours"], results["hf"]
    results["speedup"] = ours["tokens_per_s"] / hf["tokens_per_s"]
    results["memory_ratio"] = ours["peak_rss_over_weights_mb"] / hf["peak_rss_over_weights_mb"]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'':<28}{'ours':>12}{'transformers':>14}")
    print(f"{'fwd+bwd tokens/s':<28}{ours['tokens_per_s']:>12.1f}{hf['tokens_per_s']:>14.1f}   "
          f"speedup {results['speedup']:.2f}x")
    print(f"{'peak RSS above weights, MB':<28}{ours['peak_rss_over_weights_mb']:>12.0f}"
          f"{hf['peak_rss_over_weights_mb']:>14.0f}   ratio {results['memory_ratio']:.2f}")
    print(f"{'loss (same weights, data)':<28}{ours['loss']:>12.4f}{hf['loss']:>14.4f}")
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
