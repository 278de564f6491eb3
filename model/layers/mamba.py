"""The Mamba-1 mixer with Jamba's inner RMSNorms on dt (before dt_proj), B and C (paper section 6.4).

    x, z = in_proj(h)                        (d_inner each)
    x = silu(causal_depthwise_conv(x))
    dt, B, C = x_proj(x)                     (dt_rank, d_state, d_state)
    dt, B, C = norm_dt(dt), norm_B(B), norm_C(C)
    y = selective_scan(x, softplus(dt_proj(dt)), A = -exp(A_log), B, C, D) * silu(z)
    out = out_proj(y)

The norms sit outside the scan kernel, so the CUDA path uses ``selective_scan_fn`` and
``causal_conv1d_fn`` directly; mamba-ssm's ``mamba_inner_fn`` would fold dt_proj in before the dt norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model import scan
from model.config import JambaConfig
from model.layers.norm import RMSNorm


def _segment_shift_mask(segment: torch.Tensor, k: int) -> torch.Tensor:
    """[b, L] -> [b, 1, L]: 1 where the token k steps back is in the same document."""
    same = torch.zeros_like(segment, dtype=torch.bool)
    same[:, k:] = segment[:, k:] == segment[:, :-k]
    return same[:, None, :]


class MambaMixer(nn.Module):
    def __init__(self, cfg: JambaConfig):
        super().__init__()
        self.cfg = cfg
        d_inner, n, r = cfg.d_inner, cfg.mamba_d_state, cfg.mamba_dt_rank
        self.d_inner, self.d_state, self.dt_rank, self.d_conv = d_inner, n, r, cfg.mamba_d_conv
        self.in_proj = nn.Linear(cfg.d_model, 2 * d_inner, bias=cfg.mamba_proj_bias)
        self.conv1d = nn.Conv1d(d_inner, d_inner, cfg.mamba_d_conv, groups=d_inner, bias=cfg.mamba_conv_bias,
                                padding=cfg.mamba_d_conv - 1)
        self.x_proj = nn.Linear(d_inner, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, d_inner, bias=True)
        A_log = torch.empty(d_inner, n)
        if not A_log.is_meta:  # computing it on meta would load torch's meta kernels (~70 MB per process)
            A_log.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.A_log = nn.Parameter(A_log)
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, cfg.d_model, bias=cfg.mamba_proj_bias)
        self.dt_layernorm = RMSNorm(r, cfg.rms_norm_eps)
        self.b_layernorm = RMSNorm(n, cfg.rms_norm_eps)
        self.c_layernorm = RMSNorm(n, cfg.rms_norm_eps)
        self.use_cuda_kernels = True

    # ------------------------------------------------------------------ pieces
    def _conv(self, x: torch.Tensor, segment: torch.Tensor | None) -> torch.Tensor:
        """Causal depthwise conv + SiLU over [b, d_inner, L]; with segments, taps never cross documents."""
        L = x.shape[-1]
        fast = scan.kernels() if (self.use_cuda_kernels and x.is_cuda and segment is None) else None
        if fast is not None:
            return fast["causal_conv1d_fn"](x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
        if segment is None:
            return F.silu(self.conv1d(x)[..., :L])
        weight = self.conv1d.weight.squeeze(1)                                    # [d, K]
        out = x * weight[:, -1:]
        for k in range(1, self.d_conv):
            shifted = F.pad(x, (k, 0))[..., :L] * _segment_shift_mask(segment, k).to(x.dtype)
            out = out + shifted * weight[:, -1 - k: weight.shape[1] - k]
        if self.conv1d.bias is not None:
            out = out + self.conv1d.bias[:, None]
        return F.silu(out)

    def _ssm_inputs(self, x: torch.Tensor):
        """x [b, L, d_inner] -> dt_raw [b, d_inner, L] (no bias), B, C [b, n, L]."""
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_layernorm(dt)
        B, C = self.b_layernorm(B), self.c_layernorm(C)
        dt_raw = F.linear(dt, self.dt_proj.weight)                                # bias added inside the scan
        return dt_raw.transpose(1, 2), B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()

    def _conv_continue(self, x: torch.Tensor, state) -> torch.Tensor:
        """Causal conv + SiLU of new inputs x [b, d_inner, L] that follow the cached ones; updates the cache.

        The cache holds the last ``d_conv`` inputs; the first output needs the last ``d_conv - 1`` of them,
        which is what a full forward's conv would read there.
        """
        xx = torch.cat([state.conv.to(x.dtype), x], dim=-1)
        state.conv = xx[..., -self.d_conv:].detach().clone()  # a copy: the slice would keep xx alive
        return F.silu(F.conv1d(xx[..., 1:], self.conv1d.weight, self.conv1d.bias, groups=self.d_inner))

    # ------------------------------------------------------------------ forward
    def forward(self, h: torch.Tensor, segment: torch.Tensor | None = None, state=None) -> torch.Tensor:
        """h [b, L, d_model]. ``state`` (a ``MambaState``): when empty it is filled for later decoding
        (prefill); when it holds an earlier call's conv inputs and SSM state (``state.ssm`` set) this call
        continues from them, for any L, as if both calls had been one sequence, and leaves the state a
        prefill of the whole sequence would."""
        b, L, _ = h.shape
        warm = state is not None and state.ssm is not None
        if warm and segment is not None:
            raise ValueError("segment: not supported when continuing from a warm Mamba state")
        if warm and L == 1:
            return self.step(h, state)  # the recurrence itself: cheaper than the chunked scan for one token
        xz = self.in_proj(h)
        x, z = xz.chunk(2, dim=-1)
        x_t = x.transpose(1, 2)                                                    # [b, d_inner, L]
        if warm:
            xc = self._conv_continue(x_t, state)
        else:
            if state is not None:  # the last d_conv conv inputs, left-padded with zeros for short prompts
                state.conv = F.pad(x_t, (max(0, self.d_conv - L), 0))[..., -self.d_conv:].detach().clone()
            xc = self._conv(x_t, segment)
        dt_raw, B, C = self._ssm_inputs(xc.transpose(1, 2))
        A = -torch.exp(self.A_log.float())
        y, last = scan.selective_scan(xc, dt_raw, self.dt_proj.bias, A, B, C, self.D, z=z.transpose(1, 2),
                                      segment=segment, chunk=self.cfg.scan_chunk,
                                      use_cuda_kernels=self.use_cuda_kernels, h0=state.ssm if warm else None)
        if state is not None:
            state.ssm = last.float()
        return self.out_proj(y.transpose(1, 2).to(h.dtype))

    def step(self, h: torch.Tensor, state) -> torch.Tensor:
        """One token: h [b, 1, d_model]; updates ``state.conv`` [b, d_inner, d_conv] and ``state.ssm``."""
        xz = self.in_proj(h[:, 0])
        x, z = xz.chunk(2, dim=-1)
        state.conv = torch.cat([state.conv[..., 1:], x[..., None]], dim=-1)
        weight = self.conv1d.weight.squeeze(1)
        xc = (state.conv * weight).sum(-1)
        if self.conv1d.bias is not None:
            xc = xc + self.conv1d.bias
        xc = F.silu(xc)
        dt_raw, B, C = self._ssm_inputs(xc[:, None])
        dt = F.softplus(dt_raw[..., 0].float() + self.dt_proj.bias.float())
        A = -torch.exp(self.A_log.float())
        y, state.ssm = scan.step(xc, dt, A, B[..., 0], C[..., 0], self.D, state.ssm)
        y = y * F.silu(z.float()).to(y.dtype)
        return self.out_proj(y.to(h.dtype))[:, None]
