"""Weight initialisation keyed by name: each parameter, and each expert of a stacked MoE tensor, draws from
its own generator seeded by ``(seed, name[, expert])``.

Why keyed: a rank that materialises only its own parameters (a model built on the meta device, experts
sharded by expert parallelism) must get exactly the values that parameter has in the single-process model,
whatever else exists, in whichever order it is built. A shared generator would make every value depend on
all the tensors drawn before it.

The distributions are Jamba's (as mamba-ssm and Hugging Face initialise it): normal(0, ``init_std``) for
matrices and embeddings, zero biases, unit norms, ``A_log = log(1..d_state)`` per channel, ``D = 1``, and
the dt bias such that ``softplus(bias)`` is log-uniform in [1e-3, 1e-1]. Values are drawn in float32 on the
tensor's device and then cast, so a bf16 tensor holds the rounded float32 draw (a CUDA generator draws
different values than a CPU one; each is reproducible).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

DT_MIN, DT_MAX = 1e-3, 1e-1


def keyed_seed(seed: int, key: str) -> int:
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _draw(tensor: torch.Tensor, seed: int, key: str, kind: str, std: float) -> torch.Tensor:
    """The float32 values of ``tensor`` under rule ``kind``."""
    device = tensor.device
    if kind == "zeros":
        return torch.zeros(tensor.shape, dtype=torch.float32, device=device)
    if kind == "ones":
        return torch.ones(tensor.shape, dtype=torch.float32, device=device)
    if kind == "A_log":  # [d_inner, d_state]: log(1..n) in every channel (S4D-real)
        n = tensor.shape[-1]
        return torch.log(torch.arange(1, n + 1, dtype=torch.float32, device=device)).expand(tensor.shape).clone()
    generator = torch.Generator(device=device).manual_seed(keyed_seed(seed, key))
    if kind == "normal":
        return torch.randn(tensor.shape, dtype=torch.float32, device=device, generator=generator) * std
    if kind == "dt_bias":  # inverse softplus of a log-uniform step size
        u = torch.rand(tensor.shape, dtype=torch.float32, device=device, generator=generator)
        dt = torch.exp(u * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN))
        return dt + torch.log(-torch.expm1(-dt))
    raise ValueError(f"unknown init rule {kind!r}")


@torch.no_grad()
def init_tensor_(tensor: torch.Tensor, seed: int, key: str, kind: str, std: float) -> None:
    tensor.copy_(_draw(tensor, seed, key, kind, std))


def expert_key(stacked_name: str, expert: int) -> str:
    """The key of global expert ``expert`` of the stacked parameter ``layers.{i}.feed_forward.gate_up``."""
    return f"{stacked_name}#{expert}"


def _rule(module: nn.Module, leaf: str, name: str) -> str | None:
    from model.layers.mamba import MambaMixer
    from model.layers.norm import RMSNorm

    if isinstance(module, MambaMixer):
        return {"A_log": "A_log", "D": "ones"}.get(leaf)
    if isinstance(module, RMSNorm):
        return "ones"
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Embedding)):
        if leaf == "bias":
            return "dt_bias" if name.endswith("dt_proj.bias") else "zeros"
        return "normal"
    return None


@torch.no_grad()
def init_parameters_(model: nn.Module, seed: int, std: float) -> list[str]:
    """Initialise every parameter of ``model`` that this module knows (Jamba's own layers, including the
    stacked experts of ``MoE``, expert by expert). Returns the names of the parameters left untouched, for
    callers that hold other modules (the trainer's expert-parallel shards)."""
    from model.layers.feedforward import MoE

    left = []
    seen: set[int] = set()  # tied parameters are initialised once
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for leaf, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = prefix + leaf
            if isinstance(module, MoE) and leaf in ("gate_up", "down"):
                for e in range(param.shape[0]):
                    init_tensor_(param[e], seed, expert_key(name, e), "normal", std)
                continue
            kind = _rule(module, leaf, name)
            if kind is None:
                left.append(name)
            else:
                init_tensor_(param, seed, name, kind, std)
    return left
