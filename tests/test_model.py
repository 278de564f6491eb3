"""Config, parameter counts, decode parity with the cache, cache memory, document masking (blocked attention's
values, gradients and saved bytes), generation, CLI."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from model import Jamba, JambaConfig, ModelConfigError
from model.cache import KVState
from model.generate import generate, sample_next
from model.layers import feedforward
from model.layers.attention import attend
from model.params import count_parameters

ROOT = Path(__file__).resolve().parent.parent


def tiny() -> JambaConfig:
    return JambaConfig.from_yaml(ROOT / "configs/model/jamba-tiny.yaml")


def test_released_config_layout_and_counts():
    cfg = JambaConfig.from_yaml(ROOT / "configs/model/jamba-v0.1.yaml")
    assert cfg.n_layers == 32 and cfg.attention_layers == [4, 12, 20, 28]
    assert [i for i in range(cfg.n_layers) if cfg.is_moe(i)] == list(range(1, 32, 2))
    counts = count_parameters(cfg)
    assert abs(counts["total"] / 1e9 - 51.57) < 0.01 and abs(counts["active"] / 1e9 - 12.11) < 0.01
    assert counts["part_embedding"] == 65536 * 4096


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ModelConfigError, match="n_kv_heads: must divide n_heads"):
        JambaConfig(n_heads=32, n_kv_heads=5)
    with pytest.raises(ModelConfigError, match="attn_offset: must be in"):
        JambaConfig(attn_period=4, attn_offset=4)
    (tmp_path / "m.yaml").write_text("d_model: 64\nn_layerz: 3\n")
    with pytest.raises(ModelConfigError, match=r"m.yaml: n_layerz: unknown key"):
        JambaConfig.from_yaml(tmp_path / "m.yaml")


def test_hf_config_round_trip():
    cfg = JambaConfig.from_yaml(ROOT / "configs/model/jamba-v0.1.yaml")
    assert JambaConfig.from_hf(cfg.to_hf()) == cfg


@pytest.mark.parametrize("prefill", [1, 3, 7])
@pytest.mark.parametrize("chunks,scan_chunk", [
    ([1] * 12, 32),                  # one-token decoding steps
    ([2, 1, 3, 7, 1, 2], 32),        # warm-cache calls of several tokens, mixed with single ones
    ([7, 3, 1, 2, 7], 4),            # continuations spanning several scan chunks
])
def test_incremental_decoding_equals_full_forward(prefill, chunks, scan_chunk):
    """Prefill, then continue in chunks of tokens: every position's logits and the final cache equal one
    forward (and one prefill) over the whole sequence."""
    torch.manual_seed(0)
    model = Jamba(replace(tiny(), scan_chunk=scan_chunk)).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, prefill + sum(chunks)))
    with torch.no_grad():
        full = model(ids).logits
        whole = model.new_cache()
        model(ids, cache=whole)
        cache = model.new_cache()
        parts = [model(ids[:, :prefill], cache=cache).logits]
        start = prefill
        for n in chunks:
            parts.append(model(ids[:, start:start + n], cache=cache).logits)
            start += n
    assert ((torch.cat(parts, 1) - full).abs().max() / full.abs().max()).item() < 1e-5
    assert cache.seen == whole.seen == ids.shape[1]
    for got, want in zip(cache.layers, whole.layers):
        names = ("k", "v") if isinstance(got, KVState) else ("conv", "ssm")
        for name in names:
            a, b = getattr(got, name), getattr(want, name)
            assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6), name


def test_continuing_a_cache_with_segments_is_refused():
    model = Jamba(tiny()).eval()
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.randint(0, 2048, (1, 4)), cache=cache)
        with pytest.raises(ValueError, match="segment: not supported"):
            model(torch.randint(0, 2048, (1, 3)), cache=cache, segment=torch.zeros(1, 3, dtype=torch.long))


def _dense_experts(x, idx, weights, gate_up, down):
    """Reference MoE: every expert on every token, then each token sums its k picks."""
    half = gate_up.shape[1] // 2
    h = torch.einsum("td,efd->tef", x, gate_up)
    y_all = torch.einsum("tef,edf->ted", torch.nn.functional.silu(h[..., :half]) * h[..., half:], down)
    picked = torch.gather(y_all, 1, idx[..., None].expand(-1, -1, x.shape[1]))     # [T, k, d]
    return (weights[..., None] * picked).sum(1)


def _autograd_nodes(t: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(f for f, _ in node.next_functions)
    return names


@pytest.mark.parametrize("path", ["grouped_mm", "loop"])
@pytest.mark.parametrize("dims", [(64, 96), (12, 10)])  # (d, F); 12 x 4 bytes is not 16-aligned: loop path
def test_experts_match_a_dense_reference_in_values_and_gradients(path, dims, monkeypatch):
    if path == "loop":
        monkeypatch.setattr(feedforward, "_grouped_mm_ok", lambda *args: False)
    torch.manual_seed(0)
    d, f, E, k, T = *dims, 5, 2, 37
    x = torch.randn(T, d, requires_grad=True)
    router = (torch.randn(E, d) * 0.5).requires_grad_()
    gate_up = (torch.randn(E, 2 * f, d) * 0.2).requires_grad_()
    down = (torch.randn(E, d, f) * 0.2).requires_grad_()
    probs = torch.softmax(x @ router.T, dim=-1)
    # the last expert is never picked: its gradient must be zero (not missing), as before
    idx = torch.topk(probs.detach().masked_fill(torch.arange(E) == E - 1, -1.0), k, dim=-1).indices
    weights = torch.gather(probs, 1, idx)
    out = feedforward.experts_forward(x, idx, weights, gate_up, down)
    # no per-expert select on the stacked weights: its backward zero-fills a full [E, ...] gradient
    nodes = _autograd_nodes(out)
    assert "SelectBackward0" not in nodes
    uses_grouped = any("GroupedMm" in n for n in nodes)
    assert uses_grouped == (path == "grouped_mm" and dims == (64, 96) and hasattr(torch.nn.functional, "grouped_mm"))
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, router, gate_up, down), g)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, router, gate_up, down)]
    p64 = torch.softmax(leaves64[0] @ leaves64[1].T, dim=-1)
    ref = _dense_experts(leaves64[0], idx, torch.gather(p64, 1, idx), leaves64[2], leaves64[3])
    want = torch.autograd.grad(ref, leaves64, g.double())
    def rel(a, b):  # float32 against a float64 reference
        return ((a.double() - b).abs().max() / b.abs().max()).item()

    assert rel(out, ref) < 1e-6
    for name, a, b in zip(("x", "router", "gate_up", "down"), got, want):
        assert rel(a, b) < 1e-6, name
    assert torch.count_nonzero(got[2][E - 1]) == 0 and torch.count_nonzero(got[3][E - 1]) == 0
    assert torch.count_nonzero(got[2][0]) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_mm_on_cuda_matches_the_per_expert_loop_in_bf16(monkeypatch):
    torch.manual_seed(0)
    d, f, E, k, T = 256, 512, 8, 2, 1000
    leaves = [torch.randn(T, d), torch.randn(E, 2 * f, d) * 0.05, torch.randn(E, d, f) * 0.05]
    leaves = [t.cuda().bfloat16().requires_grad_() for t in leaves]
    idx = torch.randint(0, E - 1, (T, k), device="cuda")      # the last expert gets no tokens
    weights = torch.rand(T, k, device="cuda", dtype=torch.bfloat16)
    results = []
    for path in ("grouped_mm", "loop"):
        if path == "loop":
            monkeypatch.setattr(feedforward, "_grouped_mm_ok", lambda *args: False)
        out = feedforward.experts_forward(leaves[0], idx, weights, leaves[1], leaves[2])
        if path == "grouped_mm":
            assert any("GroupedMm" in n for n in _autograd_nodes(out)) == (
                torch.cuda.get_device_capability() >= (8, 0))
        results.append([out, *torch.autograd.grad(out, leaves, torch.ones_like(out))])
    for a, b in zip(*results):
        assert ((a.float() - b.float()).abs().max() / b.float().abs().max()).item() < 2e-2
    assert torch.count_nonzero(results[0][2][E - 1]) == 0 and torch.count_nonzero(results[0][3][E - 1]) == 0


def test_cache_memory_grows_only_in_attention_layers():
    torch.manual_seed(0)
    cfg = tiny()
    model = Jamba(cfg).eval()
    sizes = []
    for length in (8, 16, 32):
        cache = model.new_cache()
        with torch.no_grad():
            model(torch.randint(0, cfg.vocab_size, (1, length)), cache=cache)
        sizes.append(cache.nbytes())
    per_token_kv = 2 * len(cfg.attention_layers) * cfg.n_kv_heads * cfg.head_dim * 4  # k and v, float32
    assert [s["kv"] for s in sizes] == [per_token_kv * n for n in (8, 16, 32)]
    mamba_layers = cfg.n_layers - len(cfg.attention_layers)
    state = mamba_layers * cfg.d_inner * (cfg.mamba_d_conv + cfg.mamba_d_state) * 4
    assert all(s["mamba_state"] == state for s in sizes)


def test_document_masking_isolates_packed_documents():
    torch.manual_seed(0)
    model = Jamba(tiny()).eval()
    a = torch.randint(3, 2000, (1, 11))
    b = torch.randint(3, 2000, (1, 9))
    packed = torch.cat([a, b], dim=1)
    segment = torch.cat([torch.zeros(1, 11), torch.ones(1, 9)], dim=1).long()
    with torch.no_grad():
        together = model(packed, segment=segment).logits
        alone = model(b).logits
        leaky = model(packed).logits
    assert (together[:, 11:] - alone).abs().max() < 1e-4
    assert (leaky[:, 11:] - alone).abs().max() > 1e-3  # without segments the second document sees the first


def _packed_segments() -> torch.Tensor:
    """Three rows of 100 tokens: a document crossing several 16-token blocks (30..74), one document only, and
    short ones (a 16-token one starting on a block boundary, a 1-token one)."""
    return torch.tensor([[0] * 30 + [1] * 45 + [2] * 25,
                         [0] * 100,
                         [0] * 16 + [1] * 16 + [2] + [3] * 52 + [4] * 15])


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4)])
def test_blocked_document_attention_equals_one_masked_call(heads, kv_heads):
    """Blocks of 16 queries over windows from their document's start give the single full-mask call's outputs
    and q, k, v gradients, for the batch (whose row with one document keeps every window at 0) and for each
    row alone (windows then start late); and both equal per-document causal attention."""
    torch.manual_seed(0)
    segment = _packed_segments()
    b, L, hd = segment.shape[0], segment.shape[1], 8
    q = torch.randn(b, heads, L, hd, requires_grad=True)
    k = torch.randn(b, kv_heads, L, hd, requires_grad=True)
    v = torch.randn(b, kv_heads, L, hd, requires_grad=True)
    grad_out = torch.randn(b, heads, L, hd)
    for rows in [slice(None)] + [slice(r, r + 1) for r in range(b)]:
        qr, kr, vr, seg = q[rows], k[rows], v[rows], segment[rows]
        whole = attend(qr, kr, vr, seg, block=L)
        blocked = attend(qr, kr, vr, seg, block=16)
        torch.testing.assert_close(blocked, whole)
        want = torch.autograd.grad(whole, (qr, kr, vr), grad_out[rows])
        got = torch.autograd.grad(blocked, (qr, kr, vr), grad_out[rows])
        for name, g, w in zip("qkv", got, want):
            torch.testing.assert_close(g, w, msg=name)
        with torch.no_grad():   # the path without checkpoints
            torch.testing.assert_close(attend(qr, kr, vr, seg, block=16), whole.detach())
    with torch.no_grad():
        for r in range(b):
            for doc in segment[r].unique():
                at = (segment[r] == doc).nonzero().flatten()
                lo, hi = int(at[0]), int(at[-1]) + 1
                alone = attend(q[r:r + 1, :, lo:hi], k[r:r + 1, :, lo:hi], v[r:r + 1, :, lo:hi])
                torch.testing.assert_close(attend(q, k, v, segment, block=16)[r:r + 1, :, lo:hi], alone)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_blocked_document_attention_saves_no_mask_for_backward():
    """L = 4096, block 256, fp32, 4 query / 2 kv heads of 16: the blocks' checkpoints keep q (1 MiB), k and
    v (0.5 MiB each) and the segment ids (32 KiB): 2,129,920 bytes, 1/8 of the bare [L, L] bool mask (16 MiB).
    The single masked call keeps the mask as a float copy (64 MiB; 70,320,128 bytes in all, torch 2.13)."""
    torch.manual_seed(0)
    L = 4096
    segment = torch.tensor([[0] * 1000 + [1] * 2500 + [2] * 596])
    q = torch.randn(1, 4, L, 16, requires_grad=True)
    k, v = (torch.randn(1, 2, L, 16, requires_grad=True) for _ in range(2))
    blocked = _saved_bytes(lambda: attend(q, k, v, segment, block=256))
    assert blocked <= sum(t.nbytes for t in (q, k, v, segment)) < L * L // 4
    assert _saved_bytes(lambda: attend(q, k, v, segment, block=L)) >= L * L   # the measure sees a mask


def test_training_step_with_checkpointing_matches_without():
    torch.manual_seed(0)
    model = Jamba(tiny()).train()
    ids = torch.randint(0, 2048, (2, 24))
    out = model(ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing = True
    out2 = model(ids, labels=ids, output_router_logits=True)
    out2.loss.backward()
    assert torch.allclose(out.loss, out2.loss)
    for name, g in grads.items():
        assert torch.allclose(model.get_parameter(name).grad, g, atol=1e-6, rtol=1e-4), name
    assert len(out.expert_counts) == sum(model.cfg.is_moe(i) for i in range(model.cfg.n_layers))
    assert all(int(c.sum()) == 2 * 24 * model.cfg.top_k for c in out.expert_counts)


def test_blocked_attention_inside_recomputed_layers_gives_the_same_step():
    """The attention blocks' checkpoints nested in the layers' (activation checkpointing), with packed
    documents: the loss and every gradient equal those of unblocked attention without recomputation."""
    torch.manual_seed(0)
    model = Jamba(tiny()).train()
    ids = torch.randint(0, 2048, (2, 40))
    segment = torch.tensor([[0] * 13 + [1] * 27, [0] * 30 + [1] * 10])
    out = model(ids, labels=ids, segment=segment)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing = True
    attention = [layer.self_attn for layer in model.layers if hasattr(layer, "self_attn")]
    assert attention
    for module in attention:
        module.block = 8
    out2 = model(ids, labels=ids, segment=segment)
    out2.loss.backward()
    torch.testing.assert_close(out2.loss, out.loss)
    for name, g in grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, g, atol=1e-6, rtol=1e-4, msg=name)


def test_bf16_forward_runs_and_is_close_to_fp32():
    torch.manual_seed(0)
    model = Jamba(tiny()).eval()
    ids = torch.randint(0, 2048, (1, 16))
    with torch.no_grad():
        ref = model(ids).logits
        low = model.to(torch.bfloat16)(ids).logits.float()
    # bf16 keeps 8 bits of mantissa: ~1-2 % relative error over the logits (seeds 0-3: 0.7-2.0 %); single
    # logits differ by up to ~5 % of the largest one where a token's top-2 routing is a near tie
    assert ((low - ref).norm() / ref.norm()).item() < 3e-2
    assert ((low - ref).abs().max() / ref.abs().max()).item() < 1e-1


def test_generation_greedy_is_deterministic_and_top_p_respects_the_nucleus():
    torch.manual_seed(0)
    model = Jamba(tiny()).eval()
    prompt = torch.randint(0, 2048, (2, 5))
    a, cache = generate(model, prompt, 6)
    b, _ = generate(model, prompt, 6)
    assert torch.equal(a, b) and a.shape == (2, 11) and torch.equal(a[:, :5], prompt)
    assert cache.seen == 5 + 5
    logits = torch.tensor([[5.0, 4.9, -10.0, -10.0]])
    picks = {int(sample_next(logits, 1.0, 0.9, torch.Generator().manual_seed(s))) for s in range(50)}
    assert picks == {0, 1}


def test_cli_params_init_convert_generate(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "model", *args], capture_output=True, text=True, cwd=ROOT)

    out = run("params", "configs/model/jamba-v0.1.yaml", "--json")
    assert out.returncode == 0 and '"total": 51570323328' in out.stdout
    assert run("init", "configs/model/jamba-tiny.yaml", "--out", str(tmp_path / "n")).returncode == 0
    assert run("convert", "--to-hf", str(tmp_path / "n"), "--out", str(tmp_path / "hf")).returncode == 0
    assert run("convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")).returncode == 0
    gen = run("generate", "--checkpoint", str(tmp_path / "back"), "--prompt", "5,6,7", "--max-new-tokens", "4")
    assert gen.returncode == 0 and gen.stdout.startswith("5,6,7,") and "Mamba state" in gen.stderr
    bad = run("convert", "--from-hf", str(tmp_path / "nope"), "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "config.json: missing" in bad.stderr


def test_logits_to_keep_equals_the_last_positions_of_the_full_logits():
    torch.manual_seed(0)
    model = Jamba(tiny()).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 13))
    with torch.no_grad():
        full = model(ids).logits
        last3 = model(ids, logits_to_keep=3).logits
    assert last3.shape == (2, 3, model.cfg.vocab_size)
    assert torch.allclose(last3, full[:, -3:], atol=1e-6)
