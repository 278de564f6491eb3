"""GPU check and benchmark for a lent CUDA machine (H100/H200): mamba-ssm kernel path vs pure-PyTorch path.

1. kernels: imports mamba-ssm / causal-conv1d (e.g. wheels installed with ``pip install --target``);
2. parity: ``selective_scan_fn`` vs ``model.scan.chunked_scan`` on random inputs, and the whole model with
   kernels on vs off (fp32 and bf16);
3. speed and memory: forward+backward tokens/s and peak CUDA memory of a reduced-depth, full-width Jamba
   (d_model 4096, one block of 8 layers with the released layout) in bf16, kernel path vs pure path.

Prints one JSON document. Usage on the device (see docs/benchmarks.md for the exact command that was run):
    python bench/gpu_model.py [--seq 4096] [--layers 8] [--experts 16] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def scan_parity(torch, device) -> dict:
    import torch.nn.functional as F

    from model.scan import chunked_scan, kernels

    out = {}
    fn = kernels()["selective_scan_fn"]
    g = torch.Generator(device=device).manual_seed(0)
    b, d, n, L = 2, 512, 16, 1024
    x = torch.randn(b, d, L, device=device, generator=g)
    dt = F.softplus(torch.randn(b, d, L, device=device, generator=g) * 0.5 + math.log(math.expm1(0.05)))
    A = -torch.exp(torch.randn(d, n, device=device, generator=g) * 0.5 + 1)
    B, C = torch.randn(b, n, L, device=device, generator=g), torch.randn(b, n, L, device=device, generator=g)
    D = torch.randn(d, device=device, generator=g)
    y_kernel = fn(x, dt, A, B, C, D)
    y_pure, _ = chunked_scan(x, dt, A, B, C, D)
    out["selective_scan_fp32_rel_err"] = rel(y_kernel, y_pure)
    y_kernel16 = fn(x.bfloat16(), dt.bfloat16(), A, B.bfloat16(), C.bfloat16(), D)
    out["selective_scan_bf16_rel_err"] = rel(y_kernel16, y_pure)
    return out


def model_parity(torch, device) -> dict:
    from model import Jamba, JambaConfig

    cfg = JambaConfig.from_yaml(ROOT / "configs/model/jamba-small.yaml")
    torch.manual_seed(0)
    model = Jamba(cfg).to(device).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 512), device=device)
    out = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            model.to(dtype)
            model.set_cuda_kernels(True)
            fast = model(ids).logits
            model.set_cuda_kernels(False)
            pure = model(ids).logits
            out[f"model_logits_{str(dtype)[6:]}_rel_err"] = rel(fast, pure)
    return out


def speed(torch, device, args, kernels_on: bool) -> dict:
    from model import Jamba, JambaConfig

    cfg = JambaConfig(n_blocks=1, layers_per_block=args.layers, n_experts=args.experts, vocab_size=65536)
    torch.manual_seed(0)
    model = Jamba(cfg).to(device=device, dtype=torch.bfloat16).train()
    model.set_cuda_kernels(kernels_on)
    model.activation_checkpointing = args.checkpointing
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.steps + 1):
        torch.cuda.synchronize()
        started = time.perf_counter()
        loss = model(ids, labels=ids, output_router_logits=True).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - started)
    params = sum(p.numel() for p in model.parameters())
    return {"kernels": kernels_on, "params": params, "step_s": min(times),
            "tokens_per_s": args.batch * args.seq / min(times),
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30, "loss": float(loss)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--skip-pure-speed", action="store_true", help="only time the kernel path")
    args = parser.parse_args()

    import torch

    from model.scan import kernels

    report: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if not torch.cuda.is_available():
        print(json.dumps({**report, "error": "no CUDA device"}))
        return 1
    device = torch.device("cuda")
    report["device"] = torch.cuda.get_device_name()
    report["kernels_available"] = kernels() is not None
    if report["kernels_available"]:
        report.update(scan_parity(torch, device))
        report.update(model_parity(torch, device))
    runs = [True] if report["kernels_available"] else []
    if not args.skip_pure_speed:
        runs.append(False)
    report["speed"] = [speed(torch, device, args, on) for on in runs]
    report["config"] = vars(args)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
