"""Memory of one MoE backward: the old per-expert indexing of the stacked expert weights against the model's
``experts_forward`` (grouped GEMM where torch has one, else the per-expert loop over ``unbind``), side by side.

    .venv/bin/python bench/moe_backward.py [--tokens 4096 --d-model 1024 --ffn 3584 --experts 16 --top-k 2]

Each variant runs in a fresh process with ``MALLOC_MMAP_THRESHOLD_=65536`` (large blocks come from mmap and
go back to the OS when freed, so RSS follows the live tensors). After the forward the kernel's peak-RSS mark
is reset (``/proc/self/clear_refs``); "peak above start" is VmHWM after ``backward()`` minus VmRSS just before
it. A second forward + backward counts the bytes of every new tensor storage created during backward (a
dispatch mode sees the aten ops autograd runs). Prints JSON; writes bench/results/moe_backward.json (Linux
only: reads /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import write_result

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = ("before", "after", "after_loop")


def _indexing_experts(x, expert_idx, weights, gate_up, down):
    """The implementation before this change: ``gate_up[e]`` / ``down[e]`` per expert (kept for comparison)."""
    import torch
    import torch.nn.functional as F

    k = expert_idx.shape[1]
    flat = expert_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token_of = order // k
    counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()
    xs = x[token_of]
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        gate, up = F.linear(xs[start:start + n], gate_up[e]).chunk(2, dim=-1)
        outs.append(F.linear(F.silu(gate) * up, down[e]))
        start += n
    ys = torch.cat(outs) * weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add(0, token_of, ys)


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(variant: str, args: argparse.Namespace) -> dict:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from model.layers import feedforward

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if variant == "before":
        fn = _indexing_experts
    else:
        if variant == "after_loop":
            feedforward._grouped_mm_ok = lambda *a: False
        fn = feedforward.experts_forward
    T, d, f, E, k = args.tokens, args.d_model, args.ffn, args.experts, args.top_k
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, d, generator=gen, dtype=dtype).requires_grad_()
    router = (torch.randn(E, d, generator=gen, dtype=dtype) * 0.02).requires_grad_()
    gate_up = (torch.randn(E, 2 * f, d, generator=gen, dtype=dtype) * 0.02).requires_grad_()
    down = (torch.randn(E, d, f, generator=gen, dtype=dtype) * 0.02).requires_grad_()
    leaves = {"x": x, "router": router, "gate_up": gate_up, "down": down}

    def forward():
        probs = torch.softmax(x @ router.T, dim=-1, dtype=torch.float32)
        weights, idx = torch.topk(probs, k, dim=-1)
        return fn(x, idx, weights.to(dtype), gate_up, down).float().pow(2).sum(), idx

    class CountAllocations(TorchDispatchMode):
        """Bytes of every op output whose storage is not one of its inputs' (views and in-place ops alias)."""

        def __init__(self):
            super().__init__()
            self.bytes = 0

        def __torch_dispatch__(self, func, types, a=(), kw=None):
            result = func(*a, **(kw or {}))
            inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((a, kw))
                      if isinstance(t, torch.Tensor)}
            for t in torch.utils._pytree.tree_leaves(result):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    self.bytes += t.untyped_storage().nbytes()
            return result

    # Pass 1, measured plainly: peak RSS and time of backward.
    loss, idx = forward()
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    start_rss = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = _status_bytes("VmHWM")
    checksum = {name: float(p.grad.double().sum()) for name, p in leaves.items()}
    # Pass 2: bytes allocated by backward. Separate, because the Python mode holds references to the
    # tensors it sees, which can stop autograd from accumulating gradients in place (and so raise the peak).
    for p in leaves.values():
        p.grad = None
    loss, _ = forward()
    counter = CountAllocations()
    with counter:
        loss.backward()
    return {"variant": variant, "rss_before_backward_MB": start_rss / 2**20,
            "peak_above_start_MB": (peak - start_rss) / 2**20,
            "allocated_in_backward_MB": counter.bytes / 2**20, "backward_s": seconds,
            "expert_grad_MB": (gate_up.numel() + down.numel()) * gate_up.element_size() / 2**20,
            "tokens_per_expert": torch.bincount(idx.reshape(-1), minlength=E).tolist(),
            "grad_checksum": checksum}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=3584, help="per-expert FFN width F (gate_up is [E, 2F, d])")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {VARIANTS}")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/moe_backward.json")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return 0

    import torch

    rows = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            parser.error(f"--variants: unknown variant {variant!r} (choose from {VARIANTS})")
        cmd = [sys.executable, __file__, "--child", variant] + [
            f"--{name}={getattr(args, name.replace('-', '_'))}"
            for name in ("tokens", "d-model", "ffn", "experts", "top-k", "dtype", "threads")]
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{variant}: peak above start {rows[-1]['peak_above_start_MB']:.0f} MB, "
              f"allocated {rows[-1]['allocated_in_backward_MB']:.0f} MB, {rows[-1]['backward_s']:.1f} s",
              file=sys.stderr)
    result = {"tokens": args.tokens, "d_model": args.d_model, "ffn": args.ffn, "experts": args.experts,
              "top_k": args.top_k, "dtype": args.dtype, "threads": args.threads, "torch": torch.__version__,
              "grouped_mm_available": hasattr(torch.nn.functional, "grouped_mm"), "results": rows}
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
