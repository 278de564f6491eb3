"""Expert parallelism for Jamba's MoE, keeping Jamba's routing exactly.

Why not DeepSpeed's ``MOELayer``: its top-2 gate renormalises the two weights, samples the second expert
with Gumbel noise (in eval too), computes logits in fp32 from its own gate and drops or pads tokens to a
capacity; its aux loss counts top-1 assignments per layer. Jamba routes with softmax -> top-2 *without*
renormalisation, never drops, and uses Hugging Face's aux loss over all layers. So the model keeps its own
router and loss, and this module adds only the parallel part, using DeepSpeed's own process groups:

* ``deepspeed.utils.groups._create_expert_and_data_parallel(ep_size)`` makes the expert-parallel groups
  (all-to-all) and expert-data-parallel groups (gradient all-reduce of expert weights);
* each EP rank keeps ``n_experts / ep_size`` experts (global expert ``e`` lives on EP rank
  ``e // local``); expert parameters are tagged ``allreduce=False`` and ``group_name=ep_size_<n>``, which is
  how DeepSpeed's engine and ZeRO 1/2 recognise MoE parameters, and
  ``split_params_into_different_moe_groups_for_optimizer`` gives them their own optimizer groups;
* dispatch: token slots are sorted by expert, counts are exchanged, activations move with a differentiable
  variable-size ``all_to_all_single``, local experts run grouped matmuls, results travel back and are
  combined with the (unnormalised) router weights.

The result is the same function as the single-process MoE (tests compare ep_size 2 with ep_size 1).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.layers.feedforward import MoE, RouterOutput


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    from torch.distributed.nn.functional import all_to_all_single

    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    return all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)


class ExpertParallelMoE(nn.Module):
    """Drop-in replacement for ``model.layers.feedforward.MoE`` holding only this rank's experts."""

    def __init__(self, moe: MoE, ep_size: int, ep_rank: int, group, group_name: str):
        super().__init__()
        if moe.n_experts % ep_size:
            raise ValueError(f"parallel.ep_size: {ep_size} does not divide n_experts {moe.n_experts}")
        self.n_experts, self.top_k = moe.n_experts, moe.top_k
        self.ep_size, self.ep_rank, self.group = ep_size, ep_rank, group
        self.local = moe.n_experts // ep_size
        lo, hi = ep_rank * self.local, (ep_rank + 1) * self.local
        self.router = moe.router
        self.gate_up = nn.Parameter(moe.gate_up.detach()[lo:hi].clone())
        self.down = nn.Parameter(moe.down.detach()[lo:hi].clone())
        for p in (self.gate_up, self.down):
            p.allreduce = False          # DeepSpeed: reduce over the expert-data-parallel group only
            p.group_name = group_name

    route = MoE.route

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits, weights, idx = self.route(flat)
        k = self.top_k
        slots = idx.reshape(-1)
        order = torch.argsort(slots, stable=True)
        token_of = order // k
        counts = torch.bincount(slots, minlength=self.n_experts)               # [E] global experts
        send = flat[token_of]                                                    # slots sorted by expert
        # how many slots go to each EP rank, and how many of them per local expert there
        send_counts = counts.view(self.ep_size, self.local)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)      # [src rank, local expert]
        in_splits = send_counts.sum(1).tolist()
        out_splits = recv_counts.sum(1).tolist()
        received = _all_to_all(send, out_splits, in_splits, self.group)
        # received rows: for each source rank, its slots for my experts in expert order; regroup by expert
        per_src = recv_counts.tolist()
        expert_of = torch.cat([torch.arange(self.local, device=x.device).repeat_interleave(torch.tensor(row))
                               for row in per_src]) if received.shape[0] else torch.zeros(0, dtype=torch.long)
        regroup = torch.argsort(expert_of, stable=True)
        grouped = received[regroup]
        per_expert = recv_counts.sum(0).tolist()
        outs, start = [], 0
        for e, n in enumerate(per_expert):
            if n:
                chunk = grouped[start:start + n]
                gate, up = F.linear(chunk, self.gate_up[e]).chunk(2, dim=-1)
                outs.append(F.linear(F.silu(gate) * up, self.down[e]))
                start += n
        computed = torch.cat(outs) if outs else grouped.new_zeros(0, flat.shape[1])
        back = torch.empty_like(computed)
        back = back.index_copy(0, regroup, computed) if computed.shape[0] else computed
        returned = _all_to_all(back, in_splits, out_splits, self.group)
        returned = returned * weights.reshape(-1)[order, None].to(returned.dtype)
        out = torch.zeros_like(flat).index_add(0, token_of, returned.to(flat.dtype))
        return out.view(shape), RouterOutput(logits=logits, counts=counts)


def apply_expert_parallel(model: nn.Module, ep_size: int) -> str | None:
    """Replace every MoE of ``model`` with its expert-parallel shard; returns DeepSpeed's group name."""
    if ep_size == 1:
        return None
    from deepspeed.utils import groups

    groups._create_expert_and_data_parallel(ep_size)
    group_name = f"ep_size_{ep_size}"
    group = groups._get_expert_parallel_group(group_name)
    ep_rank = dist.get_rank(group)
    for layer in model.layers:
        if isinstance(layer.feed_forward, MoE):
            layer.feed_forward = ExpertParallelMoE(layer.feed_forward, ep_size, ep_rank, group, group_name)
    return group_name


def gather_full_experts(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (all-experts) state dict, for export: expert shards are all-gathered over the EP group,
    global expert id = ep_rank * local + local id."""
    state = {}
    for name, tensor in model.state_dict().items():
        state[name] = tensor
    for i, layer in enumerate(model.layers):
        ff = layer.feed_forward
        if isinstance(ff, ExpertParallelMoE):
            for pname in ("gate_up", "down"):
                local = getattr(ff, pname).detach().contiguous()
                parts = [torch.empty_like(local) for _ in range(ff.ep_size)]
                dist.all_gather(parts, local, group=ff.group)
                state[f"layers.{i}.feed_forward.{pname}"] = torch.cat(parts)
    return state
