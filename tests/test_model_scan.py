"""The pure-PyTorch chunked selective scan equals the sequential reference (fp32 and bf16), with and without
document resets, with gradients, and in the pathological-decay regime."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.scan import (
    _import_kernel,
    chunked_scan,
    kernel_status,
    kernels,
    selective_scan,
    sequential_scan,
    step,
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
