"""The trainer through the real `deepspeed` launcher with 2 CPU ranks (gloo) on real pipeline shards:
loss decreases, ep_size 2 equals ep_size 1, kill-and-resume equals uninterrupted, the exported checkpoint
loads in transformers with matching logits, and bad configs fail before training."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.realdata]
deepspeed = pytest.importorskip("deepspeed")
STEPS = 8


def train_config(tmp: Path, run_dir: Path, name: str, **parallel) -> Path:
    cfg = {
        "model": str(ROOT / "configs/model/jamba-tiny.yaml"),
        "data": {"runs": [str(run_dir)], "seq_len": 128, "pack": "boundaries", "seed": 3},
        "steps": STEPS,
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "schedule": "cosine"},
        "parallel": {"ep_size": 2, "zero_stage": 1, "micro_batch": 2, "grad_accum": 2, "dtype": "fp32", **parallel},
        "checkpoint": {"dir": str(tmp / name), "every": 2},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(config: Path, **popen) -> subprocess.Popen:
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([launcher, "--num_gpus", "2", "--master_port", str(_port()), "--module", "train",
                             "--config", str(config)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def _port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(config: Path) -> str:
    proc = launch(config)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def losses(ckpt: Path) -> dict[int, dict]:
    records = {}
    for line in (ckpt / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record  # a resumed run rewrites the steps after its checkpoint
    return records


@pytest.fixture(scope="module")
def ep2_run(clean_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    run(train_config(tmp, clean_run[0], "ep2"))
    return tmp


def test_loss_decreases_on_pipeline_shards(ep2_run):
    rec = losses(ep2_run / "ep2")
    assert sorted(rec) == list(range(1, STEPS + 1))
    assert rec[STEPS]["loss"] < rec[1]["loss"] - 0.5
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in rec.values())
    assert rec[1]["expert_load_max"] >= rec[1]["expert_load_min"] >= 0
    layers = rec[1]["expert_load_per_layer"]
    assert len(layers) == 4 and all(layer["max"] >= layer["min"] for layer in layers)
    assert list((ep2_run / "ep2" / "tensorboard").glob("events.out.tfevents.*"))
    expert_files = list((ep2_run / "ep2" / f"step{STEPS}").glob("layer_*_expert_*_mp_rank_00_model_states.pt"))
    n_moe, n_experts = 4, 4  # jamba-tiny: 8 layers, MoE on odd ones, 4 experts
    assert len(expert_files) == n_moe * n_experts  # both ranks' experts are saved, by global id


def test_expert_parallel_2_equals_1(ep2_run, clean_run):
    run(train_config(ep2_run, clean_run[0], "ep1", ep_size=1))
    a, b = losses(ep2_run / "ep2"), losses(ep2_run / "ep1")
    for step in range(1, STEPS + 1):
        assert abs(a[step]["loss"] - b[step]["loss"]) < 1e-4 * abs(b[step]["loss"]), step
        assert abs(a[step]["grad_norm"] - b[step]["grad_norm"]) < 1e-3 * b[step]["grad_norm"], step


def test_kill_and_resume_equals_uninterrupted(ep2_run, clean_run):
    config = train_config(ep2_run, clean_run[0], "killed")
    ckpt = ep2_run / "killed"
    proc = launch(config, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        latest = ckpt / "latest"
        if latest.exists() and latest.read_text().strip() in ("step2", "step4"):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (ckpt / "latest").exists() and not (ckpt / "final").exists(), "killed too late"
    out = run(config)
    assert "resumed from" in out
    resumed, clean = losses(ckpt), losses(ep2_run / "ep2")
    for step in range(1, STEPS + 1):
        assert abs(resumed[step]["loss"] - clean[step]["loss"]) < 1e-5 * clean[step]["loss"], step


def test_exported_checkpoint_loads_in_transformers(ep2_run):
    transformers = pytest.importorskip("transformers")
    from model.hf import load_hf, load_native

    final = ep2_run / "ep2" / "final"
    ours = load_native(final).eval()
    hf = transformers.JambaForCausalLM.from_pretrained(final / "hf").eval()
    again = load_hf(final / "hf").eval()
    ids = torch.randint(0, ours.cfg.vocab_size, (1, 40))
    with torch.no_grad():
        want = ours(ids).logits
        assert ((hf(ids).logits - want).abs().max() / want.abs().max()).item() < 1e-4
        assert torch.equal(again(ids).logits, want)


@pytest.mark.parametrize(("change", "message"), [
    ({"parallel": {"zero_stage": 3}}, "zero_stage 3 is not supported"),
    ({"parallel": {"ep_size": 3}}, "parallel.ep_size: 3 must divide the world size 1"),
    ({"data": {"runs": ["/nonexistent/run"]}}, "no manifest.json"),
    ({"model": str(ROOT / "configs/model/jamba-demo.yaml"), "data": {}}, None),
])
def test_bad_configs_fail_before_training(clean_run, tmp_path, change, message):
    path = train_config(tmp_path, clean_run[0], "bad")
    cfg = yaml.safe_load(path.read_text())
    cfg["parallel"]["ep_size"] = 1  # a single process: only the problem under test remains
    for key, value in change.items():
        if isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    if message is None:  # a model whose vocabulary is smaller than the shards' tokenizer
        tiny_vocab = yaml.safe_load((ROOT / "configs/model/jamba-tiny.yaml").read_text())
        tiny_vocab["vocab_size"] = 1000
        (tmp_path / "small-vocab.yaml").write_text(yaml.safe_dump(tiny_vocab))
        cfg["model"] = str(tmp_path / "small-vocab.yaml")
        message = "but the model's vocab_size is 1,000"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "train", "--config", str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert message in proc.stderr
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_unused_experts_still_get_gradients():
    """A rank whose tokens skip an expert must still produce that expert's (zero) gradient, or the
    data-parallel reduction posts mismatched collectives (seen as a gloo abort at ep_size 1 on 2 ranks)."""
    from model import JambaConfig
    from model.layers.feedforward import MoE
    from train.expert_parallel import expert_parallel_forward, make_expert_parallel_moe

    cfg = JambaConfig.from_yaml(ROOT / "configs/model/jamba-tiny.yaml")
    moe = MoE(cfg)
    layer = make_expert_parallel_moe(moe, ep_size=1)
    layer._full = None  # single process: build the local experts without DeepSpeed's groups
    from train.expert_parallel import _Expert

    for e in range(cfg.n_experts):
        layer.deepspeed_moe.experts.deepspeed_experts.append(_Expert(moe.gate_up[e], moe.down[e], "ep_size_1"))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = layer.router.weight[1, 0] = 10.0  # every token -> experts 0 and 1
    x = torch.ones(1, 5, cfg.d_model)
    out, router = expert_parallel_forward(layer, x)
    out.sum().backward()
    assert router.counts.tolist()[2:] == [0, 0]
    for e, expert in enumerate(layer.local_experts()):
        assert expert.gate_up.grad is not None and expert.down.grad is not None, e
    assert float(layer.local_experts()[3].gate_up.grad.abs().sum()) == 0.0
    want, _ = moe(x)
    assert torch.allclose(out, want, atol=1e-6)


def _ep_worker(rank: int, port: int, route_to: int, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import deepspeed as ds

    from model import JambaConfig
    from model.layers.feedforward import MoE
    from train.expert_parallel import make_expert_parallel_moe

    ds.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    cfg = JambaConfig.from_yaml(ROOT / "configs/model/jamba-tiny.yaml")
    moe = MoE(cfg)
    with torch.no_grad():  # every token of every rank goes to experts owned by EP rank `route_to`
        moe.router.weight.zero_()
        moe.router.weight[2 * route_to, 0] = moe.router.weight[2 * route_to + 1, 0] = 10.0
    layer = make_expert_parallel_moe(moe, ep_size=2)
    layer.set_deepspeed_parallelism()
    x = torch.ones(1, 6, cfg.d_model, requires_grad=True) * (rank + 1)
    out, _ = layer(x)
    out.sum().backward()  # would hang or abort if one rank skipped a collective in backward
    want, _ = moe(x.detach())
    results[rank] = bool(torch.allclose(out.detach(), want, atol=1e-6))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("route_to", [0, 1])
def test_a_rank_whose_experts_get_no_tokens_keeps_collectives_matched(route_to):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    ctx = mp.spawn(_ep_worker, args=(_port(), route_to, results), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        assert time.monotonic() < deadline, "expert-parallel backward hung"
    assert dict(results) == {0: True, 1: True}
