"""The GPU scripts on a machine without CUDA: each prints JSON saying why nothing was measured and exits with
its documented status; gpu_check.sh's dry run writes every report and a summary; the parity harness itself
runs on CPU (both sides pure) and catches a difference when there is one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gpu_common  # noqa: E402
import gpu_parity  # noqa: E402

pytestmark = pytest.mark.fast
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="these assert the behaviour without CUDA")


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@no_cuda
@pytest.mark.parametrize("script", ["gpu_model", "gpu_train", "gpu_parity"])
def test_without_cuda_scripts_report_why_and_exit_with_their_status(script, tmp_path):
    plain = run(f"bench/{script}.py", "--json", str(tmp_path / "plain.json"))
    assert plain.returncode == gpu_common.EXIT_NO_CUDA, plain.stderr
    report = json.loads(plain.stdout)
    assert report == json.loads((tmp_path / "plain.json").read_text())
    assert report["script"] == script and report["cuda_available"] is False
    assert report["kernels_available"] is False and report["kernels_reason"].startswith("no CUDA device")
    assert report["error"] == "no CUDA device: nothing measured"

    required = run(f"bench/{script}.py", "--require-kernels")
    assert required.returncode == gpu_common.EXIT_NO_KERNELS
    report = json.loads(required.stdout)
    assert report["error"].startswith("kernels required but unavailable: no CUDA device")
    assert "kernels required but unavailable" in required.stderr


@no_cuda
def test_gpu_check_dry_run_writes_every_report_and_a_summary(tmp_path):
    done = subprocess.run(["bash", "bench/gpu_check.sh", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "GPU_CHECK_DRY_RUN": "1", "PYTHON": sys.executable})
    assert done.returncode == 3, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gpu_check.log", "model.json", "parity.json", "setup.json", "summary.json", "train.json"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "no CUDA device: nothing measured" and summary["exit"] == 3
    assert summary["kernels_available"] is False and summary["kernels_reason"].startswith("no CUDA device")
    assert summary["setup_actions"] == ["dry run: nothing installed, no registry asked"]
    for step in ("parity", "model", "train"):
        assert summary["steps"][step] == {"exit": 3, "seconds": summary["steps"][step]["seconds"],
                                          "error": "no CUDA device: nothing measured"}
        assert json.loads((tmp_path / f"{step}.json").read_text())["kernels_available"] is False


def test_parity_harness_runs_every_check_on_cpu():
    done = run("bench/gpu_parity.py", "--cpu-selftest")
    assert done.returncode == 0, done.stderr
    checks = json.loads(done.stdout)["checks"]
    assert [(c["check"], c["dtype"]) for c in checks] == [
        ("selective_scan", "float32"), ("causal_conv", "float32"), ("selective_scan", "bfloat16"),
        ("causal_conv", "bfloat16"), ("model", "float32"), ("model", "bfloat16")]
    assert all(c["passed"] and c["max_rel_err"] == 0.0 and not c["kernel_path_used"] for c in checks)
    scan_grads = {k for k in checks[0]["errors"] if k.startswith("grad:")}
    assert scan_grads == {f"grad:{k}" for k in ("x", "dt", "dt_bias", "A", "B", "C", "D", "z")}
    assert {"grad:weight", "grad:bias", "grad:x_model_layout", "grad:x_contiguous"} <= set(checks[1]["errors"])
    model = checks[4]
    assert model["routers_pinned"] == 4 and model["params_missing_grad_on_one_path"] == []
    assert {"grad:layers.*.mamba.A_log", "grad:layers.*.feed_forward.router.weight", "grad:lm_head.weight"} \
        <= set(model["errors"])


def test_parity_comparison_fails_a_path_that_differs():
    x = torch.linspace(-1, 1, 100)

    def differs_by(eps):
        def run_path(kernels_on: bool):
            y = x * (1 + eps) if kernels_on else x
            return {"y": y}, {"x": 2 * y}
        return run_path

    assert gpu_parity.verdict("t", torch.float32, gpu_parity.compare(differs_by(1e-6)), 1e-3)["passed"]
    failed = gpu_parity.verdict("t", torch.float32, gpu_parity.compare(differs_by(1e-2)), 1e-3)
    assert not failed["passed"] and failed["errors"]["grad:x"] == pytest.approx(1e-2, rel=1e-3)
    nan = gpu_parity.verdict("t", torch.float32, {"out:y": float("nan")}, 1e-3)
    assert not nan["passed"]


def test_pinned_routing_replays_logits_exactly_and_keeps_router_gradients():
    cfg = gpu_parity.model_config("jamba-tiny")
    torch.manual_seed(0)
    model = gpu_common.build_model(cfg, "cpu", torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    pin = gpu_parity.PinnedRouting(model, cfg.top_k)
    pin.start("record")
    recorded = [lg.detach().clone() for lg in model(ids, output_router_logits=True).router_logits]
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "router"):
                m.router.weight.mul_(-1)           # route every token elsewhere if it were live
    pin.start("replay")
    out = model(ids, labels=ids, output_router_logits=True)
    assert all(torch.equal(lg, want) for lg, want in zip(out.router_logits, recorded))
    assert pin.flips > 0                           # what an unpinned run would have routed differently
    out.loss.backward()
    assert all(m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0
               for m in model.modules() if hasattr(m, "router"))
    pin.close()


def test_bench_models_are_built_on_the_device_in_bf16():
    from dataclasses import replace

    from model import JambaConfig

    cfg = replace(JambaConfig.from_yaml(ROOT / "configs/model/jamba-v0.1.yaml"), n_blocks=1)
    model = gpu_common.build_model(cfg, "meta", torch.bfloat16)  # meta: nothing is allocated anywhere
    params = list(model.parameters())
    assert sum(p.numel() for p in params) > 13e9
    assert {(p.device.type, p.dtype) for p in params} == {("meta", torch.bfloat16)}
    assert torch.get_default_dtype() == torch.float32


def test_a_crash_still_writes_the_report(tmp_path, capsys):
    report = {"script": "t", "speed": [{"kernels": True}]}

    def body():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    assert gpu_common.guarded(report, tmp_path / "r.json", body) == gpu_common.EXIT_CRASHED
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["error"] == "crashed: OutOfMemoryError: CUDA out of memory" and written["speed"]
