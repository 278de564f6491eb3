"""The rank model built on the meta device (train/build.py), keyed initialisation (model/init.py), lazy
checkpoint reads (model/lazy_checkpoint.py) and the collective device guard (train/device_guard.py), in one
process with a gloo world of 1. The 2- and 4-rank behaviour runs through the real launcher in
tests/test_train.py."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch

from tests.conftest import ROOT

pytest.importorskip("deepspeed")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def world_of_one():
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    # the process group stays for the session: DeepSpeed's expert groups are cached globally


@pytest.fixture(scope="module")
def tiny():
    from model import JambaConfig

    return JambaConfig.from_yaml(ROOT / "configs/model/jamba-tiny.yaml")


def _full_state(model) -> dict[str, torch.Tensor]:
    """The single-process layout of an expert-sharded model of world 1 (all experts local)."""
    state = {k: v for k, v in model.state_dict().items() if ".deepspeed_moe." not in k}
    for i, layer in enumerate(model.layers):
        if hasattr(layer.feed_forward, "local_experts"):
            for leaf in ("gate_up", "down"):
                state[f"layers.{i}.feed_forward.{leaf}"] = torch.stack(
                    [getattr(e, leaf) for e in layer.feed_forward.local_experts()])
    return state


def test_meta_build_equals_the_plain_model_with_the_same_seed(world_of_one, tiny):
    from model import Jamba
    from train.build import build_rank_model

    built = build_rank_model(tiny, 1, torch.device("cpu"), torch.float32, seed=11)
    assert not any(p.is_meta for p in built.parameters())
    plain = Jamba(tiny)
    plain.reset_parameters(11)
    ours, ref = _full_state(built), plain.state_dict()
    assert set(ours) == set(ref)
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=0, msg=key)
    ids = torch.randint(0, tiny.vocab_size, (2, 24))
    torch.testing.assert_close(built(ids).logits, plain(ids).logits, rtol=0, atol=0)
    other = Jamba(tiny)
    other.reset_parameters(12)
    assert not torch.equal(other.layers[1].feed_forward.gate_up, plain.layers[1].feed_forward.gate_up)


def test_keyed_init_of_an_expert_does_not_depend_on_the_others(tiny):
    """Expert e of a 4-expert layer has the value it has as expert e of an 8-expert layer: what lets an
    expert-parallel rank initialise only its own experts."""
    from dataclasses import replace

    from model import Jamba

    small = Jamba(tiny)
    small.reset_parameters(5)
    wide = Jamba(replace(tiny, n_experts=8))
    wide.reset_parameters(5)
    moe = next(i for i in range(tiny.n_layers) if tiny.is_moe(i))
    a, b = small.layers[moe].feed_forward, wide.layers[moe].feed_forward
    assert torch.equal(a.gate_up, b.gate_up[: tiny.n_experts]) and torch.equal(a.down, b.down[: tiny.n_experts])
    assert torch.equal(small.embed_tokens.weight, wide.embed_tokens.weight)
    # the distributions are Jamba's
    mixer = next(m for m in small.modules() if hasattr(m, "A_log"))
    torch.testing.assert_close(mixer.A_log[0], torch.log(torch.arange(1, tiny.mamba_d_state + 1.0)))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert float(dt.min()) >= 1e-3 * 0.999 and float(dt.max()) <= 0.1 * 1.001
    assert abs(float(small.embed_tokens.weight.std()) - tiny.init_std) < 0.1 * tiny.init_std


@pytest.mark.parametrize("layout", ["native", "hf"])
def test_init_from_reads_the_checkpoint_by_key(world_of_one, tiny, tmp_path, layout):
    from model import Jamba
    from model.hf import save_hf, save_native
    from model.lazy_checkpoint import CheckpointTensors
    from train.build import build_rank_model

    torch.manual_seed(3)
    source = Jamba(tiny)
    (save_native if layout == "native" else save_hf)(source, tmp_path / layout)
    reader = CheckpointTensors(tmp_path / layout)
    assert reader.config.to_dict() == tiny.to_dict()
    moe = next(i for i in range(tiny.n_layers) if tiny.is_moe(i))
    torch.testing.assert_close(reader.get(f"layers.{moe}.feed_forward.gate_up", 2),
                               source.layers[moe].feed_forward.gate_up[2], rtol=0, atol=0)
    built = build_rank_model(tiny, 1, torch.device("cpu"), torch.bfloat16, seed=0, init_from=str(tmp_path / layout))
    assert all(p.dtype == torch.bfloat16 for p in built.parameters())
    ours = _full_state(built)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(ours[key], value.to(torch.bfloat16), rtol=0, atol=0, msg=key)


def test_init_from_a_different_config_is_refused(world_of_one, tiny, tmp_path):
    from dataclasses import replace

    from model import Jamba
    from model.hf import save_native
    from train.build import build_rank_model

    save_native(Jamba(replace(tiny, n_experts=8)), tmp_path / "other")
    with pytest.raises(ValueError, match="different model config"):
        build_rank_model(tiny, 1, torch.device("cpu"), torch.float32, 0, init_from=str(tmp_path / "other"))


def test_guard_refuses_host_tensors_in_collectives(world_of_one):
    import torch.distributed as dist

    from train import device_guard

    device_guard.install(torch.device("cpu"))
    with device_guard.track_host_tensors():
        on_device = torch.tensor(1.0, device="cpu")
        dist.all_reduce(on_device)                               # made on the device: fine
        dist.all_reduce(torch.tensor(2.0).to("cpu"))             # moved to the device: fine
        dist.all_reduce(torch.ones(3, device="cpu") * torch.tensor(2.0))   # host scalar x device tensor
        with pytest.raises(device_guard.CollectiveDeviceError, match="built on the host"):
            dist.all_reduce(torch.tensor(3.0))                    # the trainer's old mean-loss line
        with pytest.raises(device_guard.CollectiveDeviceError, match="built on the host"):
            dist.all_reduce(torch.from_numpy(np.ones(2)).float() / 2)   # derived from a numpy array
        with pytest.raises(device_guard.CollectiveDeviceError, match="built on the host"):
            dist.all_gather([torch.empty(2, device="cpu")], torch.zeros(2))
    with pytest.raises(device_guard.CollectiveDeviceError, match="on meta"):
        dist.all_reduce(torch.empty(2, device="meta"))
