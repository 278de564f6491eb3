"""The selective scan (Mamba-1's recurrence), in one place: a fast CUDA path and a pure-PyTorch path that
compute the same function, chosen here and nowhere else.

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t          (per channel d and state n)
    y_t = <C_t, h_t> + D * x_t

Shapes follow mamba-ssm: ``x, dt: [b, d, L]``, ``A: [d, n]``, ``B, C: [b, n, L]``, ``D: [d]``; ``dt`` is
already ``softplus(dt_proj(...) + bias)``.

The pure path splits the sequence into chunks of ``chunk`` tokens. Inside a chunk the recurrence is solved
in closed form with two cumulative sums (``S``, the running sum of ``dt * A``, and the running sum of
``exp(-S) * dt * x * B``), for all chunks of a block at once; the states entering the chunks are then
chained, one cheap ``[b, d, n]`` update per chunk. Where a chunk's total decay could overflow ``exp(-S)``
in float32 the block is computed in float64, and past that with one-token chunks, so the result is exact.
Memory is ``[b, d, block, n]`` for one block, never ``[b, d, L, n]``; under autograd each block is
recomputed in the backward pass (activation checkpointing), so what is kept for backward is the block
inputs and the ``[b, d, n]`` states between blocks.

Document boundaries (``segment`` ids ``[b, L]``, increasing at each new document) reset the state: no
contribution crosses from one segment to the next.
"""

from __future__ import annotations

import importlib
from importlib import metadata

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def sequential_scan(x, dt, A, B, C, D=None, h0=None, segment=None):
    """The reference: a plain loop over time. Returns (y [b, d, L], h_last [b, d, n])."""
    b, d, L = x.shape
    h = torch.zeros(b, d, A.shape[1], dtype=torch.float32, device=x.device) if h0 is None else h0.float()
    xf, dtf, Bf, Cf = x.float(), dt.float(), B.float(), C.float()
    ys = []
    for t in range(L):
        decay = torch.exp(dtf[:, :, t, None] * A)
        if segment is not None and t > 0:
            keep = (segment[:, t] == segment[:, t - 1]).to(h.dtype)[:, None, None]
            h = h * keep
        h = decay * h + (dtf[:, :, t] * xf[:, :, t])[:, :, None] * Bf[:, None, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, Cf[:, :, t]))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + xf * D.float()[None, :, None]
    return y.to(x.dtype), h


# The closed form multiplies exp(-S) by exp(S); exp(-S) must stay finite, so a chunk may span at most this
# much total decay (sum of -dt*A, in nats): float32 overflows past e^88, float64 past e^709.
_DECAY_LIMIT = {torch.float32: 60.0, torch.float64: 600.0}


