"""Kernel path vs pure-PyTorch path, outputs and gradients, on a CUDA machine.

Each check runs the same inputs through the model's own switch twice, kernels off then on, with the same
fixed random cotangents, and compares every output and every gradient:

* selective_scan: ``model.scan.selective_scan`` (``selective_scan_fn`` with delta_bias, softplus and the z
  gate fused) vs the chunked pure scan; gradients of x, dt, dt_bias, A, B, C, D, z;
* causal_conv: ``MambaMixer._conv`` (``causal_conv1d_fn`` + SiLU) vs the model's pure depthwise conv, on the
  model's channel-last layout (a transposed half of in_proj's output) and on a contiguous one; gradients of
  x, weight, bias;
* model: configs/model/jamba-small.yaml (jamba-tiny in the CPU self-test), LM + aux loss, gradient of every
  parameter, reported as the max relative error per parameter group (layer index folded). The MoE routers replay the pure run's logits in
  the kernel run (values only; the gradient is the live router's): a near-tie between two experts must not
  move a token between experts, which would be a routing difference, not a kernel error. How many tokens
  would have flipped is reported.

Error = max |kernel - pure| / max |pure| per tensor. fp32 runs with TF32 off (matmul precision 'highest');
bf16 with looser tolerances (TOLERANCE). Exit 1 if a check fails, 2 if the kernels are unavailable (nothing
to compare), 3 without CUDA (bench/gpu_common.py).

    python bench/gpu_parity.py [--require-kernels] [--json PATH]
    python bench/gpu_parity.py --cpu-selftest     # the harness on CPU: both sides are the pure path
"""

from __future__ import annotations

import argparse
import math
import re
import time

from gpu_common import (
    EXIT_NO_KERNELS,
    EXIT_OK,
    EXIT_PARITY_FAILED,
    ROOT,
    add_common_args,
    build_model,
    building_on,
    emit,
    environment,
    guarded,
    preflight,
)

# max |kernel - pure| / max |pure|, per tensor. fp32: far above float32 rounding through a 2k-token scan or 8
# layers (~1e-5), far below any real mistake (O(1)). bf16: both paths round activations to bf16 between ops,
# so one-ulp differences (~0.4 %) compound over layers and through backward.
TOLERANCE = {
    "float32": {"selective_scan": 1e-3, "causal_conv": 1e-3, "model": 2e-3},
    "bfloat16": {"selective_scan": 2e-2, "causal_conv": 2e-2, "model": 5e-2},
}
SIZES = {  # (GPU, CPU self-test)
    "scan": ({"b": 2, "d": 512, "n": 16, "L": 2051}, {"b": 1, "d": 16, "n": 4, "L": 70}),
    "conv": ({"b": 2, "d_inner": 1024, "L": 2051}, {"b": 1, "d_inner": 32, "L": 70}),
    "model": ({"config": "jamba-small", "batch": 2, "seq": 1024}, {"config": "jamba-tiny", "batch": 1, "seq": 32}),
}


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tolerance(check: str, dtype) -> float:
    return TOLERANCE[dtype_name(dtype)][check]


def rel_err(got, want) -> float:
    got, want = got.detach().float(), want.detach().float()
    diff, scale = float((got - want).abs().max()), float(want.abs().max())
    return diff / scale if scale > 0 else diff


