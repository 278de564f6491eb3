"""Context parallelism for Jamba: each sample's sequence split over ``cp`` consecutive ranks, exact.

Applied from outside the model, as expert parallelism is: ``apply_context_parallel`` gives every Mamba mixer
and attention layer its context-parallel forward (the class is swapped for a subclass; parameters, their
names and checkpoints are untouched). Rank ``c`` of a context-parallel group holds tokens
``[c L/cp, (c+1) L/cp)`` of every sample through every layer.

* **Mamba-1, by state passing.** The selective scan is per channel and linear in its state, so each rank
  scans its chunk from a zero state, and the outputs are corrected by the state entering the chunk
  (``model/scan.py``): ``y_t += <C_t, exp(A sum_{s<=t} dt_s) h_in>``. ``h_in`` chains the earlier ranks'
  final states and total decays, ``[b, d_inner, d_state]`` each, exchanged with one differentiable
  all-gather per layer; document boundaries reset the state across ranks as within one. The causal conv
  needs the previous rank's last ``d_conv - 1`` inputs (the halo), also gathered. Gradients flow back
  through both exchanges (the autograd Functions below).
* **Attention, DeepSpeed-Ulysses style.** q, k, v are exchanged sequence -> heads with an all-to-all (each
  rank then holds the whole sequence for ``H/cp`` query heads and their kv heads; kv heads are replicated
  when ``cp > n_kv_heads``), attention runs with the full document mask, and the output goes back
  heads -> sequence.
* **MoE** is per token: routing and expert parallelism need no change. The load-balancing and z-losses are
  computed from router statistics summed over the cp group (``replica_losses``), so they equal the losses
  of the unsplit sequences.
* **Loss**: every rank of the group computes the replica's token-weighted mean loss from the summed loss
  and token count (a differentiable all-reduce). DeepSpeed averages gradients over all ``dp x cp`` ranks;
  each rank's backward through the all-reduce hands ``cp`` times its share back, so the average is the
  data-parallel average of the replicas' gradients (docs/training.md, "Context parallelism").

Layout: ``rank = dp_rank * cp + cp_rank`` (cp innermost: its exchanges are the latency-bound ones and stay
within a node); DeepSpeed's data-parallel group is the whole world (ZeRO partitions over ``dp x cp``) and
its expert-parallel groups are ``ep`` consecutive ranks, which may be cp ranks of one sample: MoE is per
token, so which ranks' tokens meet in an expert does not matter.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from model import scan
from model.layers.attention import Attention, attend
from model.layers.feedforward import load_balancing_loss, router_z_loss
from model.layers.mamba import MambaMixer
from model.loss import IGNORE

# Payload bytes each rank receives, by exchange, since the last ``EXCHANGED.clear()`` (benchmarks read it);
# "<exchange> (backward)" for the gradients sent back.
EXCHANGED: Counter[str] = Counter()


@dataclass(frozen=True)
class ContextParallel:
    size: int
    rank: int
    group: object = None     # the torch.distributed group of this rank's cp ranks (None when size 1)

    def all_gather(self, x: torch.Tensor, what: str) -> list[torch.Tensor]:
        """Every cp rank's ``x``, differentiable (the gradient of each copy returns to its owner)."""
        EXCHANGED[what] += (self.size - 1) * x.numel() * x.element_size()
        return list(_AllGather.apply(x.contiguous(), self.group, self.size, what).unbind(0))

    def all_gather_ids(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every cp rank's integer ``x`` (document ids: no gradient)."""
        out = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(out, x.contiguous(), group=self.group)
        return out

    def all_to_all(self, x: torch.Tensor, what: str) -> torch.Tensor:
        """Dimension 0 (``size`` equal parts) exchanged: part j goes to rank j; differentiable."""
        EXCHANGED[what] += (self.size - 1) * x.numel() // self.size * x.element_size()
        return _AllToAll.apply(x, self.group, what)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the cp ranks, differentiable (its backward sums the gradients the same way)."""
        return _AllReduce.apply(x, self.group)


class _AllGather(torch.autograd.Function):
    """All-gather into one ``[size, ...]`` tensor; backward sends each rank's part of the gradient home and
    sums it there. Not ``torch.distributed.nn.functional.all_gather``: on gloo its backward scatters with
    group ranks passed as global ranks, which fails in every group that does not contain rank 0."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, size: int, what: str) -> torch.Tensor:
        ctx.group, ctx.what = group, what
        out = x.new_empty((size * x.shape[0],) + tuple(x.shape[1:]))   # gloo wants the parts concatenated
        dist.all_gather_single(out, x, group=group)
        return out.view((size,) + tuple(x.shape))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size = grad.shape[0]
        EXCHANGED[f"{ctx.what} (backward)"] += (size - 1) * grad[0].numel() * grad.element_size()
        return _exchange(grad, ctx.group).sum(0), None, None, None   # part j of every rank -> rank j, summed


def _exchange(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)       # of the contiguous tensor: empty_like keeps a view's strides
    dist.all_to_all_single(out, x, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Equal parts of dimension 0 exchanged; the backward is the same exchange of the gradient (the
    permutation's transpose). Own Functions here, not ``torch.distributed.nn``'s (deprecated in torch 2.13)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, what: str) -> torch.Tensor:
        ctx.group, ctx.what = group, what
        return _exchange(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size = dist.get_world_size(ctx.group)
        EXCHANGED[f"{ctx.what} (backward)"] += (size - 1) * grad.numel() // size * grad.element_size()
        return _exchange(grad, ctx.group), None, None


class _AllReduce(torch.autograd.Function):
    """Sum over the group; every rank's output feeds its own loss, so the input's gradient is the sum of the
    output gradients over the group."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def check_layout(cp_size: int, world: int, seq_len: int, model_cfg) -> None:
    """One-line errors naming the key, before any group or model is made."""
    if world % cp_size:
        raise ValueError(f"parallel.cp_size: {cp_size} must divide the world size {world}")
    if cp_size == 1:
        return
    if seq_len % cp_size:
        raise ValueError(f"parallel.cp_size: {cp_size} must divide data.seq_len {seq_len}")
    if seq_len // cp_size < model_cfg.mamba_d_conv - 1:
        raise ValueError(f"parallel.cp_size: {cp_size} leaves {seq_len // cp_size} tokens per rank, fewer than the "
                         f"conv halo of {model_cfg.mamba_d_conv - 1}")
    heads, kv = model_cfg.n_heads, model_cfg.n_kv_heads
    if heads % cp_size:
        raise ValueError(f"parallel.cp_size: {cp_size} must divide n_heads {heads} (attention splits heads over cp)")
    if (kv % cp_size) if cp_size <= kv else (cp_size % kv):
        raise ValueError(f"parallel.cp_size: {cp_size} and n_kv_heads {kv}: one must divide the other "
                         f"(kv heads are split, or replicated beyond {kv})")


def make_groups(cp_size: int) -> ContextParallel:
    """This rank's context-parallel group: ranks ``[i cp, (i+1) cp)`` (every rank creates every group)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if cp_size == 1:
        return ContextParallel(1, 0, None)
    mine = None
    for start in range(0, world, cp_size):
        group = dist.new_group(list(range(start, start + cp_size)))
        if start <= rank < start + cp_size:
            mine = group
    return ContextParallel(cp_size, rank % cp_size, mine)


# ---------------------------------------------------------------------------------------- Mamba
class ContextParallelMamba(MambaMixer):
    """``MambaMixer`` over this rank's chunk of the sequence, exact (module docstring)."""

    cp: ContextParallel

    def forward(self, h: torch.Tensor, segment: torch.Tensor | None = None, state=None) -> torch.Tensor:
        if state is not None:
            raise ValueError("context parallelism is for training: no decoding cache")
        cp, K = self.cp, self.d_conv
        b, L, _ = h.shape
        x, z = self.in_proj(h).chunk(2, dim=-1)
        x_t = x.transpose(1, 2)                                                    # [b, d_inner, L]
        # conv halo: the previous rank's last K-1 conv inputs (zeros before the first rank)
        tails = cp.all_gather(x_t[..., L - (K - 1):], "mamba conv halo")
        # Rank 0 uses zeros *computed from* the gathered tensors, and corrects its outputs by a zero state
        # below: every rank's autograd graph then has the same shape, so all ranks run the backward
        # collectives (and, under activation checkpointing, the recomputed forward ones) in the same order.
        # A rank that left a gathered tensor unused would skip that gather's backward and hang the others.
        halo = tails[cp.rank - 1] if cp.rank else tails[0] * 0
        ids = None
        if segment is not None:  # first and last K-1 document ids of every rank's chunk
            ids = cp.all_gather_ids(torch.cat([segment[:, :1], segment[:, L - (K - 1):]], dim=1))
            before = ids[cp.rank - 1][:, 1:] if cp.rank else segment[:, :1].expand(-1, K - 1) - 1
            xc = self._conv(torch.cat([halo, x_t], dim=-1), torch.cat([before, segment], dim=1))[..., K - 1:]
        else:
            xc = self._conv(torch.cat([halo, x_t], dim=-1), None)[..., K - 1:]
        dt_raw, B, C = self._ssm_inputs(xc.transpose(1, 2))
        A = -torch.exp(self.A_log.float())
        bias = self.dt_proj.bias
        y, final = scan.scan_for_state_passing(xc, dt_raw, bias, A, B, C, self.D, segment, self.cfg.scan_chunk,
                                               self.use_cuda_kernels)
        # final states and total decays of every rank's chunk: [2, b, d_inner, d_state] float32 each
        decay = scan.state_passing_decay(dt_raw, bias, A, segment)
        exchanged = cp.all_gather(torch.stack([final, decay]), "mamba states")
        if cp.rank:
            keeps = [None] + [None if ids is None else ids[j][:, 0] == ids[j - 1][:, -1] for j in range(1, cp.rank + 1)]
            entering = scan.chain_states([e[0] for e in exchanged[:cp.rank + 1]],
                                         [e[1] for e in exchanged[:cp.rank + 1]], keeps)[cp.rank]
        else:
            entering = exchanged[0][0] * 0
        # z copied: a view would keep the whole in_proj output alive for backward
        y = scan.corrected_and_gated(y, dt_raw, bias, A, C, entering, z.transpose(1, 2).contiguous(), segment)
        return self.out_proj(y.transpose(1, 2).to(h.dtype))


# ---------------------------------------------------------------------------------------- attention
def _sequence_to_heads(x: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
    """[b, L/cp, N, hd] (this rank's tokens, all heads) -> [b, L, N/cp, hd] (all tokens, this rank's heads)."""
    b, Lc, N, hd = x.shape
    send = x.view(b, Lc, cp.size, N // cp.size, hd).permute(2, 0, 1, 3, 4)       # [dest rank, b, Lc, N/cp, hd]
    got = cp.all_to_all(send, "attention all-to-all")                            # [source = sequence chunk, ...]
    return got.permute(1, 0, 2, 3, 4).reshape(b, cp.size * Lc, N // cp.size, hd)


def _heads_to_sequence(x: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
    """The inverse: [b, L, N/cp, hd] -> [b, L/cp, N, hd]."""
    b, L, n, hd = x.shape
    Lc = L // cp.size
    send = x.view(b, cp.size, Lc, n, hd).permute(1, 0, 2, 3, 4)                  # [dest = sequence chunk, ...]
    got = cp.all_to_all(send, "attention all-to-all")                            # [source = head group, ...]
    return got.permute(1, 2, 0, 3, 4).reshape(b, Lc, cp.size * n, hd)


class UlyssesAttention(Attention):
    """``Attention`` over this rank's chunk: heads all-to-all, full-sequence attention, back (module docstring)."""

    cp: ContextParallel

    def forward(self, h: torch.Tensor, segment: torch.Tensor | None = None, kv=None) -> torch.Tensor:
        if kv is not None:
            raise ValueError("context parallelism is for training: no decoding cache")
        cp = self.cp
        b, Lc, _ = h.shape
        q = self.q_proj(h).view(b, Lc, self.n_heads, self.head_dim)
        k = self.k_proj(h).view(b, Lc, self.n_kv, self.head_dim)
        v = self.v_proj(h).view(b, Lc, self.n_kv, self.head_dim)
        if cp.size > self.n_kv:  # one kv head per rank: rank j's query heads all read kv head j // (cp / n_kv)
            k, v = (t.repeat_interleave(cp.size // self.n_kv, dim=2) for t in (k, v))
        q, k, v = (_sequence_to_heads(t, cp).transpose(1, 2) for t in (q, k, v))  # [b, heads/cp, L, hd]
        full = torch.cat(cp.all_gather_ids(segment), dim=1) if segment is not None else None
        out = attend(q, k, v, full)                                                # [b, H/cp, L, hd]
        out = _heads_to_sequence(out.transpose(1, 2), cp)                          # [b, Lc, H, hd]
        return self.o_proj(out.reshape(b, Lc, -1))


def apply_context_parallel(model: nn.Module, cp: ContextParallel) -> None:
    """Give every Mamba mixer and attention layer of ``model`` its context-parallel forward (no-op for cp 1)."""
    if cp.size == 1:
        return
    for module in model.modules():
        swap = {MambaMixer: ContextParallelMamba, Attention: UlyssesAttention}.get(type(module))
        if swap is not None:
            module.__class__ = swap  # same parameters and names; only the forward changes
            module.cp = cp


# ---------------------------------------------------------------------------------------- losses
def replica_losses(out, targets: torch.Tensor, n_experts: int, top_k: int, cp: ContextParallel,
                   z_loss: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(LM loss, load-balancing loss, z-loss) of the whole sequences this cp group shares, the same on each
    of its ranks. ``out.lm_loss`` must be this rank's sum (``loss_reduction="sum"``)."""
    reduce = cp.all_reduce if cp.size > 1 else None
    total = torch.stack([out.lm_loss.float(), (targets != IGNORE).sum().to(torch.float32)])
    if reduce is not None:
        total = reduce(total)
    lm = total[0] / total[1].clamp_min(1)
    aux = z = None
    if out.router_logits:
        aux = load_balancing_loss(out.router_logits, n_experts, top_k, reduce=reduce)
        if z_loss:
            z = router_z_loss(out.router_logits, reduce=reduce)
    return lm, aux, z


def sequence_expert_counts(counts: list[torch.Tensor], cp: ContextParallel) -> list[torch.Tensor]:
    """Tokens per expert and MoE layer over the whole sequences (for metrics; no gradient)."""
    if cp.size == 1 or not counts:
        return counts
    stacked = torch.stack(counts)
    dist.all_reduce(stacked, group=cp.group)
    return list(stacked)
