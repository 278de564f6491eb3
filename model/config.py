"""Jamba's configuration in the paper's own terms.

A model is ``n_blocks`` Jamba blocks of ``layers_per_block`` layers. Within a block, layer ``i`` is an
attention layer when ``i % attn_period == attn_offset`` and a Mamba layer otherwise (the a:m ratio is
1:(attn_period-1)); its feed-forward is a mixture of experts when ``i % expert_period == expert_offset``
and a dense SwiGLU MLP otherwise. The released Jamba-v0.1: 4 blocks x 8 layers, attention at 4 of 8, MoE on
odd layers with 16 experts, top-2.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml


class ModelConfigError(ValueError):
    """One line naming the offending key."""


@dataclass
class JambaConfig:
    vocab_size: int = 65536
    d_model: int = 4096
    n_blocks: int = 4
    layers_per_block: int = 8
    attn_period: int = 8
    attn_offset: int = 4
    expert_period: int = 2
    expert_offset: int = 1
    n_experts: int = 16
    top_k: int = 2
    n_heads: int = 32
    n_kv_heads: int = 8
    ffn_dim: int = 14336
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int | None = None  # None: ceil(d_model / 16), as HF's "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    scan_chunk: int = 32  # pure-PyTorch selective scan: tokens per chunk

    def __post_init__(self) -> None:
        if self.mamba_dt_rank is None:
            self.mamba_dt_rank = math.ceil(self.d_model / 16)
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def n_layers(self) -> int:
        return self.n_blocks * self.layers_per_block

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_inner(self) -> int:
        return self.mamba_expand * self.d_model

    def is_attention(self, layer: int) -> bool:
        return layer % self.attn_period == self.attn_offset

    def is_moe(self, layer: int) -> bool:
        return self.n_experts > 1 and layer % self.expert_period == self.expert_offset

    @property
    def layer_kinds(self) -> list[str]:
        return ["attention" if self.is_attention(i) else "mamba" for i in range(self.n_layers)]

    @property
    def attention_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_attention(i)]

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ModelConfigError(f"{key}: {why}")

        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and not isinstance(value, bool) and f.name not in (
                    "attn_offset", "expert_offset", "pad_token_id", "bos_token_id", "eos_token_id"):
                need(value > 0, f.name, f"must be positive, got {value}")
        need(self.d_model % self.n_heads == 0, "n_heads", f"must divide d_model {self.d_model}")
        need(self.n_heads % self.n_kv_heads == 0, "n_kv_heads", f"must divide n_heads {self.n_heads}")
        need(0 <= self.attn_offset < self.attn_period, "attn_offset", "must be in [0, attn_period)")
        need(0 <= self.expert_offset < self.expert_period, "expert_offset", "must be in [0, expert_period)")
        need(self.top_k <= self.n_experts, "top_k", f"must be <= n_experts {self.n_experts}")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be positive")

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<config>") -> JambaConfig:
        if not isinstance(data, dict):
            raise ModelConfigError(f"{source}: the top level must be a mapping")
        known = {f.name: f for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ModelConfigError(f"{source}: {key}: unknown key")
        try:
            return cls(**data)
        except ModelConfigError as exc:
            raise ModelConfigError(f"{source}: {exc}") from None
        except TypeError as exc:
            raise ModelConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> JambaConfig:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ModelConfigError(f"{path}: cannot read: {exc.strerror}") from None
        return cls.from_dict(data.get("model", data) if isinstance(data, dict) else data, str(path))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ------------------------------------------------------------------ Hugging Face config.json
    def to_hf(self) -> dict[str, Any]:
        return {
            "architectures": ["JambaForCausalLM"], "model_type": "jamba",
            "vocab_size": self.vocab_size, "hidden_size": self.d_model, "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "hidden_act": "silu", "initializer_range": self.init_std,
            "rms_norm_eps": self.rms_norm_eps, "tie_word_embeddings": self.tie_embeddings,
            "router_aux_loss_coef": self.router_aux_loss_coef, "num_experts_per_tok": self.top_k,
            "num_experts": self.n_experts, "expert_layer_period": self.expert_period,
            "expert_layer_offset": self.expert_offset, "attn_layer_period": self.attn_period,
            "attn_layer_offset": self.attn_offset, "mamba_d_state": self.mamba_d_state,
            "mamba_d_conv": self.mamba_d_conv, "mamba_expand": self.mamba_expand,
            "mamba_dt_rank": self.mamba_dt_rank, "mamba_conv_bias": self.mamba_conv_bias,
            "mamba_proj_bias": self.mamba_proj_bias, "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "use_mamba_kernels": False, "max_position_embeddings": 262144,
        }

    @classmethod
    def from_hf(cls, hf: dict[str, Any], layers_per_block: int | None = None) -> JambaConfig:
        n_layers = hf.get("num_hidden_layers", 32)
        per_block = layers_per_block or math.lcm(hf.get("attn_layer_period", 8), hf.get("expert_layer_period", 2))
        if n_layers % per_block:
            per_block = n_layers  # a depth that is not whole blocks: one block of all layers
        dt_rank = hf.get("mamba_dt_rank", "auto")
        return cls(
            vocab_size=hf.get("vocab_size", 65536), d_model=hf.get("hidden_size", 4096),
            n_blocks=n_layers // per_block, layers_per_block=per_block,
            attn_period=hf.get("attn_layer_period", 8), attn_offset=hf.get("attn_layer_offset", 4),
            expert_period=hf.get("expert_layer_period", 2), expert_offset=hf.get("expert_layer_offset", 1),
            n_experts=hf.get("num_experts", 16), top_k=hf.get("num_experts_per_tok", 2),
            n_heads=hf.get("num_attention_heads", 32),
            n_kv_heads=hf.get("num_key_value_heads") or hf.get("num_attention_heads", 32),
            ffn_dim=hf.get("intermediate_size", 14336), mamba_d_state=hf.get("mamba_d_state", 16),
            mamba_d_conv=hf.get("mamba_d_conv", 4), mamba_expand=hf.get("mamba_expand", 2),
            mamba_dt_rank=None if dt_rank == "auto" else dt_rank,
            mamba_conv_bias=hf.get("mamba_conv_bias", True), mamba_proj_bias=hf.get("mamba_proj_bias", False),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
            init_std=hf.get("initializer_range", 0.02), router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
            pad_token_id=hf.get("pad_token_id", 0) or 0, bos_token_id=hf.get("bos_token_id", 1) or 1,
            eos_token_id=hf.get("eos_token_id", 2) or 2,
        )
