"""Feed-forward layers: the dense SwiGLU MLP, and Jamba's mixture of experts.

MoE semantics (Jamba / Hugging Face): router logits -> softmax in float32 -> top-k; the k weights are
*not* renormalised; every token goes to its k experts (no capacity, no dropping, no sampling). Token slots
are sorted by expert; each projection is one grouped GEMM over them (``F.grouped_mm``) where torch has one
for the device and dtype, else one matmul per expert over its contiguous slice. The load-balancing loss is
Hugging Face's (``E * sum_e f_e * P_e`` over all MoE layers; 2.0 for balanced top-2); an optional router
z-loss is available. Per-expert token counts are returned for metrics.

Expert weights are stored stacked (``gate_up [E, 2F, d]``, ``down [E, d, F]``) so that an expert-parallel
trainer can shard dimension 0 across ranks; ``experts_forward`` is the piece it replaces with all-to-all
dispatch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.config import JambaConfig


class MLP(nn.Module):
    def __init__(self, cfg: JambaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)), None


@dataclass
class RouterOutput:
    logits: torch.Tensor          # [tokens, E], model dtype
    counts: torch.Tensor          # [E] tokens routed to each expert (top-k slots)


def _grouped_mm_ok(xs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether ``F.grouped_mm`` can run both expert matmuls here; elsewhere the per-expert loop does.

    Its limits (torch 2.13): float32/bfloat16/float16 on CPU (bfloat16 on CUDA from SM 8.0), at least one
    token, every row stride a multiple of 16 bytes, and no autocast (it is not on autocast's cast lists).
    """
    if not hasattr(F, "grouped_mm") or xs.shape[0] == 0 or torch.is_autocast_enabled(xs.device.type):
        return False
    if not (xs.dtype == gate_up.dtype == down.dtype and gate_up.is_contiguous() and down.is_contiguous()):
        return False
    if xs.device.type == "cpu":
        dtype_ok = xs.dtype in (torch.float32, torch.bfloat16, torch.float16)
    elif xs.device.type == "cuda":
        dtype_ok = xs.dtype == torch.bfloat16 and torch.cuda.get_device_capability(xs.device) >= (8, 0)
    else:
        dtype_ok = False
    size = xs.element_size()
    return dtype_ok and (xs.shape[1] * size) % 16 == 0 and (down.shape[2] * size) % 16 == 0


def _expert_loop(xs: torch.Tensor, counts: list[int], gate_up: torch.Tensor, down: torch.Tensor,
                 gate_up_scale: torch.Tensor | None, down_scale: torch.Tensor | None) -> torch.Tensor:
    """One pair of matmuls per expert over its contiguous slice of the sorted token slots.

    The weights are split once with ``unbind``: its backward stacks the per-expert gradients into one
    buffer (zeros for an expert without tokens). Indexing ``gate_up[e]`` instead would give each expert a
    ``select`` backward that allocates and zero-fills a full ``[E, ...]`` gradient, 2E of them per layer.
    """
    gate_ups, downs = gate_up.unbind(0), down.unbind(0)
    outs = []
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        chunk = xs[start:start + n]
        if gate_up_scale is None:
            gate, up = F.linear(chunk, gate_ups[e]).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, downs[e]))
        else:  # int8: cast one expert at a time, never a float copy of all experts
            dtype = chunk.dtype
            gate, up = (F.linear(chunk, gate_ups[e].to(dtype)) * gate_up_scale[e].to(dtype)).chunk(2, -1)
            outs.append(F.linear(F.silu(gate) * up, downs[e].to(dtype)) * down_scale[e].to(dtype))
        start += n
    return torch.cat(outs) if outs else xs.new_zeros(0, down.shape[1])


