"""The streaming export on DeepSpeed-layout files written here with torch.save (the same names and keys as
DeepSpeed's `save_checkpoint` with this trainer's expert-parallel MoE; tests/test_train.py exports real ones):
sharded outputs equal the model, experts by global id, errors before anything is written, atomic outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model import Jamba, JambaConfig
from model.hf import CheckpointError, load_hf, load_native, read_safetensors
from train.export import ExportError, export_checkpoint

PREFIX = "deepspeed_moe.experts.deepspeed_experts"


def small() -> JambaConfig:
    return JambaConfig(vocab_size=257, d_model=48, n_heads=4, n_kv_heads=2, ffn_dim=80, mamba_d_state=8,
                       mamba_dt_rank=6, n_blocks=1, layers_per_block=8, attn_period=8, attn_offset=4,
                       expert_period=2, expert_offset=1, n_experts=4, top_k=2)


def write_deepspeed_layout(model: Jamba, root: Path, tag: str = "step5", dtype=torch.float32) -> Path:
    cfg = model.cfg
    state = {k: v.detach().to(dtype).clone() for k, v in model.state_dict().items()}
    directory = root / tag
    directory.mkdir(parents=True)
    module = {}
    moe = [i for i in range(cfg.n_layers) if cfg.is_moe(i)]
    for key, value in state.items():
        layer = next((i for i in moe if key in (f"layers.{i}.feed_forward.gate_up", f"layers.{i}.feed_forward.down")),
                     None)
        if layer is None:
            module[key] = value
    torch.save({"module": module, "step": 5, "sampler": {"drawn": 10}, "model_config": cfg.to_dict(),
                "ds_version": "test"}, directory / "mp_rank_00_model_states.pt")
    for m, i in enumerate(moe):
        for g in range(cfg.n_experts):
            torch.save({f"layers.{i}.feed_forward.{PREFIX}.{g}.{name}": state[f"layers.{i}.feed_forward.{name}"][g]
                        .clone() for name in ("gate_up", "down")},
                       directory / f"layer_{m}_expert_{g}_mp_rank_00_model_states.pt")
    (root / "latest").write_text(tag)
    return directory


@pytest.fixture
def trained(tmp_path):
    torch.manual_seed(0)
    model = Jamba(small()).eval()
    write_deepspeed_layout(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_sharded_native_and_hf_equal_the_model(trained, tmp_path):
    model, ckpt = trained
    summary = export_checkpoint(ckpt, to_hf=tmp_path / "hf", native=tmp_path / "native")
    assert summary["step"] == 5 and summary["dtype"] == "float32"
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())
    n_moe = 4
    assert summary["shards"] == n_moe + 1     # one per MoE layer, then the final norm and LM head
    for out in ("hf", "native"):
        index = json.loads((tmp_path / out / "model.safetensors.index.json").read_text())
        assert sorted(set(index["weight_map"].values())) == [f"model-{k:05d}-of-00005.safetensors"
                                                             for k in range(1, 6)]
        assert not list(tmp_path.glob(".*partial*"))
    # each MoE layer's experts are in the shard of that layer, alone with its layer's neighbours
    index = json.loads((tmp_path / "native/model.safetensors.index.json").read_text())["weight_map"]
    assert index["layers.1.feed_forward.gate_up"] == index["layers.1.feed_forward.router.weight"]
    assert index["layers.1.feed_forward.gate_up"] != index["layers.3.feed_forward.gate_up"]
    ids = torch.randint(0, 257, (1, 17))
    with torch.no_grad():
        want = model(ids).logits
        assert torch.equal(load_native(tmp_path / "native")(ids).logits, want)
        assert torch.equal(load_hf(tmp_path / "hf")(ids).logits, want)
    # global expert 2 of MoE layer 1 (model layer 3) is stacked at index 2
    native = read_safetensors(tmp_path / "native")
    expert = torch.load(ckpt / "step5/layer_1_expert_2_mp_rank_00_model_states.pt", weights_only=True)
    assert torch.equal(native["layers.3.feed_forward.down"][2], expert[f"layers.3.feed_forward.{PREFIX}.2.down"])
    hf = read_safetensors(tmp_path / "hf")
    gate_up = expert[f"layers.3.feed_forward.{PREFIX}.2.gate_up"]
    assert torch.equal(hf["model.layers.3.feed_forward.experts.2.up_proj.weight"], gate_up[80:])


def test_transformers_loads_the_sharded_export(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, ckpt = trained
    export_checkpoint(ckpt, to_hf=tmp_path / "hf")
    hf = transformers.JambaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 257, (1, 17))
    with torch.no_grad():
        want = model(ids).logits
        assert ((hf(ids).logits - want).abs().max() / want.abs().max()).item() < 1e-4


def test_the_checkpoint_dtype_is_kept(tmp_path):
    torch.manual_seed(1)
    model = Jamba(small())
    write_deepspeed_layout(model, tmp_path / "ckpt", dtype=torch.bfloat16)
    summary = export_checkpoint(tmp_path / "ckpt", to_hf=tmp_path / "hf", native=tmp_path / "native")
    assert summary["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "hf/config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in read_safetensors(tmp_path / "native").values()} == {torch.bfloat16}
    assert {t.dtype for t in read_safetensors(tmp_path / "hf").values()} == {torch.bfloat16}


def test_nested_outputs_and_overwrite(trained, tmp_path):
    _, ckpt = trained
    final = tmp_path / "final"
    export_checkpoint(ckpt, to_hf=final / "hf", native=final)
    assert (final / "config.json").exists() and (final / "hf" / "config.json").exists()
    with pytest.raises(ExportError, match="exists; pass --overwrite"):
        export_checkpoint(ckpt, to_hf=final / "hf", native=final)
    (final / "stale.safetensors").write_bytes(b"")
    export_checkpoint(ckpt, to_hf=final / "hf", native=final, overwrite=True)
    assert not (final / "stale.safetensors").exists()     # replaced whole, not merged
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="is not a checkpoint"):
        export_checkpoint(ckpt, to_hf=precious, overwrite=True)
    assert (precious / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".*"))


def test_errors_come_before_any_output(trained, tmp_path):
    _, ckpt = trained
    with pytest.raises(ExportError, match="must be different directories"):
        export_checkpoint(ckpt, to_hf=tmp_path / "a", native=tmp_path / "a" / ".")
    wrong = JambaConfig(**{**small().to_dict(), "mamba_d_state": 16})   # --model that is not the checkpoint's
    with pytest.raises(ExportError, match=r"layers.0.mamba.A_log: shape \(96, 8\) != \(96, 16\) expected"):
        export_checkpoint(ckpt, to_hf=tmp_path / "hf", model_cfg=wrong)
    (ckpt / "step5/layer_3_expert_1_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(ExportError, match=r"layers.7.feed_forward \(MoE layer 3\): experts \[1\] are missing"):
        export_checkpoint(ckpt, to_hf=tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_failure_mid_export_leaves_no_output(trained, tmp_path):
    _, ckpt = trained
    # the last MoE layer's expert is corrupt: found only when that layer is read, after 3 shards are written
    torch.save({f"layers.7.feed_forward.{PREFIX}.0.gate_up": torch.zeros(3, 3)},
               ckpt / "step5/layer_3_expert_0_mp_rank_00_model_states.pt")
    with pytest.raises(ExportError, match=r"layer_3_expert_0.*shape \(3, 3\) != \(160, 48\)"):
        export_checkpoint(ckpt, to_hf=tmp_path / "hf", native=tmp_path / "native")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_shard_missing_a_tensor_of_its_index_is_named(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    _, ckpt = trained
    export_checkpoint(ckpt, native=tmp_path / "native")
    shard = tmp_path / "native" / "model-00005-of-00005.safetensors"
    tensors = load_file(shard)
    tensors.pop("final_layernorm.weight")
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match="model-00005-of-00005.safetensors: final_layernorm.weight is in"):
        load_native(tmp_path / "native")