def set_fp32_exact(torch) -> None:
    """fp32 means fp32: TF32 matmuls would put ~1e-3 errors into both paths and hide kernel differences."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def backward_fixed(torch, outputs, seed: int) -> None:
    """Backward from sum(out * w) with w random but identical in both runs (a plain sum would leave
    gradient terms that cancel unchecked)."""
    g = torch.Generator(device=outputs[0].device).manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g, device=o.device)).sum() for o in outputs)
    loss.backward()


def verdict(name: str, dtype, errors: dict[str, float], limit: float, **extra) -> dict:
    worst = max(errors.values())
    return {"check": name, "dtype": dtype_name(dtype), "tolerance": limit,
            "max_rel_err": worst, "passed": math.isfinite(worst) and worst <= limit,
            "errors": errors, **extra}


def compare(run) -> dict[str, float]:
    """run(kernels_on) -> (outputs, grads), two dicts of tensors; pure first, as the reference."""
    pure_out, pure_grad = run(False)
    fast_out, fast_grad = run(True)
    errors = {f"out:{k}": rel_err(fast_out[k], v) for k, v in pure_out.items()}
    errors.update({f"grad:{k}": rel_err(fast_grad[k], v) for k, v in pure_grad.items()})
    return errors


def check_selective_scan(torch, device, dtype, b: int, d: int, n: int, L: int) -> dict:
    from model import scan

    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    # The model's ranges: A = -exp(A_log), A_log ~ log(1..n); softplus(dt_bias) log-uniform in [1e-3, 1e-1].
    dt0 = torch.exp(torch.rand(d, generator=g, device=device) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    base = {"x": randn(b, d, L).to(dtype), "dt": (randn(b, d, L) * 0.5).to(dtype),
            "dt_bias": (dt0 + torch.log(-torch.expm1(-dt0))).to(dtype),
            "A": -torch.exp(torch.log(torch.arange(1, n + 1, device=device, dtype=torch.float32)).repeat(d, 1)
                            + 0.1 * randn(d, n)),
            "B": randn(b, n, L).to(dtype), "C": randn(b, n, L).to(dtype), "D": randn(d).to(dtype),
            "z": randn(b, d, L).to(dtype)}

    def run(on: bool):
        t = {k: v.detach().clone().requires_grad_(True) for k, v in base.items()}
        y, last = scan.selective_scan(t["x"], t["dt"], t["dt_bias"], t["A"], t["B"], t["C"], t["D"], z=t["z"],
                                      use_cuda_kernels=on)
        backward_fixed(torch, [y], seed=1)
        return {"y": y, "last_state": last}, {k: v.grad for k, v in t.items()}

    return verdict("selective_scan", dtype, compare(run), tolerance("selective_scan", dtype),
                   shape={"b": b, "d": d, "n": n, "L": L},
                   kernel_path_used=scan.use_kernels(base["x"], None, True))


def model_config(name: str = "jamba-small", **overrides):
    from dataclasses import replace

    from model import JambaConfig

    return replace(JambaConfig.from_yaml(ROOT / f"configs/model/{name}.yaml"), **overrides)


def check_causal_conv(torch, device, dtype, b: int, d_inner: int, L: int) -> dict:
    from model import scan
    from model.layers.mamba import MambaMixer

    torch.manual_seed(0)
    with building_on(device, dtype):
        mixer = MambaMixer(model_config(d_model=d_inner // 2))
        for p in (mixer.conv1d.weight, mixer.conv1d.bias):
            p.data.normal_(std=0.5)
    g = torch.Generator(device=device).manual_seed(2)
    xz0 = torch.randn(b, L, 2 * d_inner, generator=g, device=device).to(dtype)
    x0 = torch.randn(b, d_inner, L, generator=g, device=device).to(dtype)

    def run(on: bool):
        mixer.use_cuda_kernels = on
        mixer.zero_grad(set_to_none=True)
        xz, x = xz0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
        model_layout = xz.chunk(2, dim=-1)[0].transpose(1, 2)   # as MambaMixer.forward hands it over
        outs = {"y_model_layout": mixer._conv(model_layout, None), "y_contiguous": mixer._conv(x, None)}
        backward_fixed(torch, list(outs.values()), seed=3)
        return outs, {"x_model_layout": xz.grad, "x_contiguous": x.grad,
                      "weight": mixer.conv1d.weight.grad, "bias": mixer.conv1d.bias.grad}

    return verdict("causal_conv", dtype, compare(run), tolerance("causal_conv", dtype),
                   shape={"b": b, "d_inner": d_inner, "L": L, "k": mixer.d_conv},
                   kernel_path_used=scan.use_kernels(x0, None, True))


class PinnedRouting:
    """Forward hooks on every MoE router: ``record`` keeps the logits of a run, ``replay`` makes a later run
    route with exactly those values (``want + (out - out.detach())``: the value is ``want``, the gradient is
    the live router's) and counts the tokens whose top-k set would have differed."""

    def __init__(self, model, top_k: int):
        from torch import nn

        self.top_k, self.mode, self.recorded, self.flips, self.i = top_k, "off", [], 0, 0
        routers = [m.router for m in model.modules() if isinstance(getattr(m, "router", None), nn.Linear)]
        self.handles = [r.register_forward_hook(self._hook) for r in routers]
        self.routers = len(routers)

    def start(self, mode: str) -> None:
        """``record``, ``replay`` or ``off``; ``flips`` counts since the last record or replay began."""
        if mode != "off":
            self.i, self.flips = 0, 0
        if mode == "record":
            self.recorded = []
        self.mode = mode

    def _hook(self, module, inputs, out):
        if self.mode == "record":
            self.recorded.append(out.detach())
            return None
        if self.mode != "replay":
            return None
        want = self.recorded[self.i]
        self.i += 1
        k = self.top_k
        live = out.detach().topk(k, dim=-1).indices.sort(dim=-1).values
        pinned = want.topk(k, dim=-1).indices.sort(dim=-1).values
        self.flips += int((live != pinned).any(dim=-1).sum())
        return want + (out - out.detach())

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def param_group(name: str) -> str:
    return re.sub(r"^layers\.\d+\.", "layers.*.", name)


def check_model(torch, device, dtype, model, config: str, batch: int, seq: int) -> dict:
    from model import scan

    cfg = model.cfg
    model.to(dtype).train()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device,
                        generator=torch.Generator(device=device).manual_seed(4))
    pin = PinnedRouting(model, cfg.top_k)

    def run(on: bool, mode: str):
        model.set_cuda_kernels(on)
        model.zero_grad(set_to_none=True)
        pin.start(mode)
        out = model(ids, labels=ids, output_router_logits=True)
        backward_fixed(torch, [out.loss], seed=5)
        pin.start("off")
        grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
        return {"logits": out.logits.detach(), "loss": out.loss.detach()}, grads

    pure_out, pure_grad = run(False, "record")
    rerun_out, rerun_grad = run(False, "replay")
    fast_out, fast_grad = run(True, "replay")
    flips = pin.flips  # of the kernel run: what an unpinned comparison would have moved between experts
    pin.close()

    def by_group(grads, reference) -> dict[str, float]:
        groups: dict[str, float] = {}
        for name, want in reference.items():
            key = param_group(name)
            groups[key] = max(groups.get(key, 0.0), rel_err(grads[name], want))
        return groups

    errors = {f"out:{k}": rel_err(fast_out[k], v) for k, v in pure_out.items()}
    errors.update({f"grad:{k}": v for k, v in by_group(fast_grad, pure_grad).items()})
    missing = sorted(set(pure_grad) ^ set(fast_grad))
    if missing:  # a parameter with a gradient on one path only is a failure, whatever the numbers
        errors["grad:missing_on_one_path"] = math.inf
    rerun = max([rel_err(rerun_out[k], v) for k, v in pure_out.items()]
                + [rel_err(rerun_grad[n], v) for n, v in pure_grad.items()])
    extra = {"config": f"configs/model/{config}.yaml", "batch": batch, "seq": seq,
             "parameters": sum(p.numel() for p in model.parameters()),
             "parameter_groups": len({param_group(n) for n in pure_grad}),
             "routers_pinned": pin.routers, "tokens_routed_differently_unpinned": flips,
             "pure_rerun_max_rel_err": rerun, "params_missing_grad_on_one_path": missing,
             "kernel_path_used": scan.use_kernels(ids.float(), None, True)}
    return verdict("model", dtype, errors, tolerance("model", dtype), **extra)


