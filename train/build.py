"""This rank's model: built on the meta device, sharded for expert parallelism, then only this rank's
parameters materialised, directly in the training dtype on the training device.

The whole released model is 52B parameters (206 GB in fp32); built on every rank's host it would need
8 × that per node. Here nothing is allocated until the model holds only the non-expert weights and this
rank's ``n_experts / ep_size`` experts per MoE layer; then each parameter is filled either by the keyed
initialisation of ``model/init.py`` (the value depends only on the seed and the parameter's name and global
expert id, so every expert-parallel layout trains the same model) or, with ``init_from``, from the
checkpoint, one tensor (one expert) at a time, memory-mapped. Peak host memory on a CPU rank is therefore
this rank's shard plus one tensor; on a GPU rank, one tensor of the checkpoint read through the host.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from model import Jamba, JambaConfig
from model.init import expert_key, init_parameters_, init_tensor_


def _expert_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, str, int]]:
    """(name, parameter, stacked key, global expert id) of every expert-parallel shard's parameters."""
    for i, layer in enumerate(model.layers):
        ff = layer.feed_forward
        if not hasattr(ff, "local_experts"):
            continue
        lo = ff.ep_rank * ff.num_local_experts
        for local, expert in enumerate(ff.local_experts()):
            for leaf in ("gate_up", "down"):
                name = f"layers.{i}.feed_forward.deepspeed_moe.experts.deepspeed_experts.{local}.{leaf}"
                yield name, getattr(expert, leaf), f"layers.{i}.feed_forward.{leaf}", lo + local


def _non_expert_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, param in model.named_parameters():
        if ".deepspeed_moe." not in name:
            yield name, param


def canonical_parameter_names(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, parameter) with names that do not depend on the parallel layout: non-expert parameters by
    their own name, this rank's experts as ``layers.<i>.feed_forward.<leaf>[<global expert>]``."""
    yield from _non_expert_parameters(model)
    for _, param, stacked, expert in _expert_parameters(model):
        yield f"{stacked}[{expert}]", param


@torch.no_grad()
def initialise_(model: nn.Module, cfg: JambaConfig, seed: int) -> None:
    """Keyed initialisation of a materialised, possibly expert-sharded model."""
    left = set(init_parameters_(model, seed, cfg.init_std))
    for name, param, stacked, expert in _expert_parameters(model):
        init_tensor_(param, seed, expert_key(stacked, expert), "normal", cfg.init_std)
        left.discard(name)
    if left:
        raise RuntimeError(f"no initialisation for {sorted(left)[0]}")


@torch.no_grad()
def load_rank_tensors_(model: nn.Module, source) -> int:
    """Fill this rank's parameters from a ``CheckpointTensors`` (native or HF) by key; returns the bytes read."""
    directory = source.directory
    read = 0

    def copy(param: torch.Tensor, value: torch.Tensor, what: str) -> None:
        nonlocal read
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"init_from: {directory}: {what}: shape {tuple(value.shape)} != {tuple(param.shape)}")
        param.copy_(value)
        read += value.numel() * value.element_size()

    for name, param in _non_expert_parameters(model):
        copy(param, source.get(name), name)
    for _, param, stacked, expert in _expert_parameters(model):
        copy(param, source.get(stacked, expert), f"{stacked}[{expert}]")
    return read


def local_parameter_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def build_rank_model(model_cfg: JambaConfig, ep_size: int, device: torch.device, dtype: torch.dtype, seed: int,
                     init_from: str | None = None) -> Jamba:
    """The model this rank trains (``torch.distributed`` initialised): see the module docstring."""
    from train.expert_parallel import apply_expert_parallel

    source = None
    if init_from:
        from model.lazy_checkpoint import CheckpointTensors

        source = CheckpointTensors(init_from)  # headers read once: the config check and the loads use them
        if source.config.to_dict() != model_cfg.to_dict():
            raise ValueError(f"init_from: {init_from} has a different model config than the run's model")
    with torch.device("meta"):
        model = Jamba(model_cfg)
    apply_expert_parallel(model, ep_size)      # drops the other ranks' experts while still on meta
    model.to(dtype)
    model.to_empty(device=device)
    for layer in model.layers:
        if hasattr(layer.feed_forward, "local_experts"):
            for expert in layer.feed_forward.local_experts():
                expert.tag_parameters()
    if model_cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    if source is not None:
        load_rank_tensors_(model, source)
    else:
        initialise_(model, model_cfg, seed)
    return model
