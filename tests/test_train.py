"""The trainer through the real `deepspeed` launcher with 2 CPU ranks (gloo) on real pipeline shards:
loss decreases, ep_size 2 equals ep_size 1, context parallelism (cp 2 and cp 2 x ep 2 on 4 ranks) equals one
rank in losses and every parameter's gradient and resumes exactly, kill-and-resume equals uninterrupted, only `checkpoint.keep`
tags remain and their size is the plan's, the export CLI's checkpoint loads in transformers with matching
logits and its memory is one MoE layer's, not the model's, and bad configs fail before training."""

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


PEAK_TFLOPS = 0.5  # a stated device peak, so that MFU is reported on CPU


def train_config(tmp: Path, run_dir: Path, name: str, model: str | None = None, steps: int = STEPS,
                 seq_len: int = 128, keep: int | None = None, **parallel) -> Path:
    cfg = {
        "model": model or str(ROOT / "configs/model/jamba-tiny.yaml"),
        "data": {"runs": [str(run_dir)], "seq_len": seq_len, "pack": "boundaries", "seed": 3},
        "steps": steps,
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "schedule": "cosine"},
        "parallel": {"ep_size": 2, "zero_stage": 1, "micro_batch": 2, "grad_accum": 2, "dtype": "fp32", **parallel},
        "checkpoint": {"dir": str(tmp / name), "every": 2, **({"keep": keep} if keep else {})},
        "log": {"peak_tflops": PEAK_TFLOPS},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(config: Path, env: dict | None = None, ranks: int = 2, **popen) -> subprocess.Popen:
    """The real launcher on CPU ranks. Every run is under the collective device guard
    (train/device_guard.py): a collective on a host-built tensor fails here as it would under NCCL."""
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAMBA_GUARD_COLLECTIVES": "1", **(env or {})}
    return subprocess.Popen([launcher, "--num_gpus", str(ranks), "--master_port", str(_port()), "--module",
                             "train", "--config", str(config)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def _port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(config: Path, env: dict | None = None, ranks: int = 2) -> str:
    proc = launch(config, env, ranks)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def losses(ckpt: Path) -> dict[int, dict]:
    records = {}
    for line in (ckpt / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record  # a resumed run rewrites the steps after its checkpoint
    return records


KEEP = 2  # of the 4 tags an 8-step run saves every 2 steps


@pytest.fixture(scope="module")
def ep2_run(clean_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    out = run(train_config(tmp, clean_run[0], "ep2", keep=KEEP))
    assert f"python -m train export --checkpoint {tmp / 'ep2'}" in out   # the engine says how to export
    return tmp


def export_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", "export", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def ep2_export(ep2_run):
    """The export CLI on the training run's last checkpoint: native and Hugging Face, as the engine suggests."""
    final = ep2_run / "ep2" / "final"
    proc = export_cli("--checkpoint", str(ep2_run / "ep2"), "--native", str(final), "--to-hf", str(final / "hf"))
    assert proc.returncode == 0, proc.stderr
    return final, json.loads(proc.stdout)


def test_loss_decreases_on_pipeline_shards(ep2_run):
    rec = losses(ep2_run / "ep2")
    assert sorted(rec) == list(range(1, STEPS + 1))
    # from ~ln(2048) = 7.62, 8 steps of a cosine-decayed lr learn the token statistics (measured: 7.65 -> 7.18)
    assert rec[STEPS]["loss"] < rec[1]["loss"] - 0.3
    assert rec[2]["loss"] < rec[1]["loss"] and rec[STEPS // 2]["loss"] < rec[2]["loss"]
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in rec.values())
    from model import JambaConfig
    from model.flops import training_flops_per_token

    fpt = training_flops_per_token(JambaConfig.from_yaml(ROOT / "configs/model/jamba-tiny.yaml"), 128)
    for r in rec.values():
        assert r["model_flops_per_s"] == pytest.approx(fpt * r["tokens_per_s"])
        assert r["mfu"] == pytest.approx(r["model_flops_per_s"] / (2 * PEAK_TFLOPS * 1e12))
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
    kill_and_resume(train_config(ep2_run, clean_run[0], "killed"), ep2_run / "killed", ep2_run / "ep2")


def kill_and_resume(config: Path, ckpt: Path, clean_ckpt: Path, ranks: int = 2, env: dict | None = None) -> None:
    """SIGKILL a run after its first checkpoints, rerun it: the resumed losses equal the uninterrupted run's."""
    proc = launch(config, env, ranks, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        latest = ckpt / "latest"
        if latest.exists():   # the first checkpoint is written: kill it while it trains on
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    steps = yaml.safe_load(config.read_text())["steps"]
    assert (ckpt / "latest").read_text().strip() != f"step{steps}", "killed too late"
    out = run(config, env, ranks)
    assert "resumed from" in out
    resumed, clean = losses(ckpt), losses(clean_ckpt)
    assert sorted(resumed) == sorted(clean)
    for step in clean:
        assert abs(resumed[step]["loss"] - clean[step]["loss"]) < 1e-5 * clean[step]["loss"], step


def test_only_keep_checkpoints_remain_and_their_size_is_planned(ep2_run):
    """checkpoint.keep through the launcher, and the plan's disk per checkpoint against the real files."""
    from model import JambaConfig
    from train.checkpoint import directory_bytes, step_tags
    from train.config import load_train_config
    from train.plan import plan_memory

    ckpt = ep2_run / "ep2"
    assert [step for step, _ in step_tags(ckpt)] == [6, 8]
    assert (ckpt / "latest").read_text().strip() == f"step{STEPS}"
    assert (ckpt / "metrics.jsonl").exists() and (ckpt / "tensorboard").is_dir()
    cfg = load_train_config(ep2_run / "ep2.yaml")
    plan = plan_memory(cfg, JambaConfig.from_yaml(cfg.model), world=2)
    measured = directory_bytes(ckpt / f"step{STEPS}")
    print(f"checkpoint on disk: plan {plan.checkpoint_bytes:,} bytes, measured {measured:,} bytes, "
          f"ratio {plan.checkpoint_bytes / measured:.3f}; x keep {KEEP}: {plan.checkpoint_disk:,}")
    assert plan.checkpoint_keep == KEEP and plan.checkpoint_disk == KEEP * plan.checkpoint_bytes
    assert abs(plan.checkpoint_bytes / measured - 1) <= 0.10, (plan.checkpoint_terms, measured)


def test_exported_checkpoint_loads_in_transformers(ep2_export):
    transformers = pytest.importorskip("transformers")
    from model.hf import load_hf, load_native

    final, summary = ep2_export
    assert summary["step"] == STEPS and summary["shards"] == 5   # 4 MoE layers, then the head
    assert (final / "model.safetensors.index.json").exists() and (final / "hf/model.safetensors.index.json").exists()
    ours = load_native(final).eval()
    hf = transformers.JambaForCausalLM.from_pretrained(final / "hf").eval()
    again = load_hf(final / "hf").eval()
    ids = torch.randint(0, ours.cfg.vocab_size, (1, 40))
    with torch.no_grad():
        want = ours(ids).logits
        assert ((hf(ids).logits - want).abs().max() / want.abs().max()).item() < 1e-4
        assert torch.equal(again(ids).logits, want)


def test_export_cli_gathers_experts_by_global_id(ep2_run, ep2_export, tmp_path):
    from model.hf import read_safetensors

    ckpt, tag = ep2_run / "ep2", ep2_run / "ep2" / f"step{STEPS}"
    final, _ = ep2_export
    native, hf = read_safetensors(final), read_safetensors(final / "hf")
    # every tensor the ranks saved is in both exports, unchanged: non-expert weights from the main file,
    # experts stacked (native) or per expert (HF) by the global id in their file name
    main = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    for key, value in main.items():
        assert torch.equal(native[key], value) and torch.equal(hf[key if key == "lm_head.weight" else f"model.{key}"],
                                                               value), key
    moe_layers = [1, 3, 5, 7]  # jamba-tiny: MoE on odd layers
    for m, layer in enumerate(moe_layers):
        for g in range(4):
            saved = torch.load(tag / f"layer_{m}_expert_{g}_mp_rank_00_model_states.pt", weights_only=True)
            gate_up = next(v for k, v in saved.items() if k.endswith(f"experts.{g}.gate_up"))
            down = next(v for k, v in saved.items() if k.endswith(f"experts.{g}.down"))
            assert torch.equal(native[f"layers.{layer}.feed_forward.gate_up"][g], gate_up)
            assert torch.equal(native[f"layers.{layer}.feed_forward.down"][g], down)
            F = gate_up.shape[0] // 2
            assert torch.equal(hf[f"model.layers.{layer}.feed_forward.experts.{g}.up_proj.weight"], gate_up[F:])
            assert torch.equal(hf[f"model.layers.{layer}.feed_forward.experts.{g}.down_proj.weight"], down)
    # global expert 3 of the first MoE layer was EP rank 1's local expert 1: its own file, stacked at 3
    rank1 = torch.load(tag / "layer_0_expert_3_mp_rank_00_model_states.pt", weights_only=True)
    assert list(rank1) == [f"layers.1.feed_forward.deepspeed_moe.experts.deepspeed_experts.3.{n}" for n in ("gate_up", "down")]
    # an older tag exports too, and a checkpoint missing an expert is refused, naming it, writing nothing
    proc = export_cli("--checkpoint", str(ckpt), "--tag", "step6", "--to-hf", str(tmp_path / "hf6"))
    assert proc.returncode == 0 and json.loads(proc.stdout)["step"] == 6, proc.stderr
    broken = tmp_path / "broken"
    shutil.copytree(tag, broken / "t")
    (broken / "t" / "layer_1_expert_2_mp_rank_00_model_states.pt").unlink()
    (broken / "latest").write_text("t")
    proc = export_cli("--checkpoint", str(broken), "--to-hf", str(tmp_path / "x"))
    assert proc.returncode == 2 and "experts [2] are missing" in proc.stderr
    assert not (tmp_path / "x").exists()


# Experts are 89 % of this model's 338 MB (fp32): 4 MoE layers of 16 experts, 75.5 MB each; 36.2 MB else.
EXPERT_HEAVY = {"n_blocks": 1, "layers_per_block": 8, "attn_period": 8, "attn_offset": 4, "expert_period": 2,
                "expert_offset": 1, "n_experts": 16, "top_k": 2, "d_model": 256, "n_heads": 8, "n_kv_heads": 4,
                "ffn_dim": 3072, "vocab_size": 2048, "mamba_d_state": 16}
# The export holds one layer's stacked experts plus the expert file being copied into them (1/16 of a
# layer: 1.06); the rest is room for the allocator, the page granularity of the memory-mapped files and
# library code paged in on first use. Measured: 1.05 (docs/benchmarks.md).
LAYER_FACTOR = 1.25
# A rank's start-up: its shard, plus one tensor being read (<= 6 MiB here) and allocator slack
STARTUP_SLACK = 64 * 2**20


@pytest.fixture(scope="module")
def heavy_run(clean_run, tmp_path_factory):
    """One step, 2 ranks, ep 2, of a model whose experts are 95 % of its 627 MiB (fp32), started from a
    native checkpoint (``init_from``): what the start-up and export memory tests measure."""
    from model import Jamba, JambaConfig
    from model.hf import save_native

    tmp = tmp_path_factory.mktemp("heavy")
    (tmp / "model.yaml").write_text(yaml.safe_dump(EXPERT_HEAVY))
    torch.manual_seed(1)
    save_native(Jamba(JambaConfig.from_dict(EXPERT_HEAVY)), tmp / "start")
    config = train_config(tmp, clean_run[0], "heavy", model=str(tmp / "model.yaml"), steps=1, seq_len=64,
                          micro_batch=1, grad_accum=1)
    data = yaml.safe_load(config.read_text())
    data["init_from"] = str(tmp / "start")
    config.write_text(yaml.safe_dump(data))
    return tmp, run(config)


def _heavy_bytes() -> tuple[int, int]:
    from model import JambaConfig
    from model.params import count_parameters

    counts = count_parameters(JambaConfig.from_dict(EXPERT_HEAVY))
    return 4 * counts["total"], 4 * counts["part_moe_experts"]


def test_ranks_hold_only_their_shard_at_start(heavy_run):
    """Each rank's host memory for the model at start is its own shard (non-expert weights + half the
    experts) plus one tensor, not the model; what it trained from is the checkpoint, expert ids included."""
    tmp, out = heavy_run
    assert "collective device guard on" in out
    whole, experts = _heavy_bytes()
    assert experts > 0.9 * whole
    shard = whole - experts // 2
    for rank in (0, 1):
        startup = json.loads((tmp / "heavy" / "startup" / f"rank{rank}.json").read_text())
        assert startup["local_parameter_bytes"] == shard, (startup, shard)
        peak = startup["host_peak_above_baseline_bytes"]
        print(f"rank {rank}: host peak {peak / 2**20:.0f} MiB, own shard {shard / 2**20:.0f} MiB, "
              f"model {whole / 2**20:.0f} MiB")
        assert peak <= shard + STARTUP_SLACK, (peak, shard)
        assert peak < 0.7 * whole
    # one Adam step from the checkpoint moves each weight by at most about lr (1.5e-3 at step 1 of the
    # warm-up); a tensor read from the wrong key or expert would be off by the init scale (0.02)
    from safetensors.torch import load_file

    export = export_cli("--checkpoint", str(tmp / "heavy"), "--native", str(tmp / "trained"))
    assert export.returncode == 0, export.stderr
    start, trained = load_file(tmp / "start" / "model.safetensors"), {}
    for shard_file in (tmp / "trained").glob("*.safetensors"):
        trained.update(load_file(shard_file))
    assert set(trained) == set(start)
    moved = {k: float((trained[k] - start[k]).abs().max()) for k in start}
    assert max(moved.values()) < 2e-3, max(moved.items(), key=lambda kv: kv[1])
    assert moved["layers.1.feed_forward.gate_up"] > 0     # and it did train


def test_export_peak_memory_is_one_moe_layer_not_the_model(heavy_run):
    """The DeepSpeed checkpoint of the heavy run exported with large allocations mmap-ed, so that freed
    tensors leave the resident set: the export's high-water mark above its baseline is the non-expert
    weights plus about one MoE layer's experts."""
    tmp, _ = heavy_run
    from model import JambaConfig
    from model.params import count_parameters

    counts = count_parameters(JambaConfig.from_dict(EXPERT_HEAVY))
    model_bytes, expert_bytes = _heavy_bytes()
    non_expert, layer = model_bytes - expert_bytes, expert_bytes // 4
    assert expert_bytes >= 0.8 * model_bytes and model_bytes >= 300e6
    proc = export_cli("--checkpoint", str(tmp / "heavy"), "--native", str(tmp / "native"),
                      "--to-hf", str(tmp / "hf"), env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["non_expert_bytes"] == non_expert and summary["expert_bytes_per_layer"] == layer
    peak = summary["peak_rss_bytes"] - summary["rss_baseline_bytes"]
    bound = non_expert + LAYER_FACTOR * layer
    mb = 1e6
    print(f"export peak RSS above baseline {peak / mb:.1f} MB (baseline {summary['rss_baseline_bytes'] / mb:.1f} "
          f"MB); non-expert {non_expert / mb:.1f} MB + one MoE layer {layer / mb:.1f} MB = "
          f"{(non_expert + layer) / mb:.1f} MB; bound {bound / mb:.1f} MB; model {model_bytes / mb:.1f} MB")
    assert peak <= bound
    assert peak <= 0.5 * model_bytes
    assert summary["parameters"] == counts["total"] and summary["shards"] == 5


@pytest.mark.parametrize("dtype", ["bf16"])
def test_expert_parallel_equals_none_at_world_4_with_zero2(clean_run, tmp_path, dtype):
    """4 ranks with ZeRO-2: ep 2 (expert-data-parallel groups of 2 reduce the expert gradients) against
    ep 1 (every rank holds every expert, reduced over all 4): the same losses and gradient norms. In bf16
    with fp32 reduction, which runs ZeRO-2's expert reduction as fp32 does; exact fp32 parity at world 4
    (every parameter's gradient) is test_context_parallel_2_by_expert_parallel_2_on_4_ranks_equals_one_rank."""
    runs = {}
    for ep in (2, 1):
        name = f"w4-ep{ep}-{dtype}"
        run(train_config(tmp_path, clean_run[0], name, steps=4, seq_len=64, micro_batch=1, ep_size=ep,
                         zero_stage=2, dtype=dtype), ranks=4)
        runs[ep] = losses(tmp_path / name)
    # measured: identical in fp32; in bf16 (fp32 reduction) 1e-5 relative in loss, 1e-4 in gradient norm
    loss_tol, norm_tol = (1e-6, 1e-5) if dtype == "fp32" else (2e-4, 2e-3)
    for step in range(1, 5):
        a, b = runs[2][step], runs[1][step]
        print(dtype, step, a["loss"], b["loss"], a["grad_norm"], b["grad_norm"])
        assert abs(a["loss"] - b["loss"]) < loss_tol * abs(b["loss"]), (step, a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) < norm_tol * b["grad_norm"], (step, a, b)
    assert runs[2][4]["loss"] < runs[2][1]["loss"]
    startup = json.loads((tmp_path / f"w4-ep2-{dtype}" / "startup" / "rank3.json").read_text())
    assert startup["gradient_reduction"] == {"accumulate": "float32", "communicate": "float32"}


@pytest.mark.parametrize(("vocab", "variant"), [
    (16384, {"zero_stage": 1}),   # a model vocabulary larger than the shards' tokenizer: logits weigh
    (2048, {"zero_stage": 2, "activation_checkpointing": True, "loss_chunk_tokens": 512}),
])
def test_memory_plan_within_25_percent_of_measured_peak(clean_run, tmp_path, vocab, variant):
    """Peak resident memory above the pre-model baseline, per rank, against the plan (no framework term).
    Large allocations are mmap-ed so that freed tensors leave the resident set, as CUDA's allocator
    statistics would show them."""
    from model import JambaConfig
    from train.config import load_train_config
    from train.plan import plan_memory

    model = yaml.safe_load((ROOT / "configs/model/jamba-demo.yaml").read_text())
    model["vocab_size"] = vocab
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(model))
    config = train_config(tmp_path, clean_run[0], "mem", model=str(tmp_path / "model.yaml"), steps=2,
                          seq_len=256, micro_batch=8, grad_accum=1, **variant)
    run(config, env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    measured = max(r["peak_mem_bytes"] for r in losses(tmp_path / "mem").values())
    cfg = load_train_config(config)
    plan = plan_memory(cfg, JambaConfig.from_yaml(cfg.model), world=2, expert_imbalance=1.0)
    print(f"memory plan {plan.total / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB, "
          f"ratio {plan.total / measured:.3f}")
    assert abs(plan.total / measured - 1) <= 0.25, (plan.summary(), measured)


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


# ---------------------------------------------------------------------------------------- context parallelism
CP_STEPS = 4


def _dumped_gradients(ckpt: Path, ranks: int) -> dict[str, torch.Tensor]:
    """Every rank's dumped first-step gradients, one entry per parameter (replicated ones must agree)."""
    merged: dict[str, torch.Tensor] = {}
    for r in range(ranks):
        for name, grad in torch.load(ckpt / "grads" / f"rank{r}.pt").items():
            if name in merged:
                assert torch.equal(merged[name], grad), f"rank {r} holds a different gradient for {name}"
            merged[name] = grad
    return merged


def _cp_run(tmp: Path, run_dir: Path, name: str, ranks: int, **parallel) -> Path:
    config = train_config(tmp, run_dir, name, steps=CP_STEPS, seq_len=128, zero_stage=0, micro_batch=1,
                          **{"grad_accum": 1, **parallel})
    run(config, {"JAMBA_DUMP_GRADIENTS": str(tmp / name / "grads")}, ranks=ranks)
    return tmp / name


@pytest.fixture(scope="module")
def cp_runs(clean_run, tmp_path_factory):
    """One rank with 2 accumulation steps of one sample; cp 2 on 2 ranks, the same (each sample split in
    two); cp 2 x ep 2 x dp 2 on 4 ranks, whose two replicas take the one rank's two micro-steps' samples."""
    tmp = tmp_path_factory.mktemp("cp")
    run_dir = clean_run[0]
    return {"cp1": _cp_run(tmp, run_dir, "cp1", 1, ep_size=1, grad_accum=2),
            "cp2": _cp_run(tmp, run_dir, "cp2", 2, ep_size=1, cp_size=2, grad_accum=2),
            "cp2-ep2": _cp_run(tmp, run_dir, "cp2-ep2", 4, ep_size=2, cp_size=2)}


def _assert_same_training(got: Path, want: Path, got_ranks: int) -> None:
    a, b = losses(got), losses(want)
    assert sorted(a) == sorted(b) == list(range(1, CP_STEPS + 1))
    for step in b:   # (ZeRO-0 in fp32: DeepSpeed clips without keeping a norm, so grad_norm is None)
        assert a[step]["grad_norm"] is None and b[step]["grad_norm"] is None
        assert abs(a[step]["loss"] - b[step]["loss"]) < 1e-5 * b[step]["loss"], (step, a[step], b[step])
    ga, gb = _dumped_gradients(got, got_ranks), _dumped_gradients(want, 1)
    assert sorted(ga) == sorted(gb)
    worst = max(float((ga[n] - gb[n]).abs().max() / gb[n].abs().max().clamp_min(1e-30)) for n in gb)
    print(f"{got.name} vs {want.name}: worst per-parameter relative gradient difference {worst:.2e}")
    assert all(gb[n].abs().max() > 0 for n in gb), "a parameter without gradient cannot show parity"
    assert worst < 1e-4


def test_context_parallel_2_equals_one_rank(cp_runs, clean_run):
    """The same losses and every parameter's gradient; the run's packed samples have documents crossing
    the cut at seq_len / 2 (checked on the loader's samples), and tokens/s counts the replica's tokens."""
    from model import JambaConfig
    from model.flops import training_flops_per_token
    from train.data import MixtureSampler, RankLoader, load_streams

    _assert_same_training(cp_runs["cp2"], cp_runs["cp1"], 2)
    streams, tokenizer = load_streams([clean_run[0]], 2048)
    loader = RankLoader(MixtureSampler(streams, None, 128, 3), 1, 0, 1, tokenizer["eos_id"])
    segments = [loader.next_batch().segment[0] for _ in range(2 * CP_STEPS)]
    assert any(seg[63] == seg[64] for seg in segments)         # a document runs across the two ranks
    assert any(seg[0] != seg[-1] for seg in segments)          # and samples hold several documents
    fpt = training_flops_per_token(JambaConfig.from_yaml(ROOT / "configs/model/jamba-tiny.yaml"), 128)
    for r in losses(cp_runs["cp2"]).values():
        assert r["tokens_per_s"] == pytest.approx(2 * 128 / r["step_s"])    # one replica, 2 x 128 tokens a step
        assert r["mfu"] == pytest.approx(fpt * r["tokens_per_s"] / (2 * PEAK_TFLOPS * 1e12))


def test_context_parallel_2_by_expert_parallel_2_on_4_ranks_equals_one_rank(cp_runs):
    """cp 2 x ep 2 x dp 2: the two replicas' samples are the one rank's two accumulation steps."""
    _assert_same_training(cp_runs["cp2-ep2"], cp_runs["cp1"], 4)


def test_context_parallel_kill_and_resume_equals_uninterrupted(cp_runs, clean_run, tmp_path):
    config = train_config(tmp_path, clean_run[0], "cp2-killed", steps=CP_STEPS, seq_len=128, zero_stage=0,
                          micro_batch=1, grad_accum=2, ep_size=1, cp_size=2)
    kill_and_resume(config, tmp_path / "cp2-killed", cp_runs["cp2"])
