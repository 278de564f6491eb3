"""The memory plan: per-layer activation bytes against autograd's saved tensors (context-parallel layers too),
ZeRO / expert-data-parallel partitioning arithmetic, context parallelism's terms, the H100 launch configs, the
CLI's verdicts, and DeepSpeed JSON checks.
(The whole-plan cross-check against measured peak memory runs in tests/test_train.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from model import Jamba, JambaConfig
from model.layers.attention import ATTN_BLOCK
from model.params import count_parameters
from tests.test_model import ROOT
from train.config import TrainConfigError, load_train_config
from train.plan import (
    GIB,
    attention_working_set_bytes,
    layer_activation_bytes,
    load_deepspeed_extra,
    parse_size,
    plan_memory,
)

H100 = ROOT / "configs/train/jamba-v0.1-h100.yaml"
H100_LONG = ROOT / "configs/train/jamba-v0.1-h100-long.yaml"


def _saved_bytes_per_token(layer, h, segment) -> float:
    """Bytes of the distinct storages autograd saves for backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(h, segment, None)
    return sum(seen.values()) / (h.shape[0] * h.shape[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("boundaries", "attn_block"), [(False, ATTN_BLOCK), (True, ATTN_BLOCK), (True, 128)])
def test_layer_activation_estimate_matches_saved_tensors(dtype, boundaries, attn_block):
    """attn_block 128 < L: document-masked attention in checkpointed query blocks (no mask kept)."""
    torch.manual_seed(0)
    cfg = JambaConfig(vocab_size=512, d_model=128, n_blocks=1, n_experts=8, ffn_dim=384, n_heads=4, n_kv_heads=2,
                      mamba_dt_rank=8)
    model = Jamba(cfg).to(dtype)
    model.layers[4].self_attn.block = attn_block
    b, L = 2, 384
    segment = torch.tensor([0] * 100 + [1] * (L - 100)).repeat(b, 1) if boundaries else None
    for i in (0, 1, 4):  # Mamba + MLP, Mamba + MoE, attention + MLP
        h = torch.randn(b, L, cfg.d_model, dtype=dtype, requires_grad=True)
        measured = _saved_bytes_per_token(model.layers[i], h, segment)
        estimate = layer_activation_bytes(cfg, i, 2 if dtype == torch.bfloat16 else 4, L, boundaries,
                                          attn_block=attn_block)
        assert abs(estimate / measured - 1) < 0.15, (i, estimate, measured)


def test_partitioning_arithmetic():
    cfg = load_train_config(H100)
    model_cfg = JambaConfig.from_yaml(cfg.model)
    counts = count_parameters(model_cfg)
    experts = counts["part_moe_experts"]
    dense = counts["total"] - experts
    plan = plan_memory(cfg, model_cfg, world=128)
    assert (plan.ep_size, plan.edp_size, plan.dp_size) == (8, 16, 128)
    assert plan.params_expert_local == experts // 8 and plan.params_dense == dense
    assert plan.terms["weights"] == 2 * (dense + experts // 8)                  # bf16
    partition = dense / 128 + (experts // 8) / 16
    assert plan.terms["master weights (fp32)"] == int(4 * partition)
    assert plan.terms["Adam moments (fp32)"] == int(8 * partition)
    assert plan.terms["gradients (partition)"] == int(4 * partition)           # ZeRO-2, fp32 accumulation
    zero1 = load_train_config(H100, {"parallel.zero_stage": 1})
    assert plan_memory(zero1, model_cfg, 128).terms["gradients"] == 4 * (dense + experts // 8)
    zero1_bf16 = load_train_config(H100, {"parallel.zero_stage": 1, "parallel.grad_reduce_dtype": "bf16"})
    assert plan_memory(zero1_bf16, model_cfg, 128).terms["gradients"] == 2 * (dense + experts // 8)
    # twice the nodes: expert optimizer states halve, expert weights do not
    wide = plan_memory(cfg, model_cfg, world=256)
    assert wide.terms["weights"] == plan.terms["weights"]
    assert wide.terms["Adam moments (fp32)"] == int(8 * (dense / 256 + (experts // 8) / 32))


def test_activation_checkpointing_and_chunked_loss_shrink_activations():
    model_cfg = JambaConfig.from_yaml(ROOT / "configs/model/jamba-v0.1.yaml")
    base = {"parallel.activation_checkpointing": False, "parallel.loss_chunk_tokens": 0}
    plain = plan_memory(load_train_config(H100, base), model_cfg, 128)
    ckpt = plan_memory(load_train_config(H100, {**base, "parallel.activation_checkpointing": True}), model_cfg, 128)
    chunked = plan_memory(load_train_config(H100), model_cfg, 128)
    assert plain.terms["activations"] > 5 * ckpt.terms["activations"] > 5 * chunked.terms["activations"]
    assert plain.total > 80 * GIB


def test_h100_configs_fit_on_128_gpus_but_not_on_one_node():
    model_cfg = JambaConfig.from_yaml(ROOT / "configs/model/jamba-v0.1.yaml")
    for path in (H100, H100_LONG):
        cfg = load_train_config(path)
        assert plan_memory(cfg, model_cfg, 128, parse_size("80GB"), 3 * GIB, kernels=True).fits
        assert not plan_memory(cfg, model_cfg, 8, parse_size("80GB"), 3 * GIB, kernels=True).fits


def _plan_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", "plan", *args], cwd=ROOT, capture_output=True, text=True)


def test_plan_cli_verdicts():
    ok = _plan_cli("--config", str(H100), "--gpus", "128", "--gpu-memory", "80GB", "--json")
    assert ok.returncode == 0, ok.stderr
    plan = json.loads(ok.stdout)
    assert plan["fits"] and plan["total"] <= plan["capacity"] == 80 * 10**9
    too_long = _plan_cli("--config", str(H100), "--gpus", "128", "--set", "data.seq_len=131072")
    assert too_long.returncode == 3 and "DOES NOT FIT" in too_long.stdout and "activations" in too_long.stdout
    bad = _plan_cli("--config", str(H100), "--gpus", "12")
    assert bad.returncode == 2 and "ep_size: 8 must divide the number of ranks 12" in bad.stderr


def test_disk_per_checkpoint_is_weights_master_and_moments_times_keep():
    """DeepSpeed's files of one tag under ZeRO 1/2: every parameter once in the model dtype (main file and
    per-expert files) and once in each fp32 optimizer state (tests/test_train.py measures a real tag)."""
    cfg = load_train_config(H100)
    total = count_parameters(JambaConfig.from_yaml(cfg.model))["total"]
    plan = plan_memory(cfg, JambaConfig.from_yaml(cfg.model), world=128)
    assert plan.checkpoint_terms == {"model weights (bf16)": 2 * total, "master weights (fp32)": 4 * total,
                                     "Adam moments (fp32)": 8 * total}
    assert 0.7e12 < plan.checkpoint_bytes < 0.75e12          # the released model: ~0.7 TB per tag
    assert plan.checkpoint_disk == 3 * plan.checkpoint_bytes and plan.checkpoint_disk_peak == 4 * plan.checkpoint_bytes
    fp32 = load_train_config(H100, {"parallel.dtype": "fp32", "checkpoint.keep": 1})
    plan32 = plan_memory(fp32, JambaConfig.from_yaml(cfg.model), world=128)
    assert plan32.checkpoint_bytes == 16 * total and plan32.checkpoint_disk == plan32.checkpoint_bytes
    out = _plan_cli("--config", str(H100), "--gpus", "128", "--json")
    assert json.loads(out.stdout)["checkpoint_disk"] == plan.checkpoint_disk
    text = _plan_cli("--config", str(H100), "--gpus", "128").stdout
    assert "disk per checkpoint" in text and "x keep 3" in text


def test_parse_size():
    assert parse_size("80GB") == 80 * 10**9 and parse_size("80GiB") == 80 * 2**30
    assert parse_size("512MB") == 512 * 10**6 and parse_size(1234) == 1234
    with pytest.raises(ValueError, match="cannot read the size"):
        parse_size("lots")


def test_deepspeed_json_may_not_contradict_the_yaml(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1, "reduce_bucket_size": 1000}}))
    with pytest.raises(TrainConfigError, match=r"zero_optimization.stage is 1 in the JSON but 2 in the YAML"):
        load_train_config(H100, {"parallel.deepspeed": str(ds)})
    ds.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(TrainConfigError, match=r"parallel.deepspeed: optimizer: set by the trainer"):
        load_train_config(H100, {"parallel.deepspeed": str(ds)})
    ds.write_text("{not json")
    with pytest.raises(TrainConfigError, match=r"is not valid JSON"):
        load_train_config(H100, {"parallel.deepspeed": str(ds)})


@pytest.mark.parametrize("boundaries", [False, True])
def test_scan_block_keeps_what_the_working_set_assumes(boundaries):
    """The plan's pure-path scan working set assumes a recomputed block keeps 5.25 (6.25 with document
    resets) fp32 tensors of [b, d_inner, block, d_state] for its backward."""
    from model.scan import _block

    b, d, n, L = 2, 32, 16, 256
    x, dt = torch.randn(b, d, L, requires_grad=True), (torch.rand(b, d, L) * 0.1).requires_grad_()
    A, B, C, h0 = -torch.rand(d, n), torch.randn(b, n, L), torch.randn(b, n, L), torch.zeros(b, d, n)
    seg = torch.tensor([0] * 100 + [1] * 156).repeat(b, 1) if boundaries else None
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _block(x, dt, A, B, C, h0, seg, seg[:, 0] if boundaries else None, 32)
    units = sum(seen.values()) / (b * d * L * n * 4)
    assert abs(units - (6.25 if boundaries else 5.25)) < 0.25


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_block_keeps_what_the_working_set_assumes(dtype):
    """The plan's attention working set assumes a recomputed block of document-masked attention keeps, besides
    views of q, k, v and its small output and log-sum-exp, one copy of its [b, block, window] mask in q's
    dtype, and no [b, H, block, window] scores (which SDPA's math fallback would keep)."""
    from model.layers.attention import _attend_window

    b, H, KV, L, hd, a = 2, 4, 2, 384, 16, torch.empty(0, dtype=dtype).element_size()
    lo, hi, start = 256, 384, 100          # the last block of 128 queries, its document starting at 100
    q = torch.randn(b, H, L, hd, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(b, KV, L, hd, dtype=dtype, requires_grad=True) for _ in range(2))
    inputs = {t.untyped_storage().data_ptr() for t in (q, k, v)}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _attend_window(q, k, v, torch.tensor([0] * 100 + [1] * 284).repeat(b, 1), lo, hi, start)
    block, window = hi - lo, hi - start
    output_and_lse = b * H * block * (a * hd + 4)
    assert sum(seen.values()) - output_and_lse == a * b * block * window


def test_document_masked_attention_adds_one_block_to_the_backward_working_set():
    model_cfg = JambaConfig.from_yaml(ROOT / "configs/model/jamba-v0.1.yaml")
    long = {"data.pack": "boundaries", "data.seq_len": 4 * ATTN_BLOCK}
    plan = plan_memory(load_train_config(H100, long), model_cfg, 128)
    concat = plan_memory(load_train_config(H100, {**long, "data.pack": "concat"}), model_cfg, 128)
    block = attention_working_set_bytes(2, 4 * ATTN_BLOCK, 2, True)
    assert block == 2 * ATTN_BLOCK * 4 * ATTN_BLOCK * (2 + 2 * 2)     # micro-batch 2, bf16
    assert plan.terms["backward working set"] - concat.terms["backward working set"] >= block
    assert attention_working_set_bytes(2, ATTN_BLOCK, 2, True) == 0       # one masked call: with the layer's


@pytest.mark.parametrize(("zero", "refused"), [
    ({"contiguous_gradients": False}, "zero_optimization.contiguous_gradients: False is refused"),
    ({"reduce_scatter": False}, "zero_optimization.reduce_scatter: False is refused"),
    ({"offload_optimizer": {"device": "cpu"}}, "zero_optimization.offload_optimizer"),
])
def test_settings_that_break_expert_gradient_reduction_are_refused(tmp_path, zero, refused):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000, **zero}}))
    with pytest.raises(TrainConfigError, match=refused):
        load_train_config(H100, {"parallel.deepspeed": str(ds)})


def test_bf16_gradients_accumulate_and_reduce_in_fp32_unless_chosen(tmp_path):
    from train.engine import deepspeed_config

    ds = deepspeed_config(load_train_config(H100))
    assert ds["communication_data_type"] == "fp32" and ds["data_types"]["grad_accum_dtype"] == "fp32"
    chosen = deepspeed_config(load_train_config(H100, {"parallel.grad_reduce_dtype": "bf16"}))
    assert chosen["communication_data_type"] == "bf16" and chosen["data_types"]["grad_accum_dtype"] == "bf16"
    # a DeepSpeed JSON may not say otherwise behind the YAML's back
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"communication_data_type": "bf16"}))
    with pytest.raises(TrainConfigError, match="communication_data_type is 'bf16' in the JSON but 'fp32'"):
        load_train_config(H100, {"parallel.deepspeed": str(path)})
    # and the plan counts fp32 gradients (4 bytes per parameter of the partition under ZeRO-2)
    cfg = load_train_config(H100)
    fp32 = plan_memory(cfg, JambaConfig.from_yaml(cfg.model), 128).terms["gradients (partition)"]
    cfg16 = load_train_config(H100, {"parallel.grad_reduce_dtype": "bf16"})
    bf16 = plan_memory(cfg16, JambaConfig.from_yaml(cfg16.model), 128).terms["gradients (partition)"]
    assert fp32 == pytest.approx(2 * bf16, rel=1e-6)


