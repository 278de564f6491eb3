"""The memory model: weights from the config's shapes equal the built (and int8-quantised) model's bytes; the
KV and Mamba-state terms equal what ``HybridCache`` actually allocates, byte for byte; the fit search is
monotone and consistent with the totals it searches."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from model import Jamba, JambaConfig
from model.memory import (
    REGIMES,
    MemorySettings,
    kv_bytes_per_token,
    mamba_state_bytes,
    max_context,
    memory_at,
    parse_size,
    weight_bytes,
)
from model.params import count_parameters
from model.quant import model_bytes, quantize_int8
from tests.test_model import ROOT, tiny

PAPER_CONFIGS = ("jamba-v0.1", "llama-2-7b", "llama-2-70b", "mistral-7b", "mixtral-8x7b")


def small_version(cfg: JambaConfig, n_layers: int = 3) -> JambaConfig:
    """The same layout (attention/Mamba pattern, MoE pattern, experts, GQA ratio) at CPU-test width."""
    per_block = min(cfg.layers_per_block, 8)
    group = cfg.n_heads // cfg.n_kv_heads
    heads = group * max(1, 4 // group)
    kv = heads // group
    blocks = max(1, n_layers // per_block) if per_block > 1 else n_layers
    return replace(cfg, d_model=32, n_heads=heads, n_kv_heads=kv, ffn_dim=48, vocab_size=97, n_blocks=blocks,
                   layers_per_block=per_block, mamba_dt_rank=None, mamba_d_state=4)


def small_configs() -> dict[str, JambaConfig]:
    configs = {name: small_version(JambaConfig.from_yaml(ROOT / f"configs/model/{name}.yaml"))
               for name in PAPER_CONFIGS}
    configs["jamba-tiny"] = tiny()
    # no attention layer at all (attention would be layer 3 of 4, but a block has 2 layers): state only
    configs["mamba-only"] = replace(tiny(), n_blocks=1, layers_per_block=2, attn_period=4, attn_offset=3)
    return configs


@pytest.mark.parametrize("name", PAPER_CONFIGS + ("jamba-tiny",))
def test_weight_bytes_match_parameter_counts(name):
    cfg = JambaConfig.from_yaml(ROOT / f"configs/model/{name}.yaml")
    counts = count_parameters(cfg)
    for precision, size in (("fp32", 4), ("bf16", 2)):
        w = weight_bytes(cfg, precision)
        assert w["total"] == size * counts["total"]
        for part in ("embedding", "lm_head", "attention", "mamba", "moe_experts", "moe_router", "dense_mlp"):
            assert w[part] == size * counts[f"part_{part}"], part


@pytest.mark.parametrize("name", ["jamba-tiny", "llama-2-70b", "mixtral-8x7b"])
def test_weight_bytes_equal_the_built_models_bytes(name):
    cfg = tiny() if name == "jamba-tiny" else small_version(JambaConfig.from_yaml(ROOT / f"configs/model/{name}.yaml"))
    torch.manual_seed(0)
    model = Jamba(cfg)
    assert model_bytes(model) == weight_bytes(cfg, "fp32")["total"]
    assert model_bytes(quantize_int8(model)) == weight_bytes(cfg, "int8")["total"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_and_state_terms_equal_the_generation_cache_byte_for_byte(dtype):
    torch.manual_seed(0)
    batch, prefill, steps = 2, 11, 4
    for name, cfg in small_configs().items():
        model = Jamba(cfg).to(dtype).eval()
        size = torch.empty(0, dtype=dtype).element_size()
        settings = MemorySettings(kv_bytes=size, act_bytes=size, batch=batch)
        cache = model.new_cache()
        with torch.no_grad():
            model(torch.randint(0, cfg.vocab_size, (batch, prefill)), cache=cache)
            for _ in range(steps):
                model(torch.randint(0, cfg.vocab_size, (batch, 1)), cache=cache)
        held = cache.nbytes()
        predicted = memory_at(cfg, prefill + steps, settings, "kv_state")
        assert held["kv"] == predicted["kv_cache"], name
        assert held["mamba_state"] == predicted["mamba_state"], name
        # independently: K and V of [b, n_kv, L, head_dim] per attention layer
        assert held["kv"] == (2 * len(cfg.attention_layers) * batch * cfg.n_kv_heads * (prefill + steps)
                              * cfg.head_dim * size)
    assert mamba_state_bytes(small_configs()["llama-2-7b"]) == 0
    assert kv_bytes_per_token(small_configs()["mamba-only"]) == 0


def test_parse_size():
    assert parse_size("80GB") == 80 * 10**9 and parse_size("80GiB") == 80 * 2**30
    assert parse_size("512MiB") == 512 * 2**20 and parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot read the size"):
        parse_size("eighty")


def test_totals_grow_with_context_and_chunking_caps_activations():
    cfg = JambaConfig.from_yaml(ROOT / "configs/model/jamba-v0.1.yaml")
    s = MemorySettings(weights="int8", prefill_chunk=2048)
    prev = None
    for L in (1, 100, 2048, 2049, 10_000, 262_144):
        m = {r: memory_at(cfg, L, s, r) for r in REGIMES}
        assert m["kv_state"]["total"] <= m["prefill_chunked"]["total"] <= m["prefill_unchunked"]["total"]
        if prev is not None:
            assert all(m[r]["total"] >= prev[r]["total"] for r in REGIMES)
        prev = m
    assert (memory_at(cfg, 10_000, s, "prefill_chunked")["prefill_activations"]
            == memory_at(cfg, 2048, s, "prefill_unchunked")["prefill_activations"])
    more = replace(s, logits="all")
    assert (memory_at(cfg, 4096, more, "prefill_unchunked")["prefill_activations"]
            - memory_at(cfg, 4096, s, "prefill_unchunked")["prefill_activations"]
            == (4096 - 1) * cfg.vocab_size * (2 + 4))


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_fit_search_is_exact_and_monotone(name):
    cfg = JambaConfig.from_yaml(ROOT / f"configs/model/{name}.yaml")
    settings = MemorySettings(weights="int8", prefill_chunk=4096)
    weights = weight_bytes(cfg, "int8")["total"]
    for regime in REGIMES:
        previous = 0
        for budget in (weights // 2, weights + 2 * 2**30, parse_size("80GB"), parse_size("80GiB"), parse_size("141GB")):
            found = max_context(cfg, budget, settings, regime)
            assert found is not None and found >= previous
            previous = found
            if found:
                assert memory_at(cfg, found, settings, regime)["total"] <= budget
            assert memory_at(cfg, found + 1, settings, regime)["total"] > budget
    # KV + state only has a closed form
    budget = parse_size("80GB")
    closed = (budget - weights - mamba_state_bytes(cfg)) // kv_bytes_per_token(cfg)
    assert max_context(cfg, budget, settings, "kv_state") == closed



def test_fit_without_attention_is_unbounded_in_kv_state():
    cfg = small_configs()["mamba-only"]
    assert max_context(cfg, parse_size("1GB"), MemorySettings(), "kv_state") is None
    assert max_context(cfg, 10, MemorySettings(), "kv_state") == 0
    assert max_context(cfg, parse_size("1GB"), MemorySettings(), "prefill_unchunked") > 0
