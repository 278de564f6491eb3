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
* **context parallelism** (``parallel.cp_size``, train/context_parallel.py): world = dp x cp, ZeRO still
  partitions over all ``world`` ranks; a rank holds ``micro_batch x seq_len / cp`` tokens, and every
  per-token term above is per token it holds, as without cp, except: the context-parallel Mamba mixer's
  extra tensors (``cp_mamba_bytes``: the conv input with its halo, fp32 dt sums and C for the state
  correction; on the kernel path also the PyTorch softplus, final state and gate), the states it gathers
  (``cp_state_bytes``, per Mamba layer), Ulysses attention's kv heads replicated beyond ``n_kv_heads``
  ranks and its single masked call's ``[L, L]`` mask over the whole sequence (the blocked mask working set
  spans the whole ``seq_len`` anyway), the exchange buffers of one attention layer (in the backward working
  set) and the state correction's recomputed block (``state_passing_working_set_bytes``);
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
from train.context_parallel import check_layout

GB, GIB = 10**9, 2**30
SCAN_BLOCK = 256          # model/scan.py: tokens per checkpointed scan block (one fp32 state kept per block)
DEFAULT_OVERHEAD_CUDA = 3 * GIB


def _norm(dim: int, a: int) -> int:
    # RMSNorm: float32 input (or its fp32 copy), the normalised value cast back, the weighted output
    return (4 + 2 * a) * dim


def layer_activation_bytes(cfg: JambaConfig, layer: int, act_bytes: int, seq_len: int,
                           boundaries: bool, kernels: bool = False, attn_block: int = ATTN_BLOCK,
                           cp: int = 1) -> int:
    """Bytes autograd keeps for backward, per token held by the rank, for layer ``layer`` of the model
    (pure-PyTorch path, or the mamba-ssm kernels' saved inputs when ``kernels``); ``attn_block``:
    ``model.layers.attention``'s query block for document-masked attention. ``seq_len`` is the whole
    sequence; with context parallelism (``cp`` > 1, train/context_parallel.py) the rank holds ``seq_len /
    cp`` tokens of it, and its layers are the context-parallel ones (``cp_mamba_bytes``, and Ulysses
    attention: the whole sequence for ``n_heads / cp`` heads)."""
    a, d, di, n, r = act_bytes, cfg.d_model, cfg.d_inner, cfg.mamba_d_state, cfg.mamba_dt_rank
    fp32_copy = 4 if a != 4 else 0             # x.float() is a new tensor only when x is not fp32
    total = _norm(d, a) * 2                    # input_layernorm, pre_ff_layernorm
    if cfg.is_attention(layer):
        # Ulysses: a rank holds q, k, v for the whole sequence and n_heads / cp heads, the same bytes per token
        # it holds as without cp, except that beyond n_kv_heads ranks each kv head is replicated: every rank
        # then holds one, cp kv heads' worth per token (max(n_kv, cp) = n_kv for cp <= n_kv)
        kv = max(cfg.n_kv_heads, cp) * cfg.head_dim
        if boundaries and seq_len > attn_block:
            # checkpointed query blocks keep only their inputs: q, k, v (the segment ids are the batch's, held
            # anyway); the concatenated output is not saved, its head-merged copy is (o_proj's input). No mask,
            # no log-sum-exp: backward rebuilds them one block at a time (attention_working_set_bytes)
            total += 2 * a * d + 2 * a * kv
            if cp > 1:  # under cp the blocks keep the whole sequence's gathered ids: int64, seq_len per rank
                total += 8 * cp
        else:
            # q, k, v, the attention output and its head-merged copy; log-sum-exp per head; with documents the
            # [L, L] mask, which the fused kernels (CPU flash, CUDA memory-efficient) keep as a copy in q's
            # dtype: a bytes per key per query (measured), not the bool's one; under cp a rank holds the
            # queries of the whole sequence, cp per token it holds
            total += 3 * a * d + 2 * a * kv + 4 * cfg.n_heads + (a * seq_len * cp if boundaries else 0)
    elif cp > 1:
        total += cp_mamba_bytes(cfg, a, boundaries, kernels)
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


