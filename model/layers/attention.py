"""Causal grouped-query attention through ``scaled_dot_product_attention``; no positional encoding.

With ``segment`` ids ([b, L], one id per packed document) attention is confined to each document.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.config import JambaConfig

# Queries per block of document-masked attention. Each block's mask (and, on the fused kernels, its float copy
# in q's dtype) is [b, 1, block, window] with window <= L: at 256K tokens and block 1024 that is 0.25 GiB of
# bool + 0.5 GiB of bf16 per sequence, small beside a rank's weights. A smaller block would shrink it and
# the keys a query wastes on other documents inside its window (at most block + the document's own), but
# double the kernel launches and Python steps (already 256 blocks at 256K); a larger one doubles the mask.
ATTN_BLOCK = 1024


def _document_starts(segment: torch.Tensor) -> torch.Tensor:
    """[b, L]: the position where each token's document begins (a document is a run of one id)."""
    pos = torch.arange(segment.shape[1], device=segment.device).expand_as(segment)
    new = torch.ones_like(segment, dtype=torch.bool)
    new[:, 1:] = segment[:, 1:] != segment[:, :-1]
    return torch.where(new, pos, 0).cummax(dim=1).values


def _attend_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment: torch.Tensor,
                   lo: int, hi: int, start: int) -> torch.Tensor:
    """Queries [lo, hi) against keys [start, hi), the mask built for that window only. Exact when no query
    of the block belongs to a document that begins before ``start`` (the caller's choice of ``start``)."""
    mask = segment[:, lo:hi, None] == segment[:, None, start:hi]
    # in place: one [b, block, window] bool alive besides the causal one, not a third for the conjunction
    mask &= torch.ones(hi - lo, hi - start, dtype=torch.bool, device=q.device).tril(lo - start)
    return F.scaled_dot_product_attention(q[:, :, lo:hi], k[:, :, start:hi], v[:, :, start:hi],
                                          attn_mask=mask[:, None], enable_gqa=q.shape[1] != k.shape[1])


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment: torch.Tensor | None = None,
           block: int = ATTN_BLOCK) -> torch.Tensor:
    """Causal attention over a whole sequence: q [b, H, L, hd], k, v [b, KV, L, hd] (H a multiple of KV,
    query head i reading kv head i // (H / KV)); with ``segment`` [b, L] a query sees only keys of its own
    document (documents contiguous, as packing makes them). Returns [b, H, L, hd].

    With a segment and L > ``block``, queries go ``block`` at a time: causality and contiguous documents mean
    block [lo, hi) sees only keys [start, hi), ``start`` the earliest beginning (over the batch rows) of the
    document of query ``lo``; so no mask is larger than [b, 1, block, L]. Under autograd each block is
    checkpointed: what is kept for backward is q, k, v and ``segment`` (which the caller holds anyway), never
    a block's mask or scores; backward rebuilds one block's at a time."""
    length = q.shape[2]
    if segment is None:
        # is_causal needs no mask and lets the fused kernels skip the upper triangle
        return F.scaled_dot_product_attention(q, k, v, is_causal=length > 1, enable_gqa=q.shape[1] != k.shape[1])
    if length <= block:
        return _attend_window(q, k, v, segment, 0, length, 0)
    # one host transfer for every block's window start, not one synchronisation per block
    starts = _document_starts(segment)[:, ::block].amin(dim=0).tolist()
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs = []
    for i, start in enumerate(starts):
        lo, hi = i * block, min((i + 1) * block, length)
        if recompute:
            # no randomness inside (no dropout): the RNG state need not be saved and restored per block
            outs.append(checkpoint(_attend_window, q, k, v, segment, lo, hi, start, use_reentrant=False,
                                   preserve_rng_state=False))
        else:
            outs.append(_attend_window(q, k, v, segment, lo, hi, start))
    return torch.cat(outs, dim=2)


class Attention(nn.Module):
    def __init__(self, cfg: JambaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        # an attribute rather than a config key: it changes memory, not results (tests shrink it)
        self.block = ATTN_BLOCK

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
            out = attend(q, k, v, segment, self.block)
        else:
            mask = None
            if L > 1:
                mask = torch.ones(L, past + L, dtype=torch.bool, device=h.device).tril(past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv)
        return self.o_proj(out.transpose(1, 2).reshape(b, L, -1))
