"""Training throughput and MFU of a reduced-depth, full-width Jamba on one GPU (run on a lent H100/H200).

One released block (8 layers: attention at 4, MoE with 16 experts top-2 on odd layers, d_model 4096,
ffn 14336), built directly on the device in bf16, mamba-ssm kernels where available (``kernels_available``
and ``kernels_reason`` in the JSON say), every layer recomputed, chunked loss: the per-layer work of the 52B
model. Timed: forward + backward (+ a bf16 AdamW step with ``--adamw``), after two warm-up steps.
MFU = model FLOPs per token (model/flops.py) x tokens/s / the device's dense bf16 peak. Also compares
the measured peak memory above weights and gradients with the memory plan's activation terms (train/plan.py,
which needs pydantic: without it that comparison is left out and the JSON says why).

    python bench/gpu_train.py [--seq 4096] [--micro-batch 1] [--steps 3] [--adamw] [--require-kernels]

Prints one JSON document; exit statuses in bench/gpu_common.py.
"""

from __future__ import annotations

import argparse
import time

from gpu_common import EXIT_OK, ROOT, add_common_args, build_model, emit, environment, run_checked


def planned_activation_bytes(cfg, args, kernels: bool) -> tuple[int | None, str]:
    """The memory plan's activation terms for this run, or None and why the plan could not be made."""
    try:
        from train.config import TrainConfig
        from train.plan import plan_memory
    except ImportError as exc:  # pydantic is not on every GPU image
        return None, f"train.plan unavailable: {type(exc).__name__}: {exc}"
    train_cfg = TrainConfig.model_validate({
        "model": "configs/model/jamba-v0.1.yaml", "steps": 1, "checkpoint": {"dir": "/tmp/unused"},
        "data": {"runs": ["unused"], "seq_len": args.seq, "pack": "concat"},
        "parallel": {"micro_batch": args.micro_batch, "activation_checkpointing": True, "zero_stage": 0,
                     "loss_chunk_tokens": args.loss_chunk, "dtype": "bf16"}})
    plan = plan_memory(train_cfg, cfg, world=1, kernels=kernels)
    return sum(plan.terms[k] for k in ("activations", "backward working set")), ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--loss-chunk", type=int, default=4096)
    parser.add_argument("--adamw", action="store_true", help="include a bf16 AdamW step (needs ~8 bytes/param)")
    args = parser.parse_args(argv)

    import torch

    report: dict = {"script": "gpu_train", **environment()}
    return run_checked(report, args.require_kernels, args.json, lambda: measure(torch, args, report))


def measure(torch, args, report: dict) -> int:
    from dataclasses import replace

    from model import JambaConfig
    from model.flops import device_peak_flops, training_flops_per_token

    device = torch.device("cuda")
    cfg = replace(JambaConfig.from_yaml(ROOT / "configs/model/jamba-v0.1.yaml"), n_blocks=1,
                  layers_per_block=args.layers)
    torch.manual_seed(0)
    model = build_model(cfg, device, torch.bfloat16)
    model.activation_checkpointing = True
    model.train()
    weights = torch.cuda.memory_allocated()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True) if args.adamw else None
    ids = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq + 1), device=device)
    times = []
    for step in range(args.steps + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(ids[:, :-1], targets=ids[:, 1:], loss_chunk=args.loss_chunk, output_router_logits=True)
        loss = out.lm_loss + cfg.router_aux_loss_coef * out.aux_loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
        torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
        if step == 0:
            torch.cuda.reset_peak_memory_stats()
    tokens = args.micro_batch * args.seq
    step_s = sorted(times)[len(times) // 2]
    fpt = training_flops_per_token(cfg, args.seq)
    peak = device_peak_flops(torch.cuda.get_device_name())
    measured_peak = torch.cuda.max_memory_allocated()
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    planned, plan_missing = planned_activation_bytes(cfg, args, report["kernels_available"])
    report.update({
        "config": {"layers": args.layers, "d_model": cfg.d_model, "experts": cfg.n_experts, "seq": args.seq,
                   "micro_batch": args.micro_batch, "adamw": args.adamw, "steps": args.steps},
        "parameters": sum(p.numel() for p in model.parameters()),
        "step_s_median": step_s,
        "tokens_per_s": tokens / step_s,
        "model_tflops_per_s": fpt * tokens / step_s / 1e12,
        "device_peak_tflops": peak / 1e12 if peak else None,
        "mfu": fpt * tokens / step_s / peak if peak else None,
        "peak_memory_gib": measured_peak / 2**30,
        "activation_memory_measured_gib": (measured_peak - weights - grads) / 2**30,
        "activation_memory_planned_gib": planned / 2**30 if planned is not None else None,
        "loss": float(loss),
    })
    if plan_missing:
        report["activation_memory_planned_missing"] = plan_missing
    emit(report, args.json)
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
