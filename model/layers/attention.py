"""Causal grouped-query attention through ``scaled_dot_product_attention``; no positional encoding.

With ``segment`` ids ([b, L], one id per packed document) attention is confined to each document.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import JambaConfig


class Attention(nn.Module):
    def __init__(self, cfg: JambaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, h: torch.Tensor, segment: torch.Tensor | None = None, kv=None) -> torch.Tensor:
        """h [b, L, d]. ``kv`` (a ``KVState``) receives this call's keys/values and supplies earlier ones."""
        b, L, _ = h.shape
        q = self.q_proj(h).view(b, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, L, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, L, self.n_kv, self.head_dim).transpose(1, 2)
        past = 0
        if kv is not None:
            past = kv.length
            k, v = kv.append(k, v)
        mask = None
        if segment is not None:
            same = segment[:, :, None] == segment[:, None, :]
            causal = torch.ones(L, L, dtype=torch.bool, device=h.device).tril()
            mask = (same & causal)[:, None]
        elif past and L > 1:
            mask = torch.ones(L, past + L, dtype=torch.bool, device=h.device).tril(past)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and past == 0 and L > 1,
            enable_gqa=self.n_heads != self.n_kv)
        return self.o_proj(out.transpose(1, 2).reshape(b, L, -1))
