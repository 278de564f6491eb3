"""Speed and memory of the kernel path vs the pure-PyTorch path on a lent CUDA machine (H100/H200).

A reduced-depth, full-width Jamba (configs/model/jamba-v0.1.yaml: d_model 4096, one block of 8 layers with
the released layout, 16 experts, ~12.7B parameters) is built once, directly on the device in bf16, then
timed forward + backward with kernels on and off (the same weights): tokens/s and peak CUDA memory. Kernel
vs pure outputs and gradients are bench/gpu_parity.py's job (``--parity`` runs it here too).

Prints one JSON document (``kernels_available`` and ``kernels_reason`` say which paths were timed); exit
statuses in bench/gpu_common.py. Usage on the device (bench/gpu_check.sh runs it):
    python bench/gpu_model.py [--seq 4096] [--layers 8] [--experts 16] [--steps 3] [--require-kernels]
"""

from __future__ import annotations

import argparse
import time

from gpu_common import (
    EXIT_OK,
    EXIT_PARITY_FAILED,
    ROOT,
    add_common_args,
    build_model,
    emit,
    environment,
    run_checked,
)


def speed(torch, model, ids, steps: int, kernels_on: bool) -> dict:
    """One warm-up step, then ``steps`` timed forward + backward steps; peak memory after the warm-up."""
    model.set_cuda_kernels(kernels_on)
    times = []
    for i in range(steps + 1):
        if i == 1:
            torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        started = time.perf_counter()
        loss = model(ids, labels=ids, output_router_logits=True).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - started)
    median = sorted(times)[len(times) // 2]
    return {"kernels": kernels_on, "step_s_median": median, "step_s_min": min(times),
            "tokens_per_s": ids.numel() / median, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            "loss": float(loss)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--checkpointing", action="store_true", help="recompute every layer in backward")
    parser.add_argument("--skip-pure-speed", action="store_true", help="only time the kernel path")
    parser.add_argument("--parity", action="store_true", help="also run bench/gpu_parity.py's checks first")
    args = parser.parse_args(argv)

    import torch

    report: dict = {"script": "gpu_model", **environment(),
                    "config": {k: str(v) if k == "json" else v for k, v in vars(args).items()}}
    return run_checked(report, args.require_kernels, args.json, lambda: measure(torch, args, report))


def measure(torch, args, report: dict) -> int:
    from dataclasses import replace

    from model import JambaConfig

    device = torch.device("cuda")
    if args.parity:
        from gpu_parity import run_checks

        run_checks(torch, device, checks=report.setdefault("parity", []))
    cfg = replace(JambaConfig.from_yaml(ROOT / "configs/model/jamba-v0.1.yaml"), n_blocks=1,
                  layers_per_block=args.layers, n_experts=args.experts)
    torch.manual_seed(0)
    started = time.perf_counter()
    model = build_model(cfg, device, torch.bfloat16).train()
    model.activation_checkpointing = args.checkpointing
    report.update(parameters=sum(p.numel() for p in model.parameters()),
                  weights_gib=torch.cuda.memory_allocated() / 2**30, build_s=time.perf_counter() - started)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    runs = [True] if report["kernels_available"] else []
    if not args.skip_pure_speed or not runs:
        runs.append(False)
    report["speed"] = []
    for on in runs:  # kernels first: if the pure path runs out of memory, the kernel numbers are kept
        report["speed"].append(speed(torch, model, ids, args.steps, on))
    if len(report["speed"]) == 2:
        report["kernel_speedup"] = report["speed"][0]["tokens_per_s"] / report["speed"][1]["tokens_per_s"]
    emit(report, args.json)
    parity_failed = any(not c["passed"] for c in report.get("parity", []))
    return EXIT_PARITY_FAILED if parity_failed else EXIT_OK

if __name__ == "__main__":
    raise SystemExit(main())
