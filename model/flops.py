"""FLOPs per token of Jamba's forward pass, by part, for MFU and throughput analysis.

Conventions (docs/training.md, "FLOPs and MFU"):
* a multiply-add is 2 FLOPs; a linear layer of ``n_in x n_out`` costs ``2 n_in n_out`` per token;
* causal attention at sequence length ``L``: token ``t`` scores ``t + 1`` keys, so QK^T and AV cost
  ``2 * 2 * n_heads * head_dim * (L + 1) / 2`` per token on average (the quadratic term, halved for
  causality as FlashAttention's accounting does; document masks are not subtracted);
* the selective scan costs ``9 * d_inner * d_state`` per token (Mamba paper, Appendix: discretise, update,
  read out), plus the D skip and the z gate;
* MoE layers count the router and the ``top_k`` experts a token actually visits (active parameters);
* embedding lookups cost nothing; the LM head is a linear layer.
Training costs 3x the forward (backward is two matmuls per forward matmul); activation recomputation is
extra hardware work and is *not* counted in MFU (it is in "hardware FLOPs", HFU).
"""

from __future__ import annotations

from model.config import JambaConfig

SCAN_FLOPS_PER_STATE = 9


def forward_flops_per_token(cfg: JambaConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token by part at sequence length ``seq_len``."""
    d, di, n, r = cfg.d_model, cfg.d_inner, cfg.mamba_d_state, cfg.mamba_dt_rank
    kv_dim = cfg.n_kv_heads * cfg.head_dim
    parts = {"attention_proj": 0.0, "attention_scores": 0.0, "mamba_proj": 0.0, "mamba_scan": 0.0,
             "moe_router": 0.0, "moe_experts": 0.0, "mlp": 0.0, "lm_head": 2.0 * d * cfg.vocab_size}
    for layer in range(cfg.n_layers):
        if cfg.is_attention(layer):
            parts["attention_proj"] += 2.0 * (d * d + 2 * d * kv_dim + d * d)
            parts["attention_scores"] += 2.0 * 2 * d * (seq_len + 1) / 2
        else:
            parts["mamba_proj"] += 2.0 * (d * 2 * di + di * (r + 2 * n) + r * di + di * d)
            parts["mamba_scan"] += 2.0 * di * cfg.mamba_d_conv + SCAN_FLOPS_PER_STATE * di * n + 6.0 * di
        if cfg.is_moe(layer):
            parts["moe_router"] += 2.0 * d * cfg.n_experts
            parts["moe_experts"] += cfg.top_k * 2.0 * 3 * d * cfg.ffn_dim
        else:
            parts["mlp"] += 2.0 * 3 * d * cfg.ffn_dim
    return parts


def training_flops_per_token(cfg: JambaConfig, seq_len: int) -> float:
    """Model FLOPs per trained token (forward + backward = 3 x forward), the numerator of MFU."""
    return 3.0 * sum(forward_flops_per_token(cfg, seq_len).values())


# Dense bf16 tensor-core peaks (FLOP/s) of common training GPUs, by a substring of the device name.
PEAK_BF16_FLOPS = {
    "H200": 989.4e12,
    "H100 PCIe": 756.0e12,
    "H100": 989.4e12,      # SXM / HBM3
    "H800": 989.4e12,
    "A100": 312.0e12,
    "A800": 312.0e12,
    "L40S": 362.1e12,
    "B200": 2250e12,
}


def device_peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named ``device_name`` (as torch reports it), or None if unknown."""
    for key, peak in PEAK_BF16_FLOPS.items():  # "H100 PCIe" is listed before "H100"
        if key in device_name:
            return peak
    return None
