"""Causal grouped-query attention through ``scaled_dot_product_attention``; no positional encoding.

With ``segment`` ids ([b, L], one id per packed document) attention is confined to each document.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import JambaConfig


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention over a whole sequence: q [b, H, L, hd], k, v [b, KV, L, hd] (H a multiple of KV,
    query head i reading kv head i // (H / KV)); with ``segment`` [b, L] a query sees only keys of its own
    document. Returns [b, H, L, hd]."""
    mask = None
    if segment is not None:
        L = q.shape[2]
        same = segment[:, :, None] == segment[:, None, :]
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        mask = (same & causal)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                          enable_gqa=q.shape[1] != k.shape[1])


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
        if past == 0:
            out = attend(q, k, v, segment)
        else:
            mask = None
            if L > 1:
                mask = torch.ones(L, past + L, dtype=torch.bool, device=h.device).tril(past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv)
        return self.o_proj(out.transpose(1, 2).reshape(b, L, -1))
