"""Parity with transformers' JambaForCausalLM (pure-PyTorch path, float32, CPU), both directions, on several
layouts; checkpoint errors name the key or file."""

from __future__ import annotations

import json

import pytest
import torch

from model import Jamba, JambaConfig
from model.hf import CheckpointError, from_hf_state_dict, load_hf, load_native, save_hf, save_native

transformers = pytest.importorskip("transformers")

LAYOUTS = {
    "released-like": dict(n_blocks=1, layers_per_block=8, attn_period=8, attn_offset=4, expert_period=2,
                          expert_offset=1, n_experts=4, top_k=2),
    "attn-first": dict(n_blocks=2, layers_per_block=3, attn_period=3, attn_offset=0, expert_period=3,
                       expert_offset=2, n_experts=3, top_k=2),
    "moe-even-top1": dict(n_blocks=2, layers_per_block=4, attn_period=4, attn_offset=1, expert_period=2,
                          expert_offset=0, n_experts=5, top_k=1),
}


def small(**layout) -> JambaConfig:
    return JambaConfig(vocab_size=257, d_model=48, n_heads=4, n_kv_heads=2, ffn_dim=80, mamba_d_state=8,
                       mamba_dt_rank=6, **layout)


def hf_model(cfg: JambaConfig):
    hf_cfg = transformers.JambaConfig(**{k: v for k, v in cfg.to_hf().items() if k != "architectures"})
    return transformers.JambaForCausalLM(hf_cfg).eval()


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_hf_to_ours_logits_loss_and_aux(layout):
    torch.manual_seed(0)
    cfg = small(**LAYOUTS[layout])
    hf = hf_model(cfg)
    ours = Jamba(cfg).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    ids = torch.randint(0, cfg.vocab_size, (2, 45))
    with torch.no_grad():
        want = hf(ids, labels=ids, output_router_logits=True)
        got = ours(ids, labels=ids, output_router_logits=True)
    assert rel(got.logits, want.logits) <= 1e-4
    assert abs(got.aux_loss.item() - want.aux_loss.item()) <= 1e-5 * abs(want.aux_loss.item())
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5 * abs(want.loss.item())
    assert [c.is_moe(i) for c in [cfg] for i in range(cfg.n_layers)] == [n > 1 for n in hf.config.layers_num_experts]
    assert [layer.kind for layer in ours.layers] == hf.config.layers_block_type


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_ours_to_hf_files_loaded_by_transformers(layout, tmp_path):
    torch.manual_seed(1)
    cfg = small(**LAYOUTS[layout])
    ours = Jamba(cfg).eval()
    save_hf(ours, tmp_path)
    keys = json.loads((tmp_path / "config.json").read_text())
    assert keys["model_type"] == "jamba"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        names = set(fh.keys())
    moe_layer = next(i for i in range(cfg.n_layers) if cfg.is_moe(i))
    assert f"model.layers.{moe_layer}.feed_forward.experts.0.gate_proj.weight" in names  # per-expert on disk
    hf = transformers.JambaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 30))
    with torch.no_grad():
        assert rel(hf(ids).logits, ours(ids).logits) <= 1e-4
    # and transformers' own save round-trips through our loader
    hf.save_pretrained(tmp_path / "resaved")
    again = load_hf(tmp_path / "resaved").eval()
    with torch.no_grad():
        assert rel(again(ids).logits, ours(ids).logits) <= 1e-6


def test_aux_loss_is_two_when_balanced_and_grows_when_not():
    from model.layers.feedforward import load_balancing_loss

    E, k, T = 8, 2, 64
    tokens = torch.arange(T)
    balanced = torch.zeros(T, E)
    balanced[tokens, tokens % E] = 5.0  # each token strongly prefers two experts; every expert equally used
    balanced[tokens, (tokens + 1) % E] = 5.0
    assert abs(load_balancing_loss([balanced], E, k).item() - 2.0) < 1e-5
    skewed = torch.zeros(T, E)
    skewed[:, :2] = 5.0  # everyone to experts 0 and 1
    assert load_balancing_loss([skewed], E, k).item() > 7.5
    # padding is excluded, as HF's attention_mask does
    mask = torch.ones(2 * T)
    mask[T:] = 0
    both = torch.cat([balanced, skewed])
    assert abs(load_balancing_loss([both], E, k, mask).item() - 2.0) < 1e-5


def test_native_checkpoint_round_trip_and_errors(tmp_path):
    torch.manual_seed(2)
    cfg = small(**LAYOUTS["released-like"])
    model = Jamba(cfg)
    save_native(model, tmp_path / "ck")
    loaded = load_native(tmp_path / "ck")
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)

    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "ck" / "model.safetensors"))
    missing = dict(state)
    missing.pop("layers.3.mamba.A_log")
    save_file(missing, str(tmp_path / "ck" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing key layers.3.mamba.A_log"):
        load_native(tmp_path / "ck")
    wrong = dict(state)
    wrong["final_layernorm.weight"] = torch.ones(7)
    save_file(wrong, str(tmp_path / "ck" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"final_layernorm.weight: shape \(7,\) != expected \(48,\)"):
        load_native(tmp_path / "ck")


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "jamba"}))
    torch.save({"x": torch.ones(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: pickle-based checkpoints are refused"):
        load_hf(tmp_path)


def test_missing_expert_is_named():
    cfg = small(**LAYOUTS["released-like"])
    hf_state = {f"model.{k}": v for k, v in Jamba(cfg).state_dict().items() if "feed_forward.gate_up" not in k
                and "feed_forward.down" not in k}
    for e in range(cfg.n_experts - 1):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            hf_state[f"model.layers.1.feed_forward.experts.{e}.{proj}.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"layers.1.feed_forward.experts.3.gate_proj.weight: missing"):
        from_hf_state_dict(hf_state, cfg)
