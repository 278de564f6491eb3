"""An analytic inference-memory model: what a Jamba-schema model needs on one device at context ``L``.

    total(L) = weights + batch * (L * kv_per_token + mamba_state) + prefill_activations(L) + reserve

* **weights** at a precision: ``bf16``/``fp32`` for everything, or ``int8``: the weight-only scheme of
  ``model/quant.py`` (int8 matrices with one float32 scale per output channel for attention projections,
  dense MLPs and MoE experts; Mamba layers, embeddings, LM head, router and norms stay bf16, as AI21
  released Jamba for int8 inference with Mamba skipped).
* **KV cache**: keys and values of the attention layers only, ``2 * n_attn_layers * n_kv_heads * head_dim``
  values per token. Byte for byte what ``HybridCache`` holds (tested).
* **Mamba state**: per sequence and constant in length: the last ``d_conv`` conv inputs (activation dtype)
  and the ``[d_inner, d_state]`` SSM state (float32, as ``HybridCache`` keeps it). Also tested byte for byte.
* **prefill activations**: an *estimate* of the peak transient working set of one forward over the prompt
  (or over one chunk of it, with chunked prefill) in a memory-efficient implementation: FlashAttention (no
  ``L x L`` scores), fused RMSNorm, Mamba kernels, a grouped MoE. Per token, the residual stream and the
  normalised sublayer input (``2 d``) plus the largest sublayer working set: attention ``2 H hd`` (queries,
  output; keys and values are the cache), Mamba ``5 d_inner + dt_rank + 2 d_state`` (x and z, conv output,
  dt, scan output, x_proj output), dense MLP ``3 F`` (SiLU(gate), up, product), MoE ``k (2 d + 3 F) + E``
  (the k token copies in and out, their expert intermediates, the router logits). Logits: the last position
  only (generation needs nothing else), or every position in the activation dtype plus a float32 copy
  (``logits="all"``, what Hugging Face's Llama/Mixtral did in early 2024).

docs/analysis.md gives the formulas and their use for the Jamba paper's Table 1 and Figure 2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from model.config import JambaConfig

GB, GIB = 10**9, 2**30
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
REGIMES = ("kv_state", "prefill_chunked", "prefill_unchunked")
SCALE_BYTES = 4      # model/quant.py keeps one float32 scale per output channel
SSM_STATE_BYTES = 4  # HybridCache keeps the SSM state in float32


def parse_size(text: str | int | float) -> int:
    """'80GB' (10^9), '80GiB' (2^30), '512MB', or a number of bytes (train/plan.py's convention)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read the size {text!r} (write e.g. 80GB or 80GiB)")
    power = "_KMGT".index(m.group(2).upper() or "_")
    return int(float(m.group(1)) * ((1024 if m.group(3) else 1000) ** power))


@dataclass
class MemorySettings:
    weights: str = "bf16"        # bf16 | fp16 | fp32 | int8
    kv_bytes: int = 2            # 16-bit KV cache, as the paper's Table 1
    act_bytes: int = 2           # activations (and the Mamba conv state) in bf16
    batch: int = 1
    prefill_chunk: int = 4096    # tokens per forward for "prefill_chunked"
    logits: str = "last"         # last | all
    reserve: int = 0             # bytes set aside (CUDA context, allocator slack); 0 in the paper's terms

    def __post_init__(self) -> None:
        if self.weights not in (*WEIGHT_BYTES, "int8"):
            raise ValueError(f"weights: must be one of bf16, fp16, fp32, int8, got {self.weights!r}")
        if self.logits not in ("last", "all"):
            raise ValueError(f"logits: must be 'last' or 'all', got {self.logits!r}")
        if self.batch < 1 or self.prefill_chunk < 1:
            raise ValueError("batch and prefill_chunk must be positive")


# ---------------------------------------------------------------------------------------------- weights
def _layer_counts(cfg: JambaConfig) -> tuple[int, int, int]:
    """(attention layers, MoE layers, dense-MLP layers)."""
    n_attn = len(cfg.attention_layers)
    n_moe = sum(cfg.is_moe(i) for i in range(cfg.n_layers))
    return n_attn, n_moe, cfg.n_layers - n_moe


def weight_bytes(cfg: JambaConfig, weights: str = "bf16") -> dict[str, int]:
    """Bytes of the weights by part, from the config's shapes (no model is built)."""
    d, hd, F, E = cfg.d_model, cfg.head_dim, cfg.ffn_dim, cfg.n_experts
    di, n, r, K = cfg.d_inner, cfg.mamba_d_state, cfg.mamba_dt_rank, cfg.mamba_d_conv
    n_attn, n_moe, n_mlp = _layer_counts(cfg)
    n_mamba = cfg.n_layers - n_attn
    q_rows, kv_rows = cfg.n_heads * hd, cfg.n_kv_heads * hd
    # (parameters, output channels) of the matrices int8 quantises
    attn = (n_attn * (q_rows * d + 2 * kv_rows * d + d * q_rows), n_attn * (q_rows + 2 * kv_rows + d))
    mlp = (n_mlp * 3 * d * F, n_mlp * (2 * F + d))
    experts = (n_moe * E * 3 * d * F, n_moe * E * (2 * F + d))
    bias = cfg.mamba_proj_bias
    mamba_one = (d * 2 * di + (2 * di if bias else 0) + di * K + (di if cfg.mamba_conv_bias else 0)
                 + di * (r + 2 * n) + r * di + di + di * n + di + di * d + (d if bias else 0) + r + 2 * n)
    kept = {
        "embedding": cfg.vocab_size * d,
        "lm_head": 0 if cfg.tie_embeddings else cfg.vocab_size * d,
        "mamba": n_mamba * mamba_one,
        "moe_router": n_moe * E * d,
        "norms": (2 * cfg.n_layers + 1) * d,
    }
    if weights == "int8":
        wide = 2  # what int8 leaves alone stays bf16
        out = {k: v * wide for k, v in kept.items()}
        for name, (params, channels) in (("attention", attn), ("dense_mlp", mlp), ("moe_experts", experts)):
            out[name] = params + SCALE_BYTES * channels
    else:
        wide = WEIGHT_BYTES[weights]
        out = {k: v * wide for k, v in kept.items()}
        for name, (params, _) in (("attention", attn), ("dense_mlp", mlp), ("moe_experts", experts)):
            out[name] = params * wide
    out["total"] = sum(out.values())
    return out


# ---------------------------------------------------------------------------------------------- cache
def kv_bytes_per_token(cfg: JambaConfig, kv_bytes: int = 2) -> int:
    """Keys + values of every attention layer for one token of one sequence."""
    return 2 * len(cfg.attention_layers) * cfg.n_kv_heads * cfg.head_dim * kv_bytes


def mamba_state_bytes(cfg: JambaConfig, act_bytes: int = 2) -> int:
    """Conv inputs + float32 SSM state of every Mamba layer, for one sequence, at any length."""
    n_mamba = cfg.n_layers - len(cfg.attention_layers)
    return n_mamba * cfg.d_inner * (cfg.mamba_d_conv * act_bytes + cfg.mamba_d_state * SSM_STATE_BYTES)


# ---------------------------------------------------------------------------------------------- activations
def activation_elements_per_token(cfg: JambaConfig) -> dict[str, int]:
    """Working set of each sublayer kind present in the model, in activation elements per token."""
    d, di = cfg.d_model, cfg.d_inner
    n_attn, n_moe, n_mlp = _layer_counts(cfg)
    sets = {}
    if n_attn:
        sets["attention"] = 2 * cfg.n_heads * cfg.head_dim
    if cfg.n_layers > n_attn:
        sets["mamba"] = 5 * di + cfg.mamba_dt_rank + 2 * cfg.mamba_d_state
    if n_mlp:
        sets["dense_mlp"] = 3 * cfg.ffn_dim
    if n_moe:
        sets["moe"] = cfg.top_k * (2 * d + 3 * cfg.ffn_dim) + cfg.n_experts
    return {"residual": 2 * d, **sets}


def prefill_activation_bytes(cfg: JambaConfig, tokens: int, settings: MemorySettings) -> int:
    """Peak transient bytes of one forward over ``tokens`` tokens of each of ``settings.batch`` sequences."""
    sets = activation_elements_per_token(cfg)
    per_token = sets["residual"] + max(v for k, v in sets.items() if k != "residual")
    rows = settings.batch * tokens
    act = rows * per_token * settings.act_bytes
    if settings.logits == "all":
        logits = rows * cfg.vocab_size * (settings.act_bytes + 4)
    else:
        logits = settings.batch * cfg.vocab_size * (settings.act_bytes + 4)
    return act + logits


# ---------------------------------------------------------------------------------------------- totals
def memory_at(cfg: JambaConfig, context: int, settings: MemorySettings, regime: str = "prefill_unchunked"
              ) -> dict[str, int]:
    """Every term at ``context`` tokens, in bytes; ``regime`` decides which activations count."""
    if regime not in REGIMES:
        raise ValueError(f"regime: must be one of {', '.join(REGIMES)}, got {regime!r}")
    weights = weight_bytes(cfg, settings.weights)["total"]
    kv = settings.batch * context * kv_bytes_per_token(cfg, settings.kv_bytes)
    state = settings.batch * mamba_state_bytes(cfg, settings.act_bytes)
    if regime == "kv_state":
        act = 0
    elif regime == "prefill_chunked":
        act = prefill_activation_bytes(cfg, min(context, settings.prefill_chunk), settings)
    else:
        act = prefill_activation_bytes(cfg, context, settings)
    total = weights + kv + state + act + settings.reserve
    return {"weights": weights, "kv_cache": kv, "mamba_state": state, "prefill_activations": act,
            "reserve": settings.reserve, "total": total}


MAX_CONTEXT = 2**40  # a search cap: beyond it, "unbounded" (e.g. a pure-Mamba model with kv_state)


def max_context(cfg: JambaConfig, budget: int, settings: MemorySettings, regime: str) -> int | None:
    """The longest context whose ``memory_at`` total fits in ``budget`` bytes: 0 when not even one token
    fits, None when the total stops growing before ``MAX_CONTEXT``. Binary search; the total is
    non-decreasing in the context."""
    def fits(length: int) -> bool:
        return memory_at(cfg, length, settings, regime)["total"] <= budget

    if not fits(1):
        return 0
    if fits(MAX_CONTEXT):
        return None
    lo, hi = 1, MAX_CONTEXT  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