def cp_mamba_bytes(cfg: JambaConfig, act_bytes: int, boundaries: bool, kernels: bool) -> int:
    """Per token: what ``ContextParallelMamba`` keeps for backward (its mixer only; measured on the pure path
    in tests). Against the plain mixer it keeps the conv's input with the previous rank's halo (``d_conv - 1``
    more tokens) instead of the in_proj output, and with documents the fp32 ``alive`` flags. Its tail after
    the scan (the total decay, the state correction and the gate; on the kernel path also dt's softplus and
    ``scan.final_state``) is recomputed in backward (``model/scan.py::_recomputed``), so it keeps only its
    inputs: the scan's output and a copy of z, besides the gated output out_proj keeps. On the kernel path
    (read from the code, not measured: no GPU here) ``selective_scan_fn`` runs ungated and keeps its inputs.
    The gathered per-layer states are ``cp_state_bytes``, not per token."""
    a, di, n, r = act_bytes, cfg.d_inner, cfg.mamba_d_state, cfg.mamba_dt_rank
    fp32_copy = 4 if a != 4 else 0
    tail = 3 * a * di                                         # scan output, z copy, gated output
    if not kernels:
        total = a * di                                        # conv input (halo + chunk)
        total += 2 * a * di                                   # conv output, SiLU output
        if boundaries:
            total += 2 * a * di + 4                           # the masked conv taps; alive flags (fp32)
        total += a * (r + 2 * n) + _norm(r + 2 * n, a) + 2 * a * n   # x_proj out, dt/B/C norms, B/C copies
        total += a * di + 4 * di + 4 * di                     # dt_proj out, + bias (fp32), softplus
        total += fp32_copy * (di + 2 * n)                     # fp32 copies of x, B, C for the scan
        total += 4 * di * n * 1 // SCAN_BLOCK                 # one fp32 state per checkpointed block
        return total + tail
    total = a * di                                            # conv input (halo + chunk)
    total += 2 * a * di                                       # conv output (the scan's u), x_proj's input copy
    total += (a + 4 + 2 * a) * (r + 2 * n) + 2 * a * n        # x_proj output, dt/B/C norms, B/C copies
    total += a * di                                           # dt (the kernel's contiguous delta)
    return total + tail


def cp_state_bytes(cfg: JambaConfig, micro_batch: int, cp: int) -> int:
    """Per Mamba layer (not per token): the [b, d_inner, d_state] fp32 tensors ``ContextParallelMamba`` keeps
    from its state exchange, on the last rank of the group (the worst): the gathered final state and total
    decay of each earlier rank (2 (cp - 1); ``chain_states`` keeps them for backward), the cp chained states,
    and its own total decay: 3 cp - 1 of them (measured)."""
    return (3 * cp - 1) * micro_batch * cfg.d_inner * cfg.mamba_d_state * 4 if cp > 1 else 0


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


def state_passing_working_set_bytes(cfg: JambaConfig, micro_batch: int, local_tokens: int) -> int:
    """Context parallelism's Mamba backward: ``scan.state_correction`` (and on the kernel path
    ``scan.final_state``) recompute one block of 256 tokens at a time; a block keeps 2 fp32 tensors of
    [b, d_inner, block, d_state] for its backward (measured in tests) while about 3 more hold their
    gradients. Added to the scan's working set, although the two run one after the other (a small
    overestimate)."""
    unit = micro_batch * cfg.d_inner * min(local_tokens, SCAN_BLOCK) * cfg.mamba_d_state * 4
    return (2 + 3) * unit


def cp_exchange_bytes(cfg: JambaConfig, act_bytes: int, cp: int) -> int:
    """Per token held: Ulysses' all-to-all buffers of one attention layer, transient (forward, and the same
    again for the gradients in backward): the contiguous send copy and the receive buffer of q, k and v
    (kv replicated beyond n_kv_heads ranks); the output's exchange back is smaller (one of d). The plan
    counts them in that layer's backward working set (read from the code: ``all_to_all_single`` keeps
    nothing for backward, so they are not in autograd's saved tensors)."""
    kv = max(cfg.n_kv_heads, cp) * cfg.head_dim
    return 2 * act_bytes * (cfg.d_model + 2 * kv)


