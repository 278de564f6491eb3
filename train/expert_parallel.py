"""Expert parallelism for Jamba's MoE, keeping Jamba's routing exactly.

Why not DeepSpeed's ``MOELayer``: its top-2 gate renormalises the two weights, samples the second expert
with Gumbel noise (in eval too), computes logits in fp32 from its own gate and drops or pads tokens to a
capacity; its aux loss counts top-1 assignments per layer. Jamba routes with softmax -> top-2 *without*
renormalisation, never drops, and uses Hugging Face's aux loss over all layers. So the model keeps its own
router and loss, and this module adds only the parallel part, using DeepSpeed's own process groups:

* ``deepspeed.utils.groups._create_expert_and_data_parallel(ep_size)`` makes the expert-parallel groups
  (all-to-all) and expert-data-parallel groups (gradient all-reduce of expert weights);
* the sharded MoE subclasses DeepSpeed's ``MoE`` (without its constructor) and names its experts
  ``deepspeed_moe.experts.deepspeed_experts.<local id>``, so the engine detects MoE layers, ZeRO 1/2 reduces
  expert gradients over the expert-data-parallel group, and checkpoints are written per global expert;
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


def _deepspeed_moe_base():
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    return DeepSpeedMoE


class _Expert(nn.Module):
    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, group_name: str):
        super().__init__()
        self.gate_up = nn.Parameter(gate_up.detach().clone())
        self.down = nn.Parameter(down.detach().clone())
        self.group_name = group_name
        self.tag_parameters()

    def tag_parameters(self) -> None:
        """DeepSpeed's MoE marks; again after materialising from meta, which makes new Parameter objects."""
        for p in (self.gate_up, self.down):
            p.allreduce = False          # DeepSpeed: reduce over the expert-data-parallel group only
            p.group_name = self.group_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down)


def make_expert_parallel_moe(moe: MoE, ep_size: int):
    """This rank's shard of ``moe`` as a DeepSpeed ``MoE`` subclass (so that DeepSpeed's engine, ZeRO 1/2 and
    its per-expert checkpoint files treat it as native MoE), with Jamba's routing in ``forward``."""
    base = _deepspeed_moe_base()

    class ExpertParallelMoE(base):
        def __init__(self):
            nn.Module.__init__(self)  # not DeepSpeed's constructor: its gate and experts are not used
            if moe.n_experts % ep_size:
                raise ValueError(f"parallel.ep_size: {ep_size} does not divide n_experts {moe.n_experts}")
            self.num_experts, self.top_k, self.ep_size = moe.n_experts, moe.top_k, ep_size
            self.n_experts = moe.n_experts
            self.num_local_experts = moe.n_experts // ep_size
            self.expert_group_name = f"ep_size_{ep_size}"
            self.enable_expert_tensor_parallelism = False
            self.router = moe.router
            self.group = None
            self.ep_rank = 0
            self.deepspeed_moe = nn.Module()
            self.deepspeed_moe.experts = nn.Module()
            self.deepspeed_moe.experts.deepspeed_experts = nn.ModuleList()
            self._full = (moe.gate_up.detach(), moe.down.detach())

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            from deepspeed.utils import groups

            if self.expert_group_name not in groups._get_expert_parallel_group_dict():
                groups._create_expert_and_data_parallel(
                    self.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_)
            self.group = groups._get_expert_parallel_group(self.expert_group_name)
            self.ep_rank = dist.get_rank(self.group)
            if self._full is not None:  # keep only this rank's experts
                gate_up, down = self._full
                lo = self.ep_rank * self.num_local_experts
                for e in range(lo, lo + self.num_local_experts):
                    self.deepspeed_moe.experts.deepspeed_experts.append(
                        _Expert(gate_up[e], down[e], self.expert_group_name))
                self._full = None

        route = MoE.route

        def local_experts(self) -> nn.ModuleList:
            return self.deepspeed_moe.experts.deepspeed_experts

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
            return expert_parallel_forward(self, x)

    return ExpertParallelMoE()


def expert_parallel_forward(layer, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
    """Route (Jamba semantics), send each token slot to the EP rank that owns its expert, compute, return."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    logits, weights, idx = layer.route(flat)
    k, local, ep = layer.top_k, layer.num_local_experts, layer.ep_size
    slots = idx.reshape(-1)
    order = torch.argsort(slots, stable=True)
    token_of = order // k
    counts = torch.bincount(slots, minlength=layer.n_experts)                 # [E] global experts
    send = flat[token_of]                                                      # slots sorted by expert
    send_counts = counts.view(ep, local)
    if ep > 1:
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=layer.group)   # [source rank, local expert]
        in_splits, out_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        received = _all_to_all(send, out_splits, in_splits, layer.group)
    else:
        recv_counts, received = send_counts, send
    # received: per source rank, its slots for my experts in expert order -> regroup by expert
    expert_of = torch.repeat_interleave(torch.arange(local, device=x.device).repeat(ep), recv_counts.reshape(-1))
    regroup = torch.argsort(expert_of, stable=True)
    grouped = received[regroup]
    outs, start = [], 0
    unused = flat.new_zeros(())
    for e, n in enumerate(recv_counts.sum(0).tolist()):
        expert = layer.local_experts()[e]
        if n:
            outs.append(expert(grouped[start:start + n]))
            start += n
        else:
            # An expert that got no token this step must still get a (zero) gradient: ranks whose gradient
            # lists differ would post mismatched collectives in the data-parallel reduction and abort.
            unused = unused + 0.0 * (expert.gate_up.sum() + expert.down.sum())
    # Even with nothing to compute, keep the (empty) result on the autograd graph: the return all-to-all's
    # backward is a collective, and a rank that skipped it would leave the other ranks waiting.
    computed = torch.cat(outs) if outs else grouped * 0.0
    back = torch.zeros_like(computed).index_copy(0, regroup, computed) if computed.shape[0] else computed
    returned = _all_to_all(back, in_splits, out_splits, layer.group) if ep > 1 else back
    returned = returned * weights.reshape(-1)[order, None].to(returned.dtype)
    out = torch.zeros_like(flat).index_add(0, token_of, returned.to(flat.dtype)) + unused.to(flat.dtype)
    return out.view(shape), RouterOutput(logits=logits, counts=counts)


def apply_expert_parallel(model: nn.Module, ep_size: int) -> None:
    """Replace every MoE of ``model`` with this rank's expert-parallel shard (torch.distributed must be
    initialised). Done before the optimizer is built, so that it sees the sharded expert parameters."""
    for layer in model.layers:
        if isinstance(layer.feed_forward, MoE):
            layer.feed_forward = make_expert_parallel_moe(layer.feed_forward, ep_size)
            layer.feed_forward.set_deepspeed_parallelism()