def _segment_starts(seg: torch.Tensor, seg_prev: torch.Tensor, T: int) -> torch.Tensor:
    """For each position, the index within its chunk where its document segment starts (-1: before it)."""
    b, L = seg.shape
    boundary = torch.empty_like(seg, dtype=torch.bool)
    boundary[:, 0] = seg[:, 0] != seg_prev
    boundary[:, 1:] = seg[:, 1:] != seg[:, :-1]
    positions = torch.arange(T, device=seg.device).repeat(L // T)
    marked = torch.where(boundary, positions, -1).view(b, L // T, T)
    return torch.cummax(marked, dim=2).values                                    # [b, nc, T]


def _block(x, dt, A, B, C, h0, seg, seg_prev, T: int):
    """A run of whole chunks of T tokens, all chunks solved at once, then their states chained.

    Per chunk, with S_t = sum_{s<=t} dt_s A (<= 0) and v_s = dt_s x_s B_s, the state from a zero start is
    hloc_t = exp(S_t) * sum_{s<=t} exp(-S_s) v_s (two cumsums); the true state adds exp(S_t) * H, H the state
    entering the chunk, and the H are chained chunk by chunk. x, dt: [b, d, L]; B, C: [b, n, L], L % T == 0.
    """
    b, d, L = x.shape
    n, nc = A.shape[1], L // T
    S = torch.cumsum((dt[..., None] * A[None, :, None, :]).view(b, d, nc, T, n), dim=3)
    worst = float(-S[:, :, :, -1].detach().min()) if T > 1 else 0.0
    dtype = next((t for t, limit in _DECAY_LIMIT.items() if worst <= limit), None)
    if dtype is None:  # pathological decay: fall back to one-token chunks, which need no exp(-S)
        return _block(x, dt, A, B, C, h0, seg, seg_prev, 1)
    v = ((dt * x)[..., None] * B.transpose(1, 2)[:, None]).view(b, d, nc, T, n)
    start = _segment_starts(seg, seg_prev, T) if seg is not None else None      # [b, nc, T]
    if T == 1:
        hloc = v
    else:
        S_, v_ = S.to(dtype), v.to(dtype)
        acc = torch.cumsum(torch.exp(-S_) * v_, dim=3)
        if start is not None:
            idx = (start - 1).clamp(min=0)[:, None, :, :, None].expand(b, d, nc, T, n)
            acc = acc - torch.gather(acc, 3, idx) * (start >= 1)[:, None, :, :, None].to(dtype)
        hloc = (torch.exp(S_) * acc).to(torch.float32)
    carry_ok = (start < 0)[:, None, :, :, None].to(torch.float32) if start is not None else None  # [b,1,nc,T,1]
    decay_end = torch.exp(S[:, :, :, -1])                                        # [b, d, nc, n]
    entering = []
    H = h0
    for c in range(nc):
        entering.append(H)
        carried = decay_end[:, :, c] * H
        if carry_ok is not None:
            carried = carried * carry_ok[:, :, c, -1]
        H = carried + hloc[:, :, c, -1]
    Hs = torch.stack(entering, dim=2)[:, :, :, None, :]                          # [b, d, nc, 1, n]
    carry = torch.exp(S) * Hs
    if carry_ok is not None:
        carry = carry * carry_ok
    h_all = hloc + carry                                                         # [b, d, nc, T, n]
    y = torch.einsum("bdctn,bnct->bdct", h_all, C.view(b, n, nc, T)).reshape(b, d, L)
    return y, H


def chunked_scan(x, dt, A, B, C, D=None, h0=None, segment=None, chunk: int = 32, block: int = 256):
    """Pure-PyTorch selective scan, equal to ``sequential_scan`` to float32 rounding.

    The sequence is processed ``block`` tokens at a time (memory ``[b, d, block, n]``), each block as
    chunks of ``chunk`` tokens solved in closed form together.
    """
    b, d, L = x.shape
    n = A.shape[1]
    xf, dtf, Bf, Cf, Af = x.float(), dt.float(), B.float(), C.float(), A.float()
    h = torch.zeros(b, d, n, dtype=torch.float32, device=x.device) if h0 is None else h0.float()
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, dt, A, B, C))
    block = max(chunk, block // chunk * chunk)
    ys = []
    seg_prev = segment[:, 0] if segment is not None else None
    for start in range(0, L, block):
        end = min(L, start + block)
        xs, dts, Bs, Cs = xf[:, :, start:end], dtf[:, :, start:end], Bf[:, :, start:end], Cf[:, :, start:end]
        seg = segment[:, start:end] if segment is not None else None
        pad = (-(end - start)) % chunk
        if pad:  # dt = 0 and x = 0 leave the state untouched, so padding changes nothing before it
            xs, dts = F.pad(xs, (0, pad)), F.pad(dts, (0, pad))
            Bs, Cs = F.pad(Bs, (0, pad)), F.pad(Cs, (0, pad))
            if seg is not None:
                seg = torch.cat([seg, seg[:, -1:].expand(-1, pad)], dim=1)
        args = (xs, dts, Af, Bs, Cs, h, seg, seg_prev, chunk)
        # Recompute each block in backward: autograd keeps the block inputs and [b, d, n] states only.
        y, h = checkpoint(_block, *args, use_reentrant=False) if grad else _block(*args)
        ys.append(y[:, :, : end - start])
        if seg is not None:
            seg_prev = seg[:, -1]
    y = torch.cat(ys, dim=-1)
    if D is not None:
        y = y + xf * D.float()[None, :, None]
    return y.to(x.dtype), h


# ------------------------------------------------------------------ state passing (context parallelism)
# The scan is linear in its state: a sequence split into contiguous chunks is scanned chunk by chunk from a
# zero state, and each chunk's outputs are then corrected by the state entering it,
#     y_t  +=  <C_t, exp(A * sum_{s<=t} dt_s) * h_in>      (until the chunk's first document start),
# where h_in chains the earlier chunks' final states and total decays (``chain_states``). These pieces are
# what train/context_parallel.py exchanges between ranks; each is O([b, d, n]) to send and computed in
# blocks of tokens, never [b, d, L, n].

def _alive(segment: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """[b, L] float: 1 while the chunk's first document continues (no reset since the first token)."""
    if segment is None:
        return None
    same = (segment == segment[:, :1]).to(torch.int32)
    return torch.cummin(same, dim=1).values.to(like.dtype)


def total_decay(dt: torch.Tensor, A: torch.Tensor, segment: torch.Tensor | None = None) -> torch.Tensor:
    """[b, d, n]: what a state entering the chunk is multiplied by at its end, exp(A * sum_t dt_t); 0 where
    a document starts inside the chunk (after its first token), which cuts the carried state off."""
    decay = torch.exp(dt.float().sum(-1)[..., None] * A.float()[None])
    alive = _alive(segment, decay)
    return decay if alive is None else decay * alive[:, -1, None, None]


def _correction_block(cum, A, C, h_in, alive):
    carried = torch.exp(cum[..., None] * A[None, :, None, :]) * h_in[:, :, None, :]   # [b, d, blk, n]
    y = torch.einsum("bdtn,bnt->bdt", carried, C)
    return y if alive is None else y * alive[:, None, :]


def state_correction(dt: torch.Tensor, A: torch.Tensor, C: torch.Tensor, h_in: torch.Tensor,
                     segment: torch.Tensor | None = None, block: int = 256) -> torch.Tensor:
    """[b, d, L]: the outputs a state ``h_in`` [b, d, n] entering the chunk adds to a zero-start scan
    (``D`` and the gate excluded). dt [b, d, L] (after softplus), C [b, n, L]. ``block`` tokens at a time,
    each recomputed in backward, so memory is [b, d, block, n]."""
    cum = torch.cumsum(dt.float(), dim=-1)
    Af, Cf, h = A.float(), C.float(), h_in.float()
    alive = _alive(segment, cum)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (dt, A, C, h_in))
    ys = []
    for start in range(0, cum.shape[-1], block):
        end = min(start + block, cum.shape[-1])
        args = (cum[..., start:end], Af, Cf[..., start:end], h, None if alive is None else alive[:, start:end])
        ys.append(checkpoint(_correction_block, *args, use_reentrant=False) if grad else _correction_block(*args))
    return torch.cat(ys, dim=-1)


def _final_block(rest, dt, x, B, A, live):
    w = torch.exp(rest[..., None] * A[None, :, None, :])                          # [b, d, blk, n]
    v = (dt * x)[..., None] * B.transpose(1, 2)[:, None]
    if live is not None:
        v = v * live[:, None, :, None]
    return (w * v).sum(2)


def final_state(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                segment: torch.Tensor | None = None, block: int = 256) -> torch.Tensor:
    """[b, d, n]: the state a zero-start scan ends the chunk with, sum_t exp(A * sum_{s>t} dt_s) dt_t x_t B_t
    over the chunk's last document, differentiably (mamba-ssm's ``return_last_state`` has no gradient)."""
    dtf = dt.float()
    cum = torch.cumsum(dtf, dim=-1)
    rest = cum[..., -1:] - cum                                                     # sum_{s>t} dt_s >= 0
    live = None if segment is None else (segment == segment[:, -1:]).to(torch.float32)
    xf, Bf, Af = x.float(), B.float(), A.float()
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, dt, A, B))
    h = None
    for start in range(0, x.shape[-1], block):
        end = min(start + block, x.shape[-1])
        args = (rest[..., start:end], dtf[..., start:end], xf[..., start:end], Bf[..., start:end], Af,
                None if live is None else live[:, start:end])
        part = checkpoint(_final_block, *args, use_reentrant=False) if grad else _final_block(*args)
        h = part if h is None else h + part
    return h


