"""Context parallelism in real process groups (gloo, one process per rank, no launcher): a tiny Jamba whose
sequence is split over cp ranks gives the unsplit model's losses (LM, load-balancing, z) on every rank and,
summed over the ranks, cp times its gradient for every parameter, with documents crossing rank boundaries
and starting exactly at them, with and without activation checkpointing; layouts it cannot run are refused
with the key named. The launcher tests (cp with DeepSpeed, cp x ep, resume) are in tests/test_train.py."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from tests.conftest import ROOT

L = 64
# row 0: documents cross the cp=2 and cp=4 boundaries (16, 32, 48); row 1: documents start exactly on them
DOC_LENGTHS = [[10, 30, 5, 19], [16, 16, 20, 12]]
AUX, Z = 0.01, 0.001
# worst |difference| / max |gradient| per parameter; bf16: both models round in bf16, in different orders
GRAD_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
LOSS_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-3}


def _batch(vocab: int, boundaries: bool):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (2, L), generator=g)
    targets = torch.randint(0, vocab, (2, L), generator=g)
    targets[0, 5] = targets[1, 40] = -100
    segment = torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in DOC_LENGTHS])
    return ids, targets, (segment if boundaries else None)


def _total(lm, aux, z):
    return lm + AUX * aux + Z * z


def _worker(rank: int, world: int, cp_size: int, port: int, boundaries: bool, checkpointing: bool, results,
            dtype: torch.dtype = torch.float32) -> None:
    import torch.distributed as dist

    from model import Jamba, JambaConfig
    from model.layers.feedforward import router_z_loss
    from train.context_parallel import EXCHANGED, apply_context_parallel, make_groups, replica_losses

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = JambaConfig.from_yaml(ROOT / "configs/model/jamba-tiny.yaml")
    ids, targets, segment = _batch(cfg.vocab_size, boundaries)

    torch.manual_seed(0)
    reference = Jamba(cfg).to(dtype)
    out = reference(ids, segment=segment, output_router_logits=True, targets=targets, loss_reduction="sum")
    lm_ref = out.lm_loss / (targets != -100).sum()
    want = (float(lm_ref), float(out.aux_loss), float(router_z_loss(out.router_logits)))
    _total(lm_ref, out.aux_loss, router_z_loss(out.router_logits)).backward()

    torch.manual_seed(0)
    model = Jamba(cfg).to(dtype)
    model.activation_checkpointing = checkpointing
    model.train()
    cp = make_groups(cp_size)
    apply_context_parallel(model, cp)
    part = slice(cp.rank * L // cp_size, (cp.rank + 1) * L // cp_size)
    out = model(ids[:, part], segment=None if segment is None else segment[:, part], output_router_logits=True,
                targets=targets[:, part], loss_reduction="sum")
    EXCHANGED.clear()
    lm, aux, z = replica_losses(out, targets[:, part], cfg.n_experts, cfg.top_k, cp, z_loss=True)
    _total(lm, aux, z).backward()
    worst, tolerance = 0.0, GRAD_TOLERANCE[dtype]
    for (name, p), (_, p_ref) in zip(model.named_parameters(), reference.named_parameters()):
        grad = p.grad.float()
        dist.all_reduce(grad, group=cp.group)   # what DeepSpeed's average over the cp ranks sees, times cp
        err = float((grad / cp_size - p_ref.grad.float()).abs().max() / p_ref.grad.float().abs().max().clamp_min(1e-30))
        worst = max(worst, err)
        if err > tolerance:
            results[f"{rank}:{name}"] = err
    results[rank] = {"losses": (float(lm), float(aux), float(z)), "want": want, "worst_grad_rel": worst}
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(("world", "cp_size", "boundaries", "checkpointing", "dtype"),
                         [(4, 2, True, False, torch.float32), (2, 2, False, True, torch.float32),
                          (4, 4, True, True, torch.float32), (2, 2, True, True, torch.bfloat16)])
def test_split_sequence_gives_the_unsplit_losses_and_gradients(world, cp_size, boundaries, checkpointing, dtype):
    """cp 4 > n_kv_heads 2 of jamba-tiny: the kv heads are replicated. World 4 with cp 2: two groups, one
    without rank 0 (collectives on a subgroup use group ranks, not global ones). bf16: the training dtype of
    the GPU configs (fp32 states, bf16 halo and all-to-alls), against the unsplit bf16 model."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_worker, args=(world, cp_size, _port(), boundaries, checkpointing, results, dtype), nprocs=world,
             join=True)
    bad = {k: v for k, v in results.items() if isinstance(k, str)}
    assert not bad, f"parameters whose gradient differs: {bad}"
    for rank in range(world):
        got, want = results[rank]["losses"], results[rank]["want"]
        for name, a, b in zip(("lm", "aux", "z"), got, want):
            assert abs(a - b) <= LOSS_TOLERANCE[dtype] * abs(b), (rank, name, a, b)
        print(f"cp {cp_size} {dtype}: worst gradient difference {results[rank]['worst_grad_rel']:.1e}")
        assert results[rank]["worst_grad_rel"] < GRAD_TOLERANCE[dtype]


def test_layouts_that_cannot_split_are_refused():
    from model import JambaConfig
    from train.context_parallel import check_layout

    cfg = JambaConfig.from_yaml(ROOT / "configs/model/jamba-tiny.yaml")   # 4 heads, 2 kv heads, d_conv 4
    check_layout(4, 8, 64, cfg)
    for args, message in [((3, 8, 64), "must divide the world size 8"), ((2, 4, 63), "must divide data.seq_len 63"),
                          ((4, 4, 8), "fewer than the conv halo of 3"), ((8, 8, 64), "must divide n_heads 4")]:
        with pytest.raises(ValueError, match=message):
            check_layout(*args, cfg)


def test_config_refuses_a_cp_size_that_does_not_divide_the_sequence():
    from train.config import TrainConfigError, load_train_config

    with pytest.raises(TrainConfigError, match=r"tiny-cpu.yaml: <root>: parallel.cp_size: 3 must divide data.seq_len"):
        load_train_config(ROOT / "configs/train/tiny-cpu.yaml", {"parallel.cp_size": 3})
    assert load_train_config(ROOT / "configs/train/tiny-cpu.yaml", {"parallel.cp_size": 2}).parallel.cp_size == 2