@dataclass
class MemoryPlan:
    world: int
    ep_size: int
    dp_size: int              # data-parallel replicas: world / cp_size (ZeRO partitions over all ``world`` ranks)
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
    cp_size: int = 1          # context parallelism: each sample's sequence split over cp ranks
    seq_len: int = 0          # tokens per sample (tokens_per_micro_batch = micro_batch x seq_len / cp_size)

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

        context = f" (1/{self.cp_size} of each {self.seq_len}-token sequence)" if self.cp_size > 1 else ""
        lines = [f"memory plan per rank: {self.world} ranks = dp {self.dp_size} x cp {self.cp_size}, "
                 f"ep {self.ep_size} x edp {self.edp_size}, ZeRO-{self.zero_stage} over {self.world}, {self.dtype}, "
                 f"{self.tokens_per_micro_batch} tokens per micro-batch{context}",
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
    # cp divides the world and seq_len, leaves at least the conv halo per rank, and splits the heads (one-line
    # errors naming parallel.cp_size, the same the trainer gives before making any group)
    check_layout(p.cp_size, world, cfg.data.seq_len, model_cfg)
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

    # context parallelism: a rank holds seq_len / cp tokens of each of its micro_batch samples
    cp, L = p.cp_size, cfg.data.seq_len
    T = p.micro_batch * L // cp
    boundaries = cfg.data.pack == "boundaries"
    per_layer = [layer_activation_bytes(model_cfg, i, a, L, boundaries, kernels, cp=cp)
                 for i in range(model_cfg.n_layers)]
    chunk = cfg.parallel.loss_chunk_tokens
    head = head_activation_bytes(model_cfg, a, chunked=chunk > 0)
    if p.activation_checkpointing:
        kept = model_cfg.n_layers * a * model_cfg.d_model + max(per_layer)   # inputs + one recomputed layer
    else:
        kept = sum(per_layer)
    terms["activations"] = T * (kept + head)
    n_mamba = sum(not model_cfg.is_attention(i) for i in range(model_cfg.n_layers))
    n_attention = model_cfg.n_layers - n_mamba
    if cp > 1 and n_mamba:
        # per Mamba layer, not per token: every layer's under plain autograd, the recomputed one's under
        # activation checkpointing
        held = 1 if p.activation_checkpointing else n_mamba
        terms["gathered Mamba states (cp)"] = held * cp_state_bytes(model_cfg, p.micro_batch, cp)
    # backward working set: the gradient of the widest layer's activations, and the logits' gradient (all
    # tokens' at once, or one recomputed chunk's with everything it needs). Under cp an attention layer's
    # backward also holds its Ulysses exchange buffers (transient, that layer's only): counted with that
    # layer, which is then the widest only if they make it so
    logit_tokens = min(chunk, T) if chunk > 0 else T
    logit_work = head_working_set_bytes(model_cfg, a, chunked=chunk > 0)
    exchange = cp_exchange_bytes(model_cfg, a, cp) if cp > 1 else 0
    widest = max(per_layer[i] + (exchange if model_cfg.is_attention(i) else 0) for i in range(model_cfg.n_layers))
    terms["backward working set"] = T * widest + logit_tokens * logit_work
    if n_attention:
        # layers run one at a time in backward: one attention block's mask at a time; a rank attends over the
        # whole sequence under cp too (its mask spans all seq_len keys, whatever cp)
        terms["backward working set"] += attention_working_set_bytes(p.micro_batch, L, a, boundaries)
    if not kernels and n_mamba:
        terms["scan working set"] = scan_working_set_bytes(model_cfg, p.micro_batch, L // cp, boundaries)
    if cp > 1 and n_mamba:
        terms["state-passing working set"] = state_passing_working_set_bytes(model_cfg, p.micro_batch, L // cp)
    if p.ep_size > 1 and model_cfg.n_experts > 1:
        terms["all-to-all buffers"] = int(4 * a * model_cfg.top_k * model_cfg.d_model * T * expert_imbalance)
    terms["framework overhead"] = overhead

    states = sum(terms[k] for k in ("weights", "master weights (fp32)", "Adam moments (fp32)"))
    grads = sum(v for k, v in terms.items() if k.startswith("gradients"))
    backward = states + grads + terms["reduction buckets"] + terms["activations"] \
        + terms.get("gathered Mamba states (cp)", 0) + terms["backward working set"] \
        + terms.get("scan working set", 0) + terms.get("state-passing working set", 0) \
        + terms.get("all-to-all buffers", 0) + overhead
    # bf16 gradients are converted to fp32 for the update; fp32 ones are used as they are
    step = states + grads + (0 if g == 4 else int(4 * partition)) + overhead
    return MemoryPlan(world=world, ep_size=p.ep_size, dp_size=world // cp, edp_size=edp, zero_stage=p.zero_stage,
                      dtype=p.dtype, tokens_per_micro_batch=T, capacity=capacity, params_dense=dense,
                      params_expert_local=expert_local, terms=terms, backward_peak=int(backward),
                      step_peak=int(step), checkpoint_terms=checkpoint_disk_terms(cfg, dense, experts_total),
                      checkpoint_keep=cfg.checkpoint.keep, cp_size=cp, seq_len=L)


def load_deepspeed_extra(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    with open(path) as fh:
        return json.load(fh)

