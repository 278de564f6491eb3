"""Per-GPU memory plan of a training configuration: will it fit, and where the bytes go.

Every term is counted from what this code base and DeepSpeed actually allocate (docs/training.md,
"Memory plan"), per rank:

* **weights**: the rank's parameters in the model dtype: all non-expert parameters plus
  ``n_experts / ep_size`` experts per MoE layer (DeepSpeed flattens them; the model's tensors are views);
* **ZeRO 1/2 optimizer**: fp32 master weights, Adam's two moments and the fp32 gradient of the rank's
  partition: 16 bytes per parameter, partitioned over the data-parallel group (non-expert parameters) or
  the expert-data-parallel group (expert parameters, ``world / ep_size`` ranks);
* **gradients** in the model dtype: every parameter's ``.grad`` under ZeRO-1; only the rank's partition
  under ZeRO-2; plus the contiguous reduction bucket(s) of ``reduce_bucket_size`` elements (two when
  ``overlap_comm``);
* **activations** per micro-batch: bytes kept for backward per token and layer (counted tensor by tensor
  from the forward passes in ``model/``, checked against autograd's saved tensors in tests), the LM head's
  logits in fp32 for the loss (or, with ``loss_chunk_tokens``, one chunk of them at a time), and the
  backward working set (with document-masked attention longer than one query block, that block's mask);
  with activation checkpointing, each layer's input plus one layer recomputed;
* **all-to-all buffers**: expert parallelism's send / receive / return buffers for one MoE layer, scaled by
  ``expert_imbalance`` (the most-loaded rank receives this times the mean);
* **framework**: CUDA context, NCCL and allocator reserve (a constant, ``overhead``).

The peak is the larger of the backward peak (weights, optimizer states, gradients, activations) and the
optimizer-step peak (activations freed, fp32 partition gradients materialised).

The plan also sizes one checkpoint on disk (the whole job's, not a rank's), from what DeepSpeed's
``save_checkpoint`` writes with MoE layers under ZeRO 1/2: ``mp_rank_00_model_states.pt`` (non-expert weights
in the model dtype), one ``layer_{m}_expert_{g}_mp_rank_00_model_states.pt`` per expert (model dtype), and
per rank ``[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` with that rank's partition of the fp32 master
weights and Adam's two moments: the partitions add up to every parameter once, so 4 + 8 bytes per
parameter. Without ZeRO (stage 0, fp32; bf16 goes through DeepSpeed's BF16 optimizer, partitioned like
ZeRO-1) each expert-parallel rank writes ``expp_rank_{r}_mp_rank_00_optim_states.pt`` with its whole
optimizer state and rank 0 repeats its own in the main file. ``checkpoint.keep`` tags stay on disk, one more
while a new tag is written and before the oldest is removed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from model.config import JambaConfig
from model.layers.attention import ATTN_BLOCK
from model.memory import parse_size  # noqa: F401 - one size syntax for plans and the memory model
from train.config import TrainConfig

GB, GIB = 10**9, 2**30
SCAN_BLOCK = 256          # model/scan.py: tokens per checkpointed scan block (one fp32 state kept per block)
DEFAULT_OVERHEAD_CUDA = 3 * GIB


def _norm(dim: int, a: int) -> int:
    # RMSNorm: float32 input (or its fp32 copy), the normalised value cast back, the weighted output
    return (4 + 2 * a) * dim


def layer_activation_bytes(cfg: JambaConfig, layer: int, act_bytes: int, seq_len: int,
                           boundaries: bool, kernels: bool = False, attn_block: int = ATTN_BLOCK) -> int:
    """Bytes autograd keeps for backward, per token, for layer ``layer`` of the model (pure-PyTorch path,
    or the mamba-ssm kernels' saved inputs when ``kernels``); ``attn_block``: ``model.layers.attention``'s
    query block for document-masked attention."""
    a, d, di, n, r = act_bytes, cfg.d_model, cfg.d_inner, cfg.mamba_d_state, cfg.mamba_dt_rank
    fp32_copy = 4 if a != 4 else 0             # x.float() is a new tensor only when x is not fp32
    total = _norm(d, a) * 2                    # input_layernorm, pre_ff_layernorm
    if cfg.is_attention(layer):
        kv = cfg.n_kv_heads * cfg.head_dim
        if boundaries and seq_len > attn_block:
            # checkpointed query blocks keep only their inputs: q, k, v (the segment ids are the batch's, held
            # anyway); the concatenated output is not saved, its head-merged copy is (o_proj's input). No mask,
            # no log-sum-exp: backward rebuilds them one block at a time (attention_working_set_bytes)
            total += 2 * a * d + 2 * a * kv
        else:
            # q, k, v, the attention output and its head-merged copy; log-sum-exp per head; with documents the
            # [L, L] mask, which the fused kernels (CPU flash, CUDA memory-efficient) keep as a copy in q's
            # dtype: a bytes per key per token (measured), not the bool's one
            total += 3 * a * d + 2 * a * kv + 4 * cfg.n_heads + (a * seq_len if boundaries else 0)
    elif kernels:
        # in_proj output, conv output, x_proj output and normalised dt/B/C, dt, scan output (kernels keep
        # their inputs and recompute the rest), gated output
        total += 2 * a * di + a * di + (a + 4 + 2 * a) * (r + 2 * n) + a * di + 2 * a * di
    else:
        total += 2 * a * di                                   # in_proj output (x and z)
        total += 2 * a * di                                   # conv output, SiLU output
        if boundaries:
            total += 2 * a * di                               # the masked conv taps autograd keeps
        total += a * (r + 2 * n) + _norm(r + 2 * n, a) + 2 * a * n   # x_proj out, dt/B/C norms, B/C copies
        total += a * di + 4 * di + 4 * di                     # dt_proj out, + bias (fp32), softplus
        total += fp32_copy * (di + 2 * n)                     # fp32 copies of x, B, C for the scan
        total += 4 * di * n * 1 // SCAN_BLOCK                 # one fp32 state per checkpointed block
        total += 3 * a * di + fp32_copy * di                  # scan output, gate, gated output (+ z fp32)
    if cfg.is_moe(layer):
        k, E = cfg.top_k, cfg.n_experts
        total += 2 * a * k * d                                # expert inputs and outputs, per slot
        total += 4 * a * cfg.ffn_dim * k                      # gate/up (2F), SiLU, product, per slot
        total += a * E + 4 * E * (2 + (1 if a != 4 else 0)) + a * k + 8 * 4 * k   # router, probs, indices
    else:
        total += 4 * a * cfg.ffn_dim                          # gate, up, SiLU, product
    return total


def head_activation_bytes(cfg: JambaConfig, act_bytes: int, chunked: bool) -> int:
    """Per token: the final norm, and unless the loss is chunked the logits (the output keeps them) and the
    fp32 log-softmax the loss keeps (a chunked loss keeps only the normalised hidden state)."""
    a = act_bytes
    return _norm(cfg.d_model, a) + (0 if chunked else (a + 4) * cfg.vocab_size)


def head_working_set_bytes(cfg: JambaConfig, act_bytes: int, chunked: bool) -> int:
    """Per token of logits alive at once in backward: the gradients of the log-softmax and of the logits,
    and for a recomputed chunk also its logits, their fp32 copy and log-softmax."""
    a = act_bytes
    grads = (4 + a) * cfg.vocab_size
    return grads + ((a + (4 if a != 4 else 0) + 4) * cfg.vocab_size if chunked else 0)


def scan_working_set_bytes(cfg: JambaConfig, micro_batch: int, seq_len: int, boundaries: bool) -> int:
    """The pure-PyTorch scan's backward: one block of ``[b, d_inner, block, d_state]`` fp32 tensors is
    recomputed (5 of them kept for its backward, 6 with document resets; measured in tests) while about 3
    more hold their gradients."""
    unit = micro_batch * cfg.d_inner * min(seq_len, SCAN_BLOCK) * cfg.mamba_d_state * 4
    return int((5.25 + (1 if boundaries else 0) + 3) * unit)


def attention_working_set_bytes(micro_batch: int, seq_len: int, act_bytes: int, boundaries: bool,
                                attn_block: int = ATTN_BLOCK) -> int:
    """Document-masked attention in blocks: the one block recomputed in backward holds its [b, block, window]
    mask, window <= seq_len (a document as long as the sequence), as one bool (plus the causal bool of
    [block, window], counted as a second byte), the copy in q's dtype that SDPA's fused kernels take and
    keep for the block's backward (measured on CPU in tests), and on CUDA that copy padded to 16 keys while
    both exist (``pad_bias`` in PyTorch's attention.cpp; read, not measured).
    The fused kernels materialise no scores; SDPA's math fallback would hold [b, H, block, window] fp32
    scores and their softmax (8 H bytes per element) and is not planned: the test checks that SDPA does not
    choose it on CPU; on CUDA the memory-efficient kernel takes bool masks (not measured here). The window's
    k and v gradients are activation-gradient sized (the layer term). A single masked call (seq_len <=
    block) keeps its mask with the layer's activations instead."""
    if not boundaries or seq_len <= attn_block:
        return 0
    return micro_batch * attn_block * seq_len * (2 + 2 * act_bytes)


@dataclass
class MemoryPlan:
    world: int
    ep_size: int
    dp_size: int
    edp_size: int
    zero_stage: int
    dtype: str
    tokens_per_micro_batch: int
    capacity: int | None
    params_dense: int
    params_expert_local: int
    terms: dict[str, int] = field(default_factory=dict)
    backward_peak: int = 0
    step_peak: int = 0
    checkpoint_terms: dict[str, int] = field(default_factory=dict)   # bytes on disk of one checkpoint tag
    checkpoint_keep: int = 1

    @property
    def checkpoint_bytes(self) -> int:
        return sum(self.checkpoint_terms.values())

    @property
    def checkpoint_disk(self) -> int:
        """``checkpoint.keep`` tags."""
        return self.checkpoint_keep * self.checkpoint_bytes

    @property
    def checkpoint_disk_peak(self) -> int:
        """While a tag is being saved the oldest of the ``keep`` is still there."""
        return (self.checkpoint_keep + 1) * self.checkpoint_bytes

    @property
    def total(self) -> int:
        return max(self.backward_peak, self.step_peak)

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.total <= self.capacity

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total, "fits": self.fits, "checkpoint_bytes": self.checkpoint_bytes,
                "checkpoint_disk": self.checkpoint_disk, "checkpoint_disk_peak": self.checkpoint_disk_peak}

    def summary(self) -> str:
        def g(x: int) -> str:
            return f"{x / GIB:8.2f} GiB"

        lines = [f"memory plan per rank: {self.world} ranks = ep {self.ep_size} x edp {self.edp_size} "
                 f"(dp {self.dp_size}), ZeRO-{self.zero_stage}, {self.dtype}, "
                 f"{self.tokens_per_micro_batch} tokens per micro-batch",
                 f"  parameters on this rank: {self.params_dense / 1e9:.2f}B non-expert + "
                 f"{self.params_expert_local / 1e9:.2f}B expert"]
        lines += [f"  {name:<28}{g(value)}" for name, value in self.terms.items()]
        lines.append(f"  {'peak (backward)':<28}{g(self.backward_peak)}")
        lines.append(f"  {'peak (optimizer step)':<28}{g(self.step_peak)}")
        if self.capacity is not None:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            lines.append(f"  {'capacity':<28}{g(self.capacity)}  -> {verdict} "
                         f"({100 * self.total / self.capacity:.0f}% used)")
        if self.checkpoint_terms:
            lines.append("disk per checkpoint (all ranks' files of one tag):")
            lines += [f"  {name:<28}{g(value)}" for name, value in self.checkpoint_terms.items()]
            lines.append(f"  {'per checkpoint':<28}{g(self.checkpoint_bytes)}")
            lines.append(f"  {f'x keep {self.checkpoint_keep}':<28}{g(self.checkpoint_disk)}  "
                         f"(peak while saving: {self.checkpoint_disk_peak / GIB:.2f} GiB)")
        return "\n".join(lines)


def checkpoint_disk_terms(cfg: TrainConfig, dense: int, experts: int) -> dict[str, int]:
    """Bytes DeepSpeed writes for one checkpoint tag of the whole job (module docstring)."""
    p = cfg.parallel
    a = 2 if p.dtype == "bf16" else 4
    total = dense + experts
    terms = {f"model weights ({p.dtype})": a * total}
    if p.zero_stage > 0 or p.dtype == "bf16":
        terms["master weights (fp32)"] = 4 * total
        terms["Adam moments (fp32)"] = 8 * total
    else:   # fp32 without ZeRO: every expert-parallel rank's full state, and rank 0's again in the main file
        local = dense + experts // p.ep_size
        terms["Adam moments (fp32)"] = 8 * local * (p.ep_size + 1)
    return terms


def plan_memory(cfg: TrainConfig, model_cfg: JambaConfig, world: int, capacity: int | None = None,
                overhead: int = 0, expert_imbalance: float = 1.0, kernels: bool = False,
                deepspeed_extra: dict[str, Any] | None = None) -> MemoryPlan:
    """The per-rank memory of training ``cfg`` on ``world`` ranks (see the module docstring)."""
    from model.params import count_parameters

    p = cfg.parallel
    if world < 1 or world % p.ep_size:
        raise ValueError(f"parallel.ep_size: {p.ep_size} must divide the number of ranks {world}")
    counts = count_parameters(model_cfg)
    experts_total = counts["part_moe_experts"]
    dense = counts["total"] - experts_total
    expert_local = experts_total // p.ep_size
    local = dense + expert_local
    edp = world // p.ep_size
    a = 2 if p.dtype == "bf16" else 4
    zero = (deepspeed_extra or {}).get("zero_optimization", {})
    bucket = int(zero.get("reduce_bucket_size", 5e8))
    overlap = bool(zero.get("overlap_comm", p.zero_stage == 2))
    # ZeRO-0 keeps full optimizer states on every rank
    partition = local if p.zero_stage == 0 else dense / world + expert_local / edp
    terms: dict[str, int] = {}
    terms["weights"] = a * local
    terms["master weights (fp32)"] = int(4 * partition)
    terms["Adam moments (fp32)"] = int(8 * partition)
    # bf16 runs accumulate and reduce gradients in parallel.grad_reduce_dtype (fp32 by default)
    g = 4 if p.dtype == "fp32" or p.grad_reduce_dtype == "fp32" else 2
    if p.zero_stage == 2:
        terms["gradients (partition)"] = int(g * partition)
    else:
        terms["gradients"] = g * local
    # contiguous gradient buckets (in the communication dtype) never hold more than the rank's gradients
    terms["reduction buckets"] = (2 if overlap else 1) * g * min(bucket, local)

    T = p.micro_batch * cfg.data.seq_len
    boundaries = cfg.data.pack == "boundaries"
    per_layer = [layer_activation_bytes(model_cfg, i, a, cfg.data.seq_len, boundaries, kernels)
                 for i in range(model_cfg.n_layers)]
    chunk = cfg.parallel.loss_chunk_tokens
    head = head_activation_bytes(model_cfg, a, chunked=chunk > 0)
    if p.activation_checkpointing:
        kept = model_cfg.n_layers * a * model_cfg.d_model + max(per_layer)   # inputs + one recomputed layer
    else:
        kept = sum(per_layer)
    terms["activations"] = T * (kept + head)
    # backward working set: the gradient of the widest layer's activations, and the logits' gradient (all
    # tokens' at once, or one recomputed chunk's with everything it needs)
    logit_tokens = min(chunk, T) if chunk > 0 else T
    logit_work = head_working_set_bytes(model_cfg, a, chunked=chunk > 0)
    terms["backward working set"] = T * max(per_layer) + logit_tokens * logit_work
    if any(model_cfg.is_attention(i) for i in range(model_cfg.n_layers)):
        # layers run one at a time in backward: one attention block's mask at a time
        terms["backward working set"] += attention_working_set_bytes(p.micro_batch, cfg.data.seq_len, a, boundaries)
    if not kernels and any(not model_cfg.is_attention(i) for i in range(model_cfg.n_layers)):
        terms["scan working set"] = scan_working_set_bytes(model_cfg, p.micro_batch, cfg.data.seq_len, boundaries)
    if p.ep_size > 1 and model_cfg.n_experts > 1:
        terms["all-to-all buffers"] = int(4 * a * model_cfg.top_k * model_cfg.d_model * T * expert_imbalance)
    terms["framework overhead"] = overhead

    states = sum(terms[k] for k in ("weights", "master weights (fp32)", "Adam moments (fp32)"))
    grads = sum(v for k, v in terms.items() if k.startswith("gradients"))
    backward = states + grads + terms["reduction buckets"] + terms["activations"] \
        + terms["backward working set"] + terms.get("scan working set", 0) + terms.get("all-to-all buffers", 0) \
        + overhead
    # bf16 gradients are converted to fp32 for the update; fp32 ones are used as they are
    step = states + grads + (0 if g == 4 else int(4 * partition)) + overhead
    return MemoryPlan(world=world, ep_size=p.ep_size, dp_size=world, edp_size=edp, zero_stage=p.zero_stage,
                      dtype=p.dtype, tokens_per_micro_batch=T, capacity=capacity, params_dense=dense,
                      params_expert_local=expert_local, terms=terms, backward_peak=int(backward),
                      step_peak=int(step), checkpoint_terms=checkpoint_disk_terms(cfg, dense, experts_total),
                      checkpoint_keep=cfg.checkpoint.keep)


def load_deepspeed_extra(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    with open(path) as fh:
        return json.load(fh)