def experts_forward(x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor, gate_up_scale: torch.Tensor | None = None,
                    down_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped expert compute. x [T, d]; expert_idx, weights [T, k]; gate_up [E, 2F, d]; down [E, d, F].

    Where ``F.grouped_mm`` is usable (``_grouped_mm_ok``) each projection is one grouped GEMM over the
    sorted slots, and its backward writes each weight gradient straight into one ``[E, ...]`` tensor;
    otherwise a per-expert loop computes the same products.

    With ``gate_up_scale [E, 2F]`` and ``down_scale [E, d]`` the weights are int8 (``model/quant.py``):
    each matmul runs on the integer weights cast to x's dtype and its output channels are then scaled.
    """
    T, k = expert_idx.shape
    E = gate_up.shape[0]
    flat = expert_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token_of = order // k
    counts = torch.bincount(flat, minlength=E)
    xs = x[token_of]
    if gate_up_scale is None and _grouped_mm_ok(xs, gate_up, down):
        offs = counts.cumsum(0).to(torch.int32)  # end of each expert's slots; no host sync needed
        gate, up = F.grouped_mm(xs, gate_up.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
        ys = F.grouped_mm(F.silu(gate) * up, down.transpose(-2, -1), offs=offs)
    else:
        ys = _expert_loop(xs, counts.tolist(), gate_up, down, gate_up_scale, down_scale)
    ys = ys * weights.reshape(-1)[order, None].to(ys.dtype)
    out = torch.zeros_like(x)
    return out.index_add(0, token_of, ys.to(x.dtype))


class MoE(nn.Module):
    def __init__(self, cfg: JambaConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.gate_up = nn.Parameter(torch.empty(cfg.n_experts, 2 * cfg.ffn_dim, cfg.d_model))
        self.down = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model, cfg.ffn_dim))
        if not self.gate_up.is_meta:  # on meta, normal_ would load torch's meta kernels (~70 MB per process)
            nn.init.normal_(self.gate_up, std=cfg.init_std)
            nn.init.normal_(self.down, std=cfg.init_std)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.router(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, idx = torch.topk(probs, self.top_k, dim=-1)
        return logits, weights.to(x.dtype), idx

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits, weights, idx = self.route(flat)
        out = experts_forward(flat, idx, weights, self.gate_up, self.down)
        counts = torch.bincount(idx.reshape(-1), minlength=self.n_experts)
        return out.view(shape), RouterOutput(logits=logits, counts=counts)


def load_balancing_loss(router_logits: list[torch.Tensor], n_experts: int, top_k: int,
                        token_mask: torch.Tensor | None = None, reduce: Callable | None = None) -> torch.Tensor:
    """Hugging Face's auxiliary loss over all MoE layers: ``E * sum_e f_e * P_e``.

    f_e: fraction of tokens (summed over the k slots) routed to e; P_e: mean router probability of e.
    ``token_mask`` [tokens] (1 = real token) excludes padding, as HF's attention_mask does. ``reduce``: a
    differentiable sum of the statistics over the ranks that share these sequences (context parallelism),
    so that f and P are those of the whole sequences.
    """
    device = router_logits[0].device
    routed = torch.zeros(n_experts, dtype=torch.float32, device=device)
    prob_sum = torch.zeros(n_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        _, idx = torch.topk(probs, top_k, dim=-1)
        mask = torch.ones(probs.shape[0], device=device) if token_mask is None else token_mask.float().reshape(-1)
        routed = routed.scatter_add(0, idx.reshape(-1), mask.repeat_interleave(top_k))
        prob_sum = prob_sum + (probs * mask[:, None]).sum(0)
        rows = rows + mask.sum()
    if reduce is not None:
        stats = reduce(torch.cat([routed, prob_sum, rows[None]]))
        routed, prob_sum, rows = stats[:n_experts], stats[n_experts:2 * n_experts], stats[-1]
    return n_experts * torch.sum((routed / rows) * (prob_sum / rows))


def router_z_loss(router_logits: list[torch.Tensor], reduce: Callable | None = None) -> torch.Tensor:
    """ST-MoE's z-loss: mean squared log-sum-exp of the router logits (keeps them small), per layer, averaged
    over layers. ``reduce``: as in ``load_balancing_loss``, sums and token counts over the sharing ranks."""
    sums = torch.stack([torch.logsumexp(lg.float(), dim=-1).pow(2).sum() for lg in router_logits])
    tokens = torch.tensor([float(lg.shape[0]) for lg in router_logits], device=sums.device)
    if reduce is not None:
        stats = reduce(torch.cat([sums, tokens]))
        sums, tokens = stats[:len(router_logits)], stats[len(router_logits):]
    return (sums / tokens).mean()
