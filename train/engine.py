"""The training loop: DeepSpeed (ZeRO 1/2, bf16, clipping, accumulation) + Jamba's expert and context
parallelism.

Launch: ``deepspeed [--num_gpus N | --hostfile F] --module train --config configs/train/X.yaml`` or
``python -m train --config X`` for one process. On CPU, DeepSpeed's CPU accelerator with gloo.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from train.config import TrainConfig

NO_DECAY = ("norm", "bias", "A_log", ".D", "embed_tokens")


def lr_at(step: int, cfg: TrainConfig) -> float:
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    total = max(1, cfg.steps - o.warmup_steps)
    done = step - o.warmup_steps
    if o.schedule == "cosine":
        return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * min(1.0, done / total)))
    decay_steps = max(1, int(total * o.decay_fraction))   # warmup-stable-decay: linear decay at the end
    stable = total - decay_steps
    if done < stable:
        return o.lr
    return o.lr - (o.lr - o.min_lr) * min(1.0, (done - stable) / decay_steps)


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """DeepSpeed's config: the optional ``parallel.deepspeed`` JSON (ZeRO buckets, overlap, ...) under the
    keys the YAML owns (checked to agree when loading)."""
    from train.plan import load_deepspeed_extra

    p = cfg.parallel
    ds = load_deepspeed_extra(p.deepspeed)
    ds.update({
        "train_micro_batch_size_per_gpu": p.micro_batch,
        "gradient_accumulation_steps": p.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {**ds.get("bf16", {}), "enabled": p.dtype == "bf16"},
        "steps_per_print": 1 << 30,
    })
    ds["zero_optimization"] = {**ds.get("zero_optimization", {}), "stage": p.zero_stage}
    if p.dtype == "bf16":
        # Gradients accumulate over the micro-steps and are reduced over up to world ranks; in bf16 (8 bits
        # of mantissa) both lose the small contributions, so by default both run in fp32 (docs/training.md).
        ds["communication_data_type"] = p.grad_reduce_dtype
        ds["data_types"] = {**ds.get("data_types", {}), "grad_accum_dtype": p.grad_reduce_dtype}
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if any(tag in name for tag in NO_DECAY) else decay).append(p)
    return [{"name": "decay", "params": decay, "weight_decay": weight_decay},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]


def peak_flops_per_device(cfg: TrainConfig) -> float | None:
    """``log.peak_tflops`` if set, else the known dense bf16 peak of this CUDA device, else None."""
    from model.flops import device_peak_flops

    if cfg.log.peak_tflops:
        return cfg.log.peak_tflops * 1e12
    if torch.cuda.is_available():
        return device_peak_flops(torch.cuda.get_device_name())
    return None


class PeakMemory:
    """Peak memory of this rank: CUDA's allocator peak, or on CPU the resident-set high-water mark above
    the baseline taken when the object is made (before the model exists)."""

    def __init__(self) -> None:
        self.baseline = 0 if torch.cuda.is_available() else _vm_hwm()

    def peak(self) -> int:
        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated()
        return max(0, _vm_hwm() - self.baseline)


def _vm_hwm() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mamba_kernels_will_run(cfg: TrainConfig, cuda: bool) -> bool:
    """Whether the Mamba layers of this run take mamba-ssm's kernels: on CUDA, with the kernels importable,
    and without document resets (``pack: boundaries`` passes segment ids, which only the pure path
    honours; ``model/scan.py::use_kernels`` decides the same way)."""
    from model.scan import kernels

    return cuda and cfg.data.pack != "boundaries" and kernels() is not None


def check_memory_plan(cfg: TrainConfig, model_cfg, world: int):
    """On CUDA, the memory plan against this GPU; a plan that does not fit stops the run before it starts."""
    from train.plan import DEFAULT_OVERHEAD_CUDA, load_deepspeed_extra, plan_memory

    if not torch.cuda.is_available():
        return None
    capacity = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    plan = plan_memory(cfg, model_cfg, world, capacity, DEFAULT_OVERHEAD_CUDA, cfg.parallel.expert_imbalance,
                       kernels=mamba_kernels_will_run(cfg, cuda=True),
                       deepspeed_extra=load_deepspeed_extra(cfg.parallel.deepspeed))
    if not plan.fits and cfg.parallel.memory_check:
        raise ValueError("the memory plan does not fit this GPU (set parallel.memory_check: false to try "
                         "anyway):\n" + plan.summary())
    return plan


def expert_load(counts: list[torch.Tensor]) -> dict[str, Any]:
    """Tokens per expert in each MoE layer (this rank's tokens): min, max and coefficient of variation."""
    if not counts:
        return {}
    stacked = torch.stack([c.float() for c in counts])            # [moe layers, E]
    mean = stacked.mean(1, keepdim=True).clamp_min(1e-9)
    cv = (stacked.std(1, unbiased=False, keepdim=True) / mean).squeeze(1)
    return {"expert_load_min": float(stacked.min()), "expert_load_max": float(stacked.max()),
            "expert_load_cv_mean": float(cv.mean()), "expert_load_cv_max": float(cv.max()),
            "expert_load_per_layer": [{"min": int(row.min()), "max": int(row.max()), "cv": round(float(c), 4)}
                                      for row, c in zip(stacked, cv)]}


class TensorBoard:
    """Scalars to ``checkpoint.dir/tensorboard`` on rank 0, when the tensorboard package is installed."""

    def __init__(self, directory: Path, enabled: bool):
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(directory))
            except ImportError:
                pass

    def write(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                self.writer.add_scalar(f"train/{key}", value, record["step"])
        for i, layer in enumerate(record.get("expert_load_per_layer", [])):
            self.writer.add_scalar(f"experts/layer{i}_cv", layer["cv"], record["step"])
        self.writer.flush()


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


GRADIENT_DUMP_ENV = "JAMBA_DUMP_GRADIENTS"


def _gradient_dump(cfg: TrainConfig, rank: int):
    """With ``JAMBA_DUMP_GRADIENTS=DIR``: after the first step's last backward (gradients accumulated and
    reduced), each rank saves ``DIR/rank<r>.pt``, {parameter: gradient} under layout-independent names
    (expert parameters as ``layers.<i>.feed_forward.<gate_up|down>[<global expert>]``), so that parity
    checks can compare every gradient between parallel layouts. Needs ZeRO stage 0, where each parameter's
    ``.grad`` then holds the step's gradient (ZeRO 1/2 move it into flat partitions)."""
    directory = os.environ.get(GRADIENT_DUMP_ENV)
    if not directory:
        return None
    if cfg.parallel.zero_stage != 0:
        raise ValueError(f"{GRADIENT_DUMP_ENV}: needs parallel.zero_stage 0")

    def dump(module: torch.nn.Module) -> None:
        from train.build import canonical_parameter_names

        grads = {name: p.grad.detach().float().cpu().clone() for name, p in canonical_parameter_names(module)
                 if p.grad is not None}
        Path(directory).mkdir(parents=True, exist_ok=True)
        torch.save(grads, Path(directory) / f"rank{rank}.pt")

    return dump


def train(cfg: TrainConfig, log=print) -> dict[str, Any]:
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from model import JambaConfig
    from model.flops import training_flops_per_token
    from train import device_guard
    from train.build import build_rank_model, local_parameter_bytes
    from train.checkpoint import prune_checkpoints, read_latest
    from train.context_parallel import (
        apply_context_parallel,
        check_layout,
        make_groups,
        replica_losses,
        sequence_expert_counts,
    )
    from train.data import MixtureSampler, RankLoader, SamplerState, load_streams

    if torch.cuda.is_available():  # this rank's GPU, before any communicator or tensor is made
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    guard = device_guard.enabled()
    if guard:  # before DeepSpeed captures the collectives it calls
        device_guard.install(torch.device(get_accelerator().current_device_name()))
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else None)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if cfg.parallel.ep_size > world or world % cfg.parallel.ep_size:
        raise ValueError(f"parallel.ep_size: {cfg.parallel.ep_size} must divide the world size {world}")
    model_cfg = JambaConfig.from_yaml(cfg.model)
    if model_cfg.n_experts % cfg.parallel.ep_size:
        raise ValueError(f"parallel.ep_size: {cfg.parallel.ep_size} does not divide n_experts {model_cfg.n_experts}")
    check_layout(cfg.parallel.cp_size, world, cfg.data.seq_len, model_cfg)
    cp = make_groups(cfg.parallel.cp_size)      # rank = dp_rank * cp + cp_rank
    dp, dp_rank = world // cp.size, rank // cp.size
    streams, tokenizer = load_streams(cfg.data.runs, model_cfg.vocab_size, cfg.data.weights)
    if cfg.init_from and not (Path(cfg.init_from) / "config.json").exists():
        raise ValueError(f"init_from: {cfg.init_from} is not a checkpoint directory (no config.json)")
    plan = check_memory_plan(cfg, model_cfg, world)
    if plan is not None and rank == 0:
        log(plan.summary())

    # This rank's parameters only, in the training dtype, on its device (train/build.py).
    device = torch.device(get_accelerator().current_device_name())
    baseline = _vm_hwm()
    memory = PeakMemory()
    resuming = (Path(cfg.checkpoint.dir) / "latest").exists()
    model = build_rank_model(model_cfg, cfg.parallel.ep_size, device,
                             torch.bfloat16 if cfg.parallel.dtype == "bf16" else torch.float32, cfg.seed,
                             init_from=None if resuming else cfg.init_from)
    startup = {"rank": rank, "device": str(device), "local_parameter_bytes": local_parameter_bytes(model),
               "host_peak_above_baseline_bytes": max(0, _vm_hwm() - baseline),
               "init_from": None if resuming else cfg.init_from}
    apply_context_parallel(model, cp)
    model.activation_checkpointing = cfg.parallel.activation_checkpointing
    groups = split_params_into_different_moe_groups_for_optimizer(param_groups(model, cfg.optim.weight_decay))
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   config=deepspeed_config(cfg), dist_init_required=False)
    startup["gradient_reduction"] = {"accumulate": str(engine.get_data_types()[1]).removeprefix("torch."),
                                     "communicate": str(engine.communication_data_type).removeprefix("torch.")}
    if guard and rank == 0:
        log(f"collective device guard on ({device_guard.ENV}): every collective's tensors must be on {device}")

    sampler = MixtureSampler(streams, cfg.data.weights, cfg.data.seq_len, cfg.data.seed)
    loader = RankLoader(sampler, cfg.parallel.micro_batch, dp_rank, dp, tokenizer["eos_id"], cfg.data.pack,
                        cp.rank, cp.size)
    ckpt_dir = Path(cfg.checkpoint.dir)
    start = 0
    if (ckpt_dir / "latest").exists():
        _, client = engine.load_checkpoint(str(ckpt_dir))
        start = client["step"]
        sampler.state = SamplerState(**client["sampler"])
        log(f"resumed from {ckpt_dir} at step {start}") if rank == 0 else None

    assert engine.device == device, (engine.device, device)
    fpt = training_flops_per_token(model_cfg, cfg.data.seq_len)
    peak = peak_flops_per_device(cfg)
    tokens_per_step = cfg.data.seq_len * cfg.parallel.micro_batch * cfg.parallel.grad_accum * dp
    dump = _gradient_dump(cfg, rank)
    metrics_path = ckpt_dir / "metrics.jsonl"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / "startup").mkdir(exist_ok=True)
    (ckpt_dir / "startup" / f"rank{rank}.json").write_text(json.dumps(startup) + "\n")
    history = []
    board = TensorBoard(ckpt_dir / "tensorboard", cfg.log.tensorboard and rank == 0)
    with device_guard.track_host_tensors() if guard else contextlib.nullcontext():
        for step in range(start, cfg.steps):
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            started = time.perf_counter()
            losses, auxes, counts = [], [], None
            for micro in range(cfg.parallel.grad_accum):
                batch = loader.next_batch()
                ids = torch.from_numpy(batch.input_ids).to(device)
                targets = torch.from_numpy(batch.targets).to(device)
                segment = torch.from_numpy(batch.segment).to(device) if cfg.data.pack == "boundaries" else None
                # DeepSpeed holds the parameters in bf16 when bf16 is enabled (fp32 master copies in the optimizer)
                out = engine(ids, segment=segment, output_router_logits=True, targets=targets,
                             loss_chunk=cfg.parallel.loss_chunk_tokens, loss_reduction="sum")
                # the losses of the whole sequences, equal on the cp ranks that share them (cp 1: this rank's)
                lm, aux, z = replica_losses(out, targets, model_cfg.n_experts, model_cfg.top_k, cp,
                                            z_loss=model_cfg.router_z_loss_coef > 0)
                loss = lm
                if aux is not None:
                    loss = loss + model_cfg.router_aux_loss_coef * aux
                    auxes.append(float(aux))
                if z is not None:
                    loss = loss + model_cfg.router_z_loss_coef * z
                engine.backward(loss)
                if dump is not None and micro == cfg.parallel.grad_accum - 1:
                    dump(engine.module)
                    dump = None
                engine.step()
                losses.append(float(lm))
                counts = out.expert_counts
            elapsed = time.perf_counter() - started
            counts = sequence_expert_counts(counts, cp)   # the last micro-batch's, over the whole sequences
            # on the engine's device: NCCL has no CPU tensors (train/device_guard.py checks this on CPU ranks);
            # the cp ranks of a replica hold the same (replica) loss, so the mean over all ranks is over replicas
            mean_loss = torch.tensor(sum(losses) / len(losses), device=device)
            torch.distributed.all_reduce(mean_loss)
            record = {"step": step + 1, "loss": float(mean_loss) / world, "lr": lr,
                      # None where DeepSpeed computes none (ZeRO-0 in fp32 clips without keeping the norm)
                      "grad_norm": _optional_float(engine.get_global_grad_norm()),
                      "tokens_per_s": tokens_per_step / elapsed, "step_s": elapsed,
                      "aux_loss": sum(auxes) / len(auxes) if auxes else None, **expert_load(counts or [])}
            record["model_flops_per_s"] = fpt * record["tokens_per_s"]
            record["mfu"] = record["model_flops_per_s"] / (world * peak) if peak else None
            record["peak_mem_bytes"] = memory.peak()
            history.append(record)
            if rank == 0:
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
                board.write(record)
                if (step + 1) % cfg.log.every == 0:
                    eta = (cfg.steps - step - 1) * elapsed
                    log(f"step {step + 1}/{cfg.steps} loss {record['loss']:.4f} lr {lr:.2e} "
                        + (f"gnorm {record['grad_norm']:.3f} " if record["grad_norm"] is not None else "")
                        + f"{record['tokens_per_s']:.0f} tok/s "
                        + (f"mfu {100 * record['mfu']:.1f}% " if record["mfu"] is not None else "")
                        + f"mem {record['peak_mem_bytes'] / 2**30:.2f}GiB "
                        f"experts cv {record.get('expert_load_cv_mean', 0):.2f} eta {eta:.0f}s")
            if (step + 1) % cfg.checkpoint.every == 0 or step + 1 == cfg.steps:  # the last step is always saved
                engine.save_checkpoint(str(ckpt_dir), tag=f"step{step + 1}",
                                       client_state={"step": step + 1, "sampler": asdict(sampler.state),
                                                     "model_config": asdict(model_cfg)})
                # every rank's files of the new tag are written (and `latest` names it) before any tag is deleted
                torch.distributed.barrier()
                if rank == 0:
                    for removed in prune_checkpoints(ckpt_dir, cfg.checkpoint.keep):
                        log(f"removed checkpoint {removed} (checkpoint.keep: {cfg.checkpoint.keep})")
    # No export here: gathering every expert onto the ranks and building the model on the host does not scale
    # (train/export.py streams the DeepSpeed checkpoint instead, one MoE layer at a time, in its own process).
    if rank == 0:
        log(f"checkpoint {ckpt_dir / (read_latest(ckpt_dir) or '?')}; export it with: python -m train export "
            f"--checkpoint {ckpt_dir} --native {ckpt_dir / 'final'} --to-hf {ckpt_dir / 'final' / 'hf'}")
    return {"history": history, "rank": rank, "world": world}

