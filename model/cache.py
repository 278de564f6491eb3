"""The hybrid generation cache: keys/values for attention layers only; conv and SSM state for Mamba layers.

KV memory grows with the sequence in the attention layers (1 in 8 in Jamba); the Mamba state is constant in
sequence length. ``nbytes()`` reports both from the tensors actually held.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KVState:
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v) if t is not None)


@dataclass
class MambaState:
    conv: torch.Tensor | None = None   # [b, d_inner, d_conv]: the last d_conv conv inputs
    ssm: torch.Tensor | None = None    # [b, d_inner, d_state], float32

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.conv, self.ssm) if t is not None)


@dataclass
class HybridCache:
    layers: list[KVState | MambaState] = field(default_factory=list)
    seen: int = 0

    @classmethod
    def for_model(cls, kinds: list[str]) -> HybridCache:
        return cls([KVState() if kind == "attention" else MambaState() for kind in kinds])

    def nbytes(self) -> dict[str, int]:
        kv = sum(s.nbytes() for s in self.layers if isinstance(s, KVState))
        state = sum(s.nbytes() for s in self.layers if isinstance(s, MambaState))
        return {"kv": kv, "mamba_state": state, "total": kv + state}