def test_memory_check_plans_the_mamba_path_that_will_run():
    from model.scan import kernels
    from train.engine import mamba_kernels_will_run

    concat = load_train_config(H100)                                        # pack: concat
    boundaries = load_train_config(H100, {"data.pack": "boundaries"})
    assert not mamba_kernels_will_run(boundaries, cuda=True)               # document resets: pure path
    assert not mamba_kernels_will_run(concat, cuda=False)
    assert mamba_kernels_will_run(concat, cuda=True) == (kernels() is not None)
    model_cfg = JambaConfig.from_yaml(concat.model)
    pure = plan_memory(concat, model_cfg, 128, kernels=False)
    fast = plan_memory(concat, model_cfg, 128, kernels=True)
    assert "scan working set" in pure.terms and "scan working set" not in fast.terms


# ---------------------------------------------------------------------------------------- context parallelism
H100_256K = ROOT / "configs/train/jamba-v0.1-h100-256k.yaml"
H100_1M = ROOT / "configs/train/jamba-v0.1-h100-1m.yaml"


@pytest.fixture(scope="module")
def gloo_world_of_one():
    """A one-rank gloo group, so the context-parallel layers' collectives run in this process."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():   # e.g. tests/test_train_build.py's one-rank group, kept for the session
        assert dist.get_world_size() == 1 and dist.get_backend() == "gloo", "needs a one-rank gloo group"
        yield dist.group.WORLD
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()       # leave no group behind for later tests in this process


def _last_rank_of(size: int):
    """The last rank of a cp group of ``size``, simulated in one process: each gathered or exchanged tensor is a
    copy of this rank's (``clone``: its own storage, as a received tensor has), so the rank holds what a real
    one holds (the gathered states of every earlier rank; Ulysses' whole sequence for H/cp heads), though the
    values are not another rank's. Memory only: tests/test_context_parallel.py checks the values over real
    process groups."""
    from train.context_parallel import ContextParallel

    class LastRank(ContextParallel):
        def all_gather(self, x, what):
            return [x.clone() for _ in range(self.size)]

        def all_gather_ids(self, x):
            return [x + 1000 * j for j in range(self.size)]       # later chunks: later documents

        def all_to_all(self, x, what):
            return x.clone()

    return LastRank(size, size - 1, None)


def _as_cp(model, cp) -> None:
    from train.context_parallel import ContextParallelMamba, UlyssesAttention

    for layer in model.layers:
        mixer = layer.mamba if layer.kind == "mamba" else layer.self_attn
        mixer.__class__ = ContextParallelMamba if layer.kind == "mamba" else UlyssesAttention
        mixer.cp = cp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("boundaries", [False, True])
@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_cp_layer_activation_estimate_matches_saved_tensors(gloo_world_of_one, dtype, boundaries, cp_size):
    """The context-parallel Mamba and attention layers (classes swapped by hand, as apply_context_parallel does
    for cp > 1) against autograd's saved tensors, per token the rank holds: cp 1 runs the real collectives on a
    one-rank gloo group; cp 2 and 4 the last rank of a simulated group (its gathered states; at cp 4 > n_kv_heads
    2 the replicated kv heads; with documents at cp 2 the whole sequence of 768 queries in one masked call, at
    cp 4 1536 > ATTN_BLOCK in checkpointed blocks). Mamba's per-token bytes do not depend on cp (> 1); its
    gathered states are per layer (``cp_state_bytes``; at cp 1 the rank keeps 2 such [b, d_inner, d_state]
    tensors: its total decay and the zero entering state)."""
    from train.context_parallel import ContextParallel
    from train.plan import cp_state_bytes

    torch.manual_seed(0)
    cfg = JambaConfig(vocab_size=512, d_model=128, n_blocks=1, n_experts=8, ffn_dim=384, n_heads=4, n_kv_heads=2,
                      mamba_dt_rank=8)
    model = Jamba(cfg).to(dtype)
    model.set_cuda_kernels(False)
    _as_cp(model, ContextParallel(1, 0, gloo_world_of_one) if cp_size == 1 else _last_rank_of(cp_size))
    a = 2 if dtype == torch.bfloat16 else 4
    b, Lc = 2, 384                                                   # tokens this rank holds
    segment = torch.tensor([0] * 100 + [1] * (Lc - 100)).repeat(b, 1) if boundaries else None
    state_unit = b * cfg.d_inner * cfg.mamba_d_state * 4
    for i in (0, 1, 4):  # Mamba + MLP, Mamba + MoE, attention + MLP
        h = torch.randn(b, Lc, cfg.d_model, dtype=dtype, requires_grad=True)
        measured = _saved_bytes_per_token(model.layers[i], h, segment)
        # Mamba layers: the cp layer's bytes (any cp > 1: they do not depend on it), whatever the group size
        estimate = layer_activation_bytes(cfg, i, a, Lc * cp_size, boundaries, cp=cp_size if i == 4 else 2)
        if i != 4:
            per_layer = cp_state_bytes(cfg, b, cp_size) if cp_size > 1 else 2 * state_unit
            estimate += per_layer / (b * Lc)
        print(f"cp layer {i}: plan / measured {estimate / measured:.3f}")
        assert abs(estimate / measured - 1) < 0.10, (i, estimate, measured)   # measured: 0.91 to 1.01


def test_state_passing_blocks_keep_what_the_working_set_assumes():
    """The plan's state-passing working set assumes a recomputed block of ``scan.state_correction`` or of
    ``scan.final_state`` keeps 2 fp32 tensors of [b, d_inner, block, d_state] for its backward."""
    from model.scan import _correction_block, _final_block

    b, d, n, L = 2, 32, 16, 256
    cum = torch.rand(b, d, L).cumsum(-1).requires_grad_()
    A, C, h = -torch.rand(d, n, requires_grad=True), torch.randn(b, n, L, requires_grad=True), torch.randn(b, d, n)
    dt, x, B = torch.rand(b, d, L, requires_grad=True), torch.randn(b, d, L, requires_grad=True), torch.randn(b, n, L)
    for fn, args in ((_correction_block, (cum, A, C, h.requires_grad_(), None)),
                     (_final_block, (cum, dt, x, B, A, None))):
        inputs = {t.untyped_storage().data_ptr() for t in args if isinstance(t, torch.Tensor)}
        seen = {}

        def pack(t, inputs=inputs, seen=seen):
            if t.untyped_storage().data_ptr() not in inputs:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(*args)
        assert abs(sum(seen.values()) / (b * d * L * n * 4) - 2) < 0.1, fn.__name__


def _long(cp: int, seq_len: int, **more):
    return load_train_config(H100_LONG, {"parallel.cp_size": cp, "data.seq_len": seq_len, **more})


def test_cp_divides_activations():
    """Per token a rank holds, cp changes only the Mamba mixer (the context-parallel one keeps other tensors) and, beyond
    n_kv_heads ranks, attention's kv heads: at the same tokens per rank the per-token terms of cp 2 and cp 4 are
    equal, and cp 1 differs from cp 2 by one constant in the Mamba layers only. At the same seq_len the
    activations shrink cp times between cp > 1 layouts (cp 8 -> 32: 4x, the kv replication of cp 32 lying in an
    attention layer, not the widest, which alone is recomputed under activation checkpointing); from cp 1 to 2
    by a little less than 2x on the kernel path (1.96x at 16K: the cp mixer keeps the ungated scan output and a
    z copy, its PyTorch tail recomputed in backward) and a little more on the pure path (2.12x: the plain pure
    mixer keeps the gate's fp32 temporaries, the cp one recomputes them)."""
    from train.plan import head_working_set_bytes

    model_cfg = JambaConfig.from_yaml(ROOT / "configs/model/jamba-v0.1.yaml")
    L = 16384
    for kernels in (True, False):
        per = {cp: [layer_activation_bytes(model_cfg, i, 2, L * cp, False, kernels, cp=cp)
                    for i in range(model_cfg.n_layers)] for cp in (1, 2, 4)}
        assert per[2] == per[4]
        extra = {p2 - p1 for i, (p1, p2) in enumerate(zip(per[1], per[2])) if not model_cfg.is_attention(i)}
        assert len(extra) == 1 and extra.pop() != 0
        assert all(per[1][i] == per[2][i] for i in model_cfg.attention_layers)
        plans = {cp: plan_memory(_long(cp, L * cp), model_cfg, 128, kernels=kernels) for cp in (2, 4)}
        assert plans[2].tokens_per_micro_batch == plans[4].tokens_per_micro_batch == L
        for term in ("activations", "backward working set", "state-passing working set", "all-to-all buffers"):
            assert plans[2].terms[term] == plans[4].terms[term], term
        # the gathered states are per Mamba layer and grow with cp: 3 cp - 1 [b, d_inner, d_state] fp32 tensors
        unit = model_cfg.d_inner * model_cfg.mamba_d_state * 4
        assert plans[4].terms["gathered Mamba states (cp)"] == 11 * unit == 11 / 5 * plans[2].terms[
            "gathered Mamba states (cp)"]
        same = {cp: plan_memory(_long(cp, 262144), model_cfg, 128, kernels=kernels) for cp in (8, 32)}
        assert same[8].terms["activations"] == 4 * same[32].terms["activations"]
        logits = 4096 * head_working_set_bytes(model_cfg, 2, chunked=True)     # one loss chunk: whatever cp
        assert same[8].terms["backward working set"] - logits == 4 * (same[32].terms["backward working set"] - logits)
        ratio = (plan_memory(_long(1, L), model_cfg, 128, kernels=kernels).terms["activations"]
                 / plan_memory(_long(2, L), model_cfg, 128, kernels=kernels).terms["activations"])
        assert (1.9 < ratio < 2.0) if kernels else (2.05 < ratio < 2.2), (kernels, ratio)


def test_kv_replication_beyond_n_kv_raises_the_attention_terms():
    """jamba-v0.1 has 8 kv heads: up to cp 8 they are split (the same bytes per token as without cp); at cp 16
    and 32 each rank holds one, replicated: 16 and 32 kv heads' worth of k and v per token, in the layer and in
    its exchange buffers."""
    from train.plan import cp_exchange_bytes

    model_cfg = JambaConfig.from_yaml(ROOT / "configs/model/jamba-v0.1.yaml")
    attn, hd, a = model_cfg.attention_layers[0], model_cfg.head_dim, 2
    by_cp = {cp: layer_activation_bytes(model_cfg, attn, a, 262144, False, True, cp=cp) for cp in (1, 2, 8, 16, 32)}
    assert by_cp[1] == by_cp[2] == by_cp[8]
    assert by_cp[16] - by_cp[8] == 2 * a * (16 - 8) * hd and by_cp[32] - by_cp[8] == 2 * a * (32 - 8) * hd
    assert cp_exchange_bytes(model_cfg, a, 32) - cp_exchange_bytes(model_cfg, a, 8) == 2 * a * 2 * (32 - 8) * hd
    mamba = [i for i in range(model_cfg.n_layers) if not model_cfg.is_attention(i)][0]
    assert len({layer_activation_bytes(model_cfg, mamba, a, 262144, False, True, cp=cp) for cp in (2, 8, 32)}) == 1


def test_cp_layout_errors_name_the_key():
    model_cfg = JambaConfig.from_yaml(ROOT / "configs/model/jamba-v0.1.yaml")
    for overrides, world, message in (
            ({"parallel.cp_size": 3, "data.seq_len": 49152}, 128, "parallel.cp_size: 3 must divide the world size 128"),
            ({"parallel.cp_size": 2, "data.seq_len": 16385}, 128, "parallel.cp_size: 2 must divide data.seq_len"),
            ({"parallel.cp_size": 64, "data.seq_len": 65536}, 128, "parallel.cp_size: 64 must divide n_heads 32")):
        with pytest.raises(ValueError, match=message):
            plan_memory(load_train_config(H100_LONG, overrides), model_cfg, world)
    bad = _plan_cli("--config", str(H100_LONG), "--gpus", "128", "--set", "parallel.cp_size=3",
                    "--set", "data.seq_len=49152")
    assert bad.returncode == 2 and "parallel.cp_size: 3 must divide the world size 128" in bad.stderr


def _header_gpus(path) -> tuple[int, str]:
    import re

    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    return int(re.search(r"train plan --config \S+ --gpus (\d+) --gpu-memory 80GB", header).group(1)), header


@pytest.mark.parametrize("path", [H100_256K, H100_1M])
def test_long_context_configs_fit_80gb_on_the_gpus_their_header_states(path):
    cfg = load_train_config(path)
    model_cfg = JambaConfig.from_yaml(cfg.model)
    gpus, header = _header_gpus(path)
    plan = plan_memory(cfg, model_cfg, gpus, parse_size("80GB"), 3 * GIB, cfg.parallel.expert_imbalance,
                       kernels=True, deepspeed_extra=load_deepspeed_extra(cfg.parallel.deepspeed))
    assert plan.fits and cfg.data.pack == "concat" and cfg.parallel.cp_size > 1
    assert f"{plan.total / GIB:.2f} GiB of 74.51 GiB (80 GB), {100 * plan.total / plan.capacity:.0f}% used" in header
    tokens = cfg.parallel.micro_batch * cfg.data.seq_len * cfg.parallel.grad_accum * plan.dp_size
    assert f"= {tokens // 2**20}M tokens per step" in header
    assert model_cfg.n_heads % cfg.parallel.cp_size == 0 and cfg.data.seq_len // cfg.parallel.cp_size >= 8192
    assert model_cfg.n_experts % cfg.parallel.ep_size == 0 and gpus % cfg.parallel.ep_size == 0
    out = _plan_cli("--config", str(path), "--gpus", str(gpus), "--gpu-memory", "80GB")
    assert out.returncode == 0 and f"dp {plan.dp_size} x cp {cfg.parallel.cp_size}, ep {cfg.parallel.ep_size}" in out.stdout


def test_one_million_tokens_layouts_the_header_states():
    """What the 1M config's header says: 85% on its 256 GPUs, 89% on 128, 82% on 1024, and 92% with ep 8
    (cp 32 at most: 32 heads)."""
    cfg = load_train_config(H100_1M)
    model_cfg = JambaConfig.from_yaml(cfg.model)

    def used(gpus, **overrides):
        c = load_train_config(H100_1M, overrides)
        plan = plan_memory(c, model_cfg, gpus, parse_size("80GB"), 3 * GIB, c.parallel.expert_imbalance,
                           kernels=True, deepspeed_extra=load_deepspeed_extra(c.parallel.deepspeed))
        return plan.total / plan.capacity

    for gpus, overrides, stated in ((256, {}, 0.85), (128, {}, 0.89), (1024, {}, 0.82),
                                    (256, {"parallel.ep_size": 8}, 0.92)):
        assert abs(used(gpus, **overrides) - stated) < 0.005, (gpus, overrides)
    assert cfg.parallel.cp_size == model_cfg.n_heads
