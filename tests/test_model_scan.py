"""The pure-PyTorch chunked selective scan equals the sequential reference (fp32 and bf16), with and without
document resets, with gradients, and in the pathological-decay regime; with an initial state, and split into
chunks scanned from zero whose states are passed on (context parallelism), outputs and every gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.scan import (
    _import_kernel,
    chain_states,
    chunked_scan,
    final_state,
    kernel_status,
    kernels,
    selective_scan,
    sequential_scan,
    state_correction,
    step,
    total_decay,
)


def inputs(b, d, n, L, seed=0, dt_scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, L, generator=g)
    dt = F.softplus(torch.randn(b, d, L, generator=g) * 0.5 + math.log(math.expm1(0.05))) * dt_scale
    A = -torch.exp(torch.randn(d, n, generator=g) * 0.5 + 1.0)
    B, C = torch.randn(b, n, L, generator=g), torch.randn(b, n, L, generator=g)
    D = torch.randn(d, generator=g)
    return [t.to(dtype) for t in (x, dt)] + [A] + [t.to(dtype) for t in (B, C)] + [D]


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize(("b", "d", "n", "L", "chunk", "block"),
                         [(1, 8, 4, 1, 32, 256), (2, 16, 16, 100, 32, 256), (3, 5, 7, 257, 16, 64),
                          (1, 32, 16, 600, 32, 256), (2, 4, 2, 33, 1, 8)])
def test_chunked_equals_sequential_fp32(b, d, n, L, chunk, block):
    x, dt, A, B, C, D = inputs(b, d, n, L)
    y_ref, h_ref = sequential_scan(x, dt, A, B, C, D)
    y, h = chunked_scan(x, dt, A, B, C, D, chunk=chunk, block=block)
    assert rel(y, y_ref) < 1e-5 and rel(h, h_ref) < 1e-5


def test_bf16_inputs_within_bf16_tolerance():
    x, dt, A, B, C, D = inputs(2, 16, 16, 130, dtype=torch.bfloat16)
    y_ref, _ = sequential_scan(x, dt, A, B, C, D)
    y, _ = chunked_scan(x, dt, A, B, C, D)
    assert y.dtype == torch.bfloat16 and rel(y, y_ref) < 1e-2


@pytest.mark.parametrize("dt_scale", [30.0, 3000.0])
def test_extreme_decay_stays_exact_and_finite(dt_scale):
    x, dt, A, B, C, D = inputs(1, 8, 4, 70, dt_scale=dt_scale)
    y_ref, h_ref = sequential_scan(x, dt, A, B, C, D)
    y, h = chunked_scan(x, dt, A, B, C, D)
    assert torch.isfinite(y).all() and rel(y, y_ref) < 1e-5 and rel(h, h_ref) < 1e-4


def test_document_resets_match_reference_and_fresh_runs():
    x, dt, A, B, C, D = inputs(2, 8, 4, 90)
    seg = torch.zeros(2, 90, dtype=torch.long)
    seg[0, 31:] = 1
    seg[0, 64:] = 2
    seg[1, 1:] = 1
    y_ref, h_ref = sequential_scan(x, dt, A, B, C, D, segment=seg)
    y, h = chunked_scan(x, dt, A, B, C, D, segment=seg, chunk=16, block=32)
    assert rel(y, y_ref) < 1e-5 and rel(h, h_ref) < 1e-5
    fresh, _ = sequential_scan(x[:1, :, 64:], dt[:1, :, 64:], A, B[:1, :, 64:], C[:1, :, 64:], D)
    assert rel(y[:1, :, 64:], fresh) < 1e-5  # nothing leaks across the boundary


def test_gradients_match_reference():
    x, dt, A, B, C, D = inputs(2, 8, 4, 70)
    leaves = [t.clone().requires_grad_(True) for t in (x, dt, B, C)]
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, dt, B, C)]
    y, _ = chunked_scan(leaves[0], leaves[1], A, leaves[2], leaves[3], D, chunk=16, block=32)
    y_ref, _ = sequential_scan(ref_leaves[0], ref_leaves[1], A, ref_leaves[2], ref_leaves[3], D)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    for got, want in zip(leaves, ref_leaves):
        assert rel(got.grad, want.grad) < 1e-4


def test_step_continues_a_scan():
    x, dt, A, B, C, D = inputs(2, 8, 4, 21)
    y_ref, _ = sequential_scan(x, dt, A, B, C, D)
    _, h = chunked_scan(x[..., :20], dt[..., :20], A, B[..., :20], C[..., :20], D)
    y_last, _ = step(x[..., 20], dt[..., 20], A, B[..., 20], C[..., 20], D, h)
    assert rel(y_last, y_ref[..., 20]) < 1e-5


def test_selective_scan_applies_bias_softplus_and_gate():
    x, dt, A, B, C, D = inputs(1, 8, 4, 40)
    raw, bias, z = torch.randn(1, 8, 40), torch.randn(8), torch.randn(1, 8, 40)
    y, _ = selective_scan(x, raw, bias, A, B, C, D, z=z)
    y_ref, _ = sequential_scan(x, F.softplus(raw + bias[None, :, None]), A, B, C, D)
    assert rel(y, y_ref * F.silu(z)) < 1e-5


def test_chunked_memory_does_not_scale_with_full_sequence_state():
    # The largest tensor the pure path builds is one block of [b, d, block, n], not [b, d, L, n].
    x, dt, A, B, C, D = inputs(1, 4, 2, 2048)
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                seen.append(out.numel())
            return out

    with Spy():
        chunked_scan(x, dt, A, B, C, D, chunk=32, block=256)
    assert max(seen) < 4 * 2 * 2048  # [b, d, L, n] would be 16,384 elements


def test_kernel_status_says_why_kernels_are_not_used():
    available, reason = kernel_status()
    if not torch.cuda.is_available():
        assert not available and kernels() is None and reason.startswith("no CUDA device")
    else:  # on a GPU machine: either the versions in use, or what failed to import
        assert available == (kernels() is not None) and reason


def test_kernel_import_reasons_tell_missing_from_broken(tmp_path, monkeypatch):
    (tmp_path / "broken_kernel_pkg").mkdir()
    (tmp_path / "broken_kernel_pkg" / "__init__.py").write_text("raise ImportError('libcudart.so.12: cannot open')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn, why = _import_kernel("broken-kernel-pkg", "broken_kernel_pkg.ops", "fn")
    assert fn is None and why == "broken-kernel-pkg failed to import: ImportError: libcudart.so.12: cannot open"
    fn, why = _import_kernel("absent-kernel-pkg", "absent_kernel_pkg_xyz.ops", "fn")
    assert fn is None and why == "absent-kernel-pkg not installed"
    fn, why = _import_kernel("json", "json", "dumps")
    assert fn is not None and why == ""


def _segments(b: int, L: int, starts: dict[int, list[int]]) -> torch.Tensor:
    seg = torch.zeros(b, L, dtype=torch.long)
    for row, positions in starts.items():
        for t in positions:
            seg[row, t:] += 1
    return seg


# documents starting inside chunks, exactly at a chunk's first token (45 = 3 x 15), and a row without any
RESETS = {0: [20, 45, 61], 1: [7]}


def _leaves(b, d, n, L, seed=0):
    x, dt, A, B, C, D = inputs(b, d, n, L, seed=seed)
    h0 = torch.randn(b, d, n, generator=torch.Generator().manual_seed(seed + 1))
    return [t.clone().requires_grad_(True) for t in (x, dt, A, B, C, D, h0)]


def _grads(y, h, leaves, w_y, w_h):
    grads = torch.autograd.grad((y * w_y).sum() + (h * w_h).sum(), leaves, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


@pytest.mark.parametrize("resets", [False, True])
def test_scan_with_initial_state_equals_sequential_with_gradients(resets):
    """chunked_scan(h0=...) against the loop: outputs, final state and the gradients of x, dt, A, B, C, D, h0."""
    b, d, n, L = 2, 8, 4, 75
    seg = _segments(b, L, RESETS) if resets else None
    ref, got = _leaves(b, d, n, L), _leaves(b, d, n, L)
    y_ref, h_ref = sequential_scan(*ref[:6], h0=ref[6], segment=seg)
    y, h = chunked_scan(*got[:6], h0=got[6], segment=seg, chunk=8, block=32)
    assert rel(y, y_ref) < 1e-5 and rel(h, h_ref) < 1e-5
    w_y, w_h = torch.randn_like(y_ref), torch.randn_like(h_ref)
    for name, g, g_ref in zip(["x", "dt", "A", "B", "C", "D", "h0"], _grads(y, h, got, w_y, w_h), _grads(y_ref, h_ref, ref, w_y, w_h)):
        assert g_ref.abs().max() > 0, name
        assert rel(g, g_ref) < 1e-4, name
    if not resets:  # the state matters: without it the outputs differ
        y_zero, _ = sequential_scan(*[t.detach() for t in ref[:6]])
        assert rel(y_zero, y_ref) > 1e-2


@pytest.mark.parametrize("resets", [False, True])
@pytest.mark.parametrize("parts", [2, 5])
def test_state_passing_over_chunks_equals_one_scan_with_gradients(resets, parts):
    """The context-parallel algorithm in one process: the sequence cut into ``parts`` contiguous chunks, each
    scanned from zero; final states and total decays chained; each chunk corrected by the state entering it.
    Equal to the sequential scan of the whole sequence, outputs and gradients of x, dt, A, B, C, D, h0."""
    b, d, n, L = 2, 8, 4, 75
    seg = _segments(b, L, RESETS) if resets else None
    ref, got = _leaves(b, d, n, L), _leaves(b, d, n, L)
    y_ref, h_ref = sequential_scan(*ref[:6], h0=ref[6], segment=seg)
    x, dt, A, B, C, D, h0 = got
    bounds = [round(i * L / parts) for i in range(parts + 1)]
    pieces = [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])]
    local, finals, decays, keeps = [], [], [], []
    for j, sl in enumerate(pieces):
        s = seg[:, sl] if seg is not None else None
        y_j, h_j = chunked_scan(x[..., sl], dt[..., sl], A, B[..., sl], C[..., sl], D, segment=s, chunk=4, block=8)
        # the kernel path's differentiable final state equals the pure scan's
        assert rel(final_state(x[..., sl], dt[..., sl], A, B[..., sl], s, block=8), h_j) < 1e-5
        local.append(y_j)
        finals.append(h_j)
        decays.append(total_decay(dt[..., sl], A, s))
        keeps.append(None if seg is None else (seg[:, sl.start] == seg[:, sl.start - 1]) if j else None)
    # h0 enters chunk 0 like the state handed on from an earlier (virtual) chunk
    finals, decays = [h0] + finals, [torch.zeros_like(h0)] + decays
    keeps = [None, None] + keeps[1:]
    entering = chain_states(finals, decays, keeps)[1:]
    ys = [y_j + state_correction(dt[..., sl], A, C[..., sl], h_in, seg[:, sl] if seg is not None else None, block=8)
          for y_j, sl, h_in in zip(local, pieces, entering)]
    y = torch.cat(ys, dim=-1)
    h = finals[-1] + decays[-1] * entering[-1]
    assert rel(y, y_ref) < 1e-5 and rel(h, h_ref) < 1e-5
    w_y, w_h = torch.randn_like(y_ref), torch.randn_like(h_ref)
    for name, g, g_ref in zip(["x", "dt", "A", "B", "C", "D", "h0"], _grads(y, h, got, w_y, w_h), _grads(y_ref, h_ref, ref, w_y, w_h)):
        assert rel(g, g_ref) < 1e-4, name


def test_state_passing_scan_on_the_kernel_path_keeps_the_final_state_differentiable(monkeypatch):
    """On CUDA ``scan_for_state_passing`` takes its outputs from mamba-ssm's ``selective_scan_fn``, whose last
    state has no gradient, and the final state from ``final_state``. Here a stand-in with the kernel's
    signature and outputs (computed by the pure scan, its last state never returned) takes the kernel's
    place: outputs, final state and all gradients equal the pure path's."""
    from model import scan

    def fake_kernel(x, dt_raw, A, B, C, D, z=None, delta_bias=None, delta_softplus=False):
        assert z is None and delta_softplus
        y, _ = chunked_scan(x, F.softplus(dt_raw.float() + delta_bias[None, :, None]), A, B, C, D)
        return y

    b, d, n, L = 2, 8, 4, 40
    x, raw, A, B, C, D = inputs(b, d, n, L)
    bias = torch.randn(d)
    results = []
    for kernel in (False, True):
        if kernel:
            monkeypatch.setattr(scan, "use_kernels", lambda *a: True)
            monkeypatch.setattr(scan, "kernels", lambda: {"selective_scan_fn": fake_kernel})
        leaves = [t.clone().requires_grad_(True) for t in (x, raw, A, B, C, D)]
        y, h = scan.scan_for_state_passing(leaves[0], leaves[1], bias, *leaves[2:], chunk=8)
        grads = torch.autograd.grad((y * torch.cos(y)).sum() + (h * h).sum(), leaves)
        results.append((y, h, grads))
    (y0, h0, g0), (y1, h1, g1) = results
    assert rel(y1, y0) < 1e-6 and rel(h1, h0) < 1e-5
    for name, a, b_ in zip(["x", "dt_raw", "A", "B", "C", "D"], g1, g0):
        assert rel(a, b_) < 1e-4, name
