"""INT8 weight-only quantisation: per-row rounding bounds, what is (not) quantised, memory, and logits
within a documented tolerance of bf16 (docs/analysis.md, "INT8 weights")."""

from __future__ import annotations

import copy

import torch
from torch import nn

from model import Jamba
from model.layers.feedforward import MoE
from model.quant import Int8Linear, Int8MoE, model_bytes, quantize_int8, quantize_rows
from tests.test_model import tiny

# int8's logit error against the bf16 model, as relative RMS (||a - b|| / ||b||): at most this absolute bound
# and at most this multiple of bf16's own rounding error against float32 (measured on jamba-tiny: 0.9-1.2 %,
# 1.0-1.5x). See docs/analysis.md.
INT8_VS_BF16_MAX = 0.03
INT8_VS_BF16_OVER_BF16_ROUNDING_MAX = 2.5


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_rows_round_to_the_nearest_step():
    torch.manual_seed(0)
    w = torch.randn(3, 5, 64) * torch.rand(3, 5, 1) * 4
    w[0, 0] = 0.0  # an all-zero row stays zero
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (3, 5) and q.abs().max() == 127
    deq = q.float() * scale[..., None]
    assert torch.all((deq - w).abs() <= scale[..., None] / 2 + 1e-7)
    assert torch.all(q[0, 0] == 0)
    # the largest entry of every non-zero row is exactly +-127 steps
    assert torch.all(q.abs().amax(-1).flatten()[1:] == 127)


def test_what_is_quantised_and_what_is_not():
    torch.manual_seed(0)
    model = Jamba(tiny())
    reference = copy.deepcopy(model)
    quantize_int8(model)
    for layer, ref in zip(model.layers, reference.layers):
        if layer.kind == "attention":
            assert all(isinstance(getattr(layer.self_attn, n), Int8Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        else:  # Mamba untouched, in bf16
            assert isinstance(layer.mamba.in_proj, nn.Linear) and layer.mamba.in_proj.weight.dtype == torch.bfloat16
            assert torch.equal(layer.mamba.in_proj.weight, ref.mamba.in_proj.weight.to(torch.bfloat16))
        if isinstance(ref.feed_forward, MoE):
            ff = layer.feed_forward
            assert isinstance(ff, Int8MoE) and ff.router.weight.dtype == torch.bfloat16
            deq = ff.gate_up_int8.float() * ff.gate_up_scale[..., None]
            assert (deq - ref.feed_forward.gate_up).abs().max() <= ff.gate_up_scale.max() / 2 + 1e-7
        else:
            assert isinstance(layer.feed_forward.down_proj, Int8Linear)
            lin = layer.feed_forward.down_proj
            assert (lin.dequantized() - ref.feed_forward.down_proj.weight).abs().max() <= lin.scale.max() / 2 + 1e-7
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.embed_tokens.weight.dtype == torch.bfloat16
    assert model_bytes(model) < 0.8 * model_bytes(reference) / 2  # well under the bf16 model


def test_int8_logits_within_tolerance_of_bf16_and_decoding_with_the_cache_agrees():
    torch.manual_seed(0)
    model = Jamba(tiny()).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 48))
    with torch.no_grad():
        fp32 = model(ids).logits
        bf16 = copy.deepcopy(model).to(torch.bfloat16)(ids).logits
        q = quantize_int8(copy.deepcopy(model))
        int8 = q(ids).logits
        q32 = quantize_int8(copy.deepcopy(model), dtype=torch.float32)
        int8_fp32 = q32(ids).logits
        # prefill + one-token steps with the cache equal the full forward (float32 activations)
        cache = q32.new_cache()
        steps = [q32(ids[:, :40], cache=cache).logits]
        steps += [q32(ids[:, t:t + 1], cache=cache).logits for t in range(40, 48)]
    bf16_rounding = rel_rms(bf16, fp32)
    err = rel_rms(int8, bf16)
    assert err < INT8_VS_BF16_MAX
    assert err < INT8_VS_BF16_OVER_BF16_ROUNDING_MAX * bf16_rounding
    # int8 weights alone (float32 activations) cost about as much as bf16 rounding
    assert rel_rms(int8_fp32, fp32) < INT8_VS_BF16_OVER_BF16_ROUNDING_MAX * bf16_rounding
    assert rel_rms(torch.cat(steps, 1), int8_fp32) < 1e-5