def run_checks(torch, device, selftest: bool = False, checks: list | None = None) -> list[dict]:
    """Every check, appended to ``checks`` as it finishes (a crash keeps the ones before it)."""
    set_fp32_exact(torch)
    checks = [] if checks is None else checks
    pick = 1 if selftest else 0
    for dtype in (torch.float32, torch.bfloat16):
        checks.append(check_selective_scan(torch, device, dtype, **SIZES["scan"][pick]))
        checks.append(check_causal_conv(torch, device, dtype, **SIZES["conv"][pick]))
    sizes = SIZES["model"][pick]
    torch.manual_seed(0)
    model = build_model(model_config(sizes["config"]), device, torch.float32)
    for dtype in (torch.float32, torch.bfloat16):  # the same weights, cast to bf16 on the device
        checks.append(check_model(torch, device, dtype, model, **sizes))
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--cpu-selftest", action="store_true",
                        help="run every check on CPU at small sizes: both sides take the pure path, so this "
                             "tests the harness, not the kernels")
    args = parser.parse_args(argv)

    import torch

    report = {"script": "gpu_parity", **environment(), "tolerance": TOLERANCE}
    if args.cpu_selftest:
        device = torch.device("cpu")
        report["selftest"] = "CPU: both sides run the pure path; this proves the harness, not the kernels"
    else:
        status = preflight(report, args.require_kernels)
        if status is not None:
            emit(report, args.json)
            return status
        device = torch.device("cuda")
        if not report["kernels_available"]:  # nothing to compare: the same status as --require-kernels
            report.update(checks=[], passed=False,
                          error=f"kernels unavailable, nothing to compare: {report['kernels_reason']}")
            emit(report, args.json)
            return EXIT_NO_KERNELS
    report["checks"] = []
    return guarded(report, args.json, lambda: measure(torch, device, args, report))


def measure(torch, device, args, report: dict) -> int:
    started = time.perf_counter()
    checks = run_checks(torch, device, selftest=args.cpu_selftest, checks=report["checks"])
    if not args.cpu_selftest:
        for c in checks:  # a kernel check that silently ran the pure path on both sides proves nothing
            if not c["kernel_path_used"]:
                c["passed"], c["error"] = False, "the kernel path was not taken"
    report.update(passed=all(c["passed"] for c in checks),
                  failed=[f"{c['check']}_{c['dtype']}" for c in checks if not c["passed"]],
                  seconds=time.perf_counter() - started)
    emit(report, args.json)
    return EXIT_OK if report["passed"] else EXIT_PARITY_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