def chain_states(finals: list[torch.Tensor], decays: list[torch.Tensor], keeps: list[torch.Tensor | None]
                 ) -> list[torch.Tensor]:
    """The state entering each chunk, from every chunk's zero-start final state and total decay.
    ``keeps[j]`` [b]: 0 where chunk j's first token starts a new document (the carried state is reset
    there), None for no resets. Chunk 0 starts from zero."""
    entering = []
    H = torch.zeros_like(finals[0])
    for j, (final, decay) in enumerate(zip(finals, decays)):
        if j and keeps[j] is not None:
            H = H * keeps[j].to(H.dtype)[:, None, None]
        entering.append(H)
        H = final + decay * H
    return entering


def step(x, dt, A, B, C, D, h):
    """One decoding step. x, dt: [b, d]; B, C: [b, n]; h: [b, d, n] (float32). Returns (y [b, d], h)."""
    dtf = dt.float()
    h = torch.exp(dtf[..., None] * A) * h + (dtf * x.float())[..., None] * B.float()[:, None, :]
    y = torch.einsum("bdn,bn->bd", h, C.float()) + x.float() * D.float()
    return y.to(x.dtype), h


# ---------------------------------------------------------------------------------------- dispatch
_KERNELS: dict[str, object] | None = None
_KERNEL_REASON = ""


