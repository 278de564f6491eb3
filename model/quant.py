"""INT8 weight-only quantisation for inference, the way Jamba was released to fit one 80 GB GPU.

Every matrix of the attention projections, the dense MLPs and the MoE experts becomes int8 with one
symmetric float32 scale per output channel: ``scale = max|w_row| / 127``, ``q = round(w / scale)``. A
matmul runs on ``q`` cast to the activation dtype (integers up to 127 are exact in bf16) and multiplies
its output channels by the scales, which is ``x @ (q * scale)^T`` without materialising the dequantised
matrix. Activations stay in ``dtype`` (bf16 by default).

Left in ``dtype``: the Mamba layers (AI21 loads Jamba in 8 bits with ``llm_int8_skip_modules=["mamba"]``:
the selective scan's projections are sensitive and are only ~10 % of the weights), the embedding, the LM
head, the MoE router (routing decisions should not move) and the norms. ``model/memory.py`` counts
exactly these bytes (``weight_bytes(cfg, "int8")``; tested against a quantised model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.jamba import Jamba
from model.layers.feedforward import MLP, MoE, RouterOutput, experts_forward

QMAX = 127


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> (int8 [..., out, in], float32 scales [..., out]); symmetric, per output channel."""
    w = w.detach().float()
    scale = w.abs().amax(dim=-1).clamp(min=1e-12) / QMAX  # an all-zero row keeps scale > 0 and q = 0
    q = torch.round(w / scale[..., None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """A bias-free ``nn.Linear`` with int8 weights and per-output-channel float32 scales."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int8Linear: Jamba's quantised projections have no bias")
        q, scale = quantize_rows(linear.weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_int8.to(x.dtype)) * self.scale.to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scale[:, None]


class Int8MoE(nn.Module):
    """``MoE`` with int8 expert weights; the router stays in the activation dtype. Same routing."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.n_experts, self.top_k = moe.n_experts, moe.top_k
        self.router = moe.router
        gate_up, gate_up_scale = quantize_rows(moe.gate_up)
        down, down_scale = quantize_rows(moe.down)
        self.register_buffer("gate_up_int8", gate_up)
        self.register_buffer("gate_up_scale", gate_up_scale)
        self.register_buffer("down_int8", down)
        self.register_buffer("down_scale", down_scale)

    route = MoE.route  # the same softmax -> top-k, not renormalised

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits, weights, idx = self.route(flat)
        out = experts_forward(flat, idx, weights, self.gate_up_int8, self.down_int8,
                              self.gate_up_scale, self.down_scale)
        counts = torch.bincount(idx.reshape(-1), minlength=self.n_experts)
        return out.view(shape), RouterOutput(logits=logits, counts=counts)


@torch.no_grad()
def quantize_int8(model: Jamba, dtype: torch.dtype = torch.bfloat16) -> Jamba:
    """Quantise ``model`` in place (from its current, ideally float32, weights) and cast the rest to
    ``dtype``. Returns the model, in eval mode: this is for inference only (no gradients reach int8)."""
    for layer in model.layers:
        if layer.kind == "attention":
            attn = layer.self_attn
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(attn, name, Int8Linear(getattr(attn, name)))
        ff = layer.feed_forward
        if isinstance(ff, MoE):
            layer.feed_forward = Int8MoE(ff)
        elif isinstance(ff, MLP):
            for name in ("gate_proj", "up_proj", "down_proj"):
                setattr(ff, name, Int8Linear(getattr(ff, name)))
    for p in model.parameters():  # int8 weights and float32 scales are buffers: they stay as they are
        p.data = p.data.to(dtype)
    return model.eval()


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (shared tensors, e.g. tied embeddings, once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
