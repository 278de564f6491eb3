"""Parameter counts on the meta device (no memory): total, and active per token (top-k of the experts)."""

from __future__ import annotations

import torch

from model.config import JambaConfig
from model.jamba import Jamba
from model.layers.feedforward import MoE


def count_parameters(cfg: JambaConfig) -> dict[str, int]:
    with torch.device("meta"):
        model = Jamba(cfg)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    by_part = {"embedding": model.embed_tokens.weight.numel(),
               "lm_head": 0 if cfg.tie_embeddings else model.lm_head.weight.numel(),
               "attention": 0, "mamba": 0, "moe_experts": 0, "moe_router": 0, "dense_mlp": 0, "norms": 0}
    for layer in model.layers:
        mixer = layer.self_attn if layer.kind == "attention" else layer.mamba
        by_part["attention" if layer.kind == "attention" else "mamba"] += sum(p.numel() for p in mixer.parameters())
        ff = layer.feed_forward
        if isinstance(ff, MoE):
            experts = ff.gate_up.numel() + ff.down.numel()
            by_part["moe_experts"] += experts
            by_part["moe_router"] += ff.router.weight.numel()
            inactive += experts * (cfg.n_experts - cfg.top_k) // cfg.n_experts
        else:
            by_part["dense_mlp"] += sum(p.numel() for p in ff.parameters())
        by_part["norms"] += layer.input_layernorm.weight.numel() + layer.pre_ff_layernorm.weight.numel()
    by_part["norms"] += model.final_layernorm.weight.numel()
    return {"total": total, "active": total - inactive, **{f"part_{k}": v for k, v in by_part.items()}}