def _import_kernel(package: str, module: str, name: str) -> tuple[object | None, str]:
    """One kernel function, or None and why not (a missing package reads differently from a broken one)."""
    try:
        return getattr(importlib.import_module(module), name), ""
    except ModuleNotFoundError as exc:
        if exc.name == module.split(".")[0]:
            return None, f"{package} not installed"
        return None, f"{package} failed to import: ModuleNotFoundError: {exc}"
    except Exception as exc:  # ImportError of the compiled extension, an undefined symbol, a CUDA error
        return None, f"{package} failed to import: {type(exc).__name__}: {exc}"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown version"


def _load_kernels() -> tuple[dict[str, object], str]:
    if not torch.cuda.is_available():
        # mamba-ssm <= 2.3.2.post1 cannot even be imported without its CUDA extension: don't try.
        return {}, f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda})"
    conv, conv_why = _import_kernel("causal-conv1d", "causal_conv1d", "causal_conv1d_fn")
    ssm, ssm_why = _import_kernel("mamba-ssm", "mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")
    if conv is None or ssm is None:
        return {}, "; ".join(why for why in (ssm_why, conv_why) if why)
    found = f"mamba-ssm {_version('mamba-ssm')}, causal-conv1d {_version('causal-conv1d')}"
    return {"selective_scan_fn": ssm, "causal_conv1d_fn": conv}, found


def kernel_status() -> tuple[bool, str]:
    """(available, reason): why the CUDA kernels are not used here, or which versions are when they are."""
    global _KERNELS, _KERNEL_REASON
    if _KERNELS is None:
        _KERNELS, _KERNEL_REASON = _load_kernels()
    return bool(_KERNELS), _KERNEL_REASON


def kernels() -> dict[str, object] | None:
    """mamba-ssm / causal-conv1d CUDA kernels, imported lazily; None when they are not usable here
    (``kernel_status()`` says why)."""
    available, _ = kernel_status()
    return _KERNELS if available else None


def use_kernels(x: torch.Tensor, segment, want: bool) -> bool:
    return want and x.is_cuda and segment is None and kernels() is not None


