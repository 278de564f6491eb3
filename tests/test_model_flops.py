"""FLOPs per token: the matmul terms equal 2 x the weights a token actually multiplies (read from a built
model), attention adds its causal quadratic term, and known GPUs have their bf16 peaks."""

from __future__ import annotations

import torch
from torch import nn

from model import Jamba, JambaConfig
from model.flops import device_peak_flops, forward_flops_per_token, training_flops_per_token
from model.layers.feedforward import MoE
from tests.test_model import ROOT, tiny


def _matmul_flops_of_built_model(cfg: JambaConfig) -> float:
    """2 x (weights of every Linear + top_k experts' weights), from the real modules."""
    with torch.device("meta"):
        model = Jamba(cfg)
    total = 0.0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            total += 2.0 * module.weight.numel()
        elif isinstance(module, MoE):
            total += 2.0 * cfg.top_k * (module.gate_up[0].numel() + module.down[0].numel())
    return total


def test_matmul_flops_match_the_built_model():
    for cfg in (tiny(), JambaConfig.from_yaml(ROOT / "configs/model/jamba-v0.1.yaml")):
        parts = forward_flops_per_token(cfg, seq_len=1)
        matmuls = sum(v for k, v in parts.items() if k not in ("attention_scores", "mamba_scan"))
        assert matmuls == _matmul_flops_of_built_model(cfg)


def test_attention_term_grows_linearly_with_context_and_only_there():
    cfg = JambaConfig.from_yaml(ROOT / "configs/model/jamba-v0.1.yaml")
    short, long = forward_flops_per_token(cfg, 4096), forward_flops_per_token(cfg, 262144)
    for key in short:
        if key != "attention_scores":
            assert short[key] == long[key]
    n_attn = len(cfg.attention_layers)
    # causal: 2 matmuls x 2 FLOPs x d_model x (L + 1) / 2 per attention layer
    assert long["attention_scores"] - short["attention_scores"] == n_attn * 2 * cfg.d_model * (262144 - 4096)
    # the released model at 4K: ~6 x 12B active parameters per token, attention scores a few percent
    train = training_flops_per_token(cfg, 4096)
    assert 6 * 11.5e9 < train < 6 * 12.5e9
    assert 0.005 < 3 * short["attention_scores"] / train < 0.05


def test_known_gpu_peaks():
    assert device_peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert device_peak_flops("NVIDIA H100 PCIe") == 756.0e12
    assert device_peak_flops("NVIDIA A100-SXM4-80GB") == 312.0e12
    assert device_peak_flops("Some CPU") is None