def selective_scan(x, dt_raw, dt_bias, A, B, C, D, z=None, segment=None, chunk: int = 32,
                   use_cuda_kernels: bool = True, h0: torch.Tensor | None = None):
    """y = scan(...) * silu(z); ``dt_raw`` is dt_proj's output without bias (softplus applied here).

    On CUDA with mamba-ssm installed (and no document resets) this is ``selective_scan_fn`` with the bias
    and softplus fused; elsewhere the chunked pure-PyTorch scan. ``h0`` [b, d, n] is the state entering the
    sequence (a warm decoding cache); ``selective_scan_fn`` takes no initial state, so with one the pure
    path runs. Returns (y [b, d, L], h_last [b, d, n]).
    """
    if h0 is None and use_kernels(x, segment, use_cuda_kernels):
        fn = kernels()["selective_scan_fn"]
        y, last = fn(x, dt_raw, A, B, C, D.float(), z=z, delta_bias=dt_bias.float(), delta_softplus=True,
                     return_last_state=True)
        return y, last
    dt = F.softplus(dt_raw.float() + dt_bias.float()[None, :, None])
    y, h = chunked_scan(x, dt, A, B, C, D, h0=h0, segment=segment, chunk=chunk)
    if z is not None:
        y = y * F.silu(z.float()).to(y.dtype)
    return y, h


def _softplus_dt(dt_raw: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    return F.softplus(dt_raw.float() + dt_bias.float()[None, :, None])


def _final_from_raw(x, dt_raw, dt_bias, A, B, segment):
    return final_state(x, _softplus_dt(dt_raw, dt_bias), A, B, segment)


def _decay_from_raw(dt_raw, dt_bias, A, segment):
    return total_decay(_softplus_dt(dt_raw, dt_bias), A, segment)


def _corrected_and_gated(y, dt_raw, dt_bias, A, C, h_in, z, segment):
    y = (y.float() + state_correction(_softplus_dt(dt_raw, dt_bias), A, C, h_in, segment)).to(y.dtype)
    return y * F.silu(z.float()).to(y.dtype)   # as selective_scan gates


def _recomputed(fn, *args):
    """``fn(*args)``, keeping only its inputs for backward (it runs again there): the fp32 dt, its sums and
    the gate's temporaries would otherwise be kept for every token, ~30 bytes per channel."""
    grad = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    return checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args)


def scan_for_state_passing(x, dt_raw, dt_bias, A, B, C, D, segment=None, chunk: int = 32,
                           use_cuda_kernels: bool = True):
    """One context-parallel chunk scanned from a zero state, ungated: (y [b, d, L] with ``D * x``, final state
    [b, d, n] float32 with its gradient). ``dt_raw`` is dt_proj's output without bias.

    On CUDA with mamba-ssm (no document resets) the outputs come from ``selective_scan_fn``; its
    ``return_last_state`` is not differentiable, so the final state is ``final_state`` in PyTorch
    (recomputed in backward). Elsewhere the chunked scan gives both."""
    if use_kernels(x, segment, use_cuda_kernels):
        fn = kernels()["selective_scan_fn"]
        y = fn(x, dt_raw, A, B, C, D.float(), z=None, delta_bias=dt_bias.float(), delta_softplus=True)
        return y, _recomputed(_final_from_raw, x, dt_raw, dt_bias, A, B, segment)
    y, h = chunked_scan(x, _softplus_dt(dt_raw, dt_bias), A, B, C, D, segment=segment, chunk=chunk)
    return y, h


def state_passing_decay(dt_raw, dt_bias, A, segment=None) -> torch.Tensor:
    """``total_decay`` of a chunk from dt_proj's output (recomputed in backward)."""
    return _recomputed(_decay_from_raw, dt_raw, dt_bias, A, segment)


def corrected_and_gated(y, dt_raw, dt_bias, A, C, h_in, z, segment=None) -> torch.Tensor:
    """A zero-start chunk's outputs ``y`` corrected by the state ``h_in`` entering it, then gated by
    ``silu(z)``, as ``selective_scan`` gates (recomputed in backward: only the inputs are kept)."""
    return _recomputed(_corrected_and_gated, y, dt_raw, dt_bias, A, C, h_in, z, segment)
