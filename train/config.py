"""The trainer's configuration: YAML in, validated object out, or one line naming the key."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class TrainConfigError(ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    runs: list[str] = Field(min_length=1)             # pipeline run directories (their manifest.json)
    weights: dict[str, float] | None = None           # source name -> mixture weight (default: all equal)
    seq_len: int = Field(default=2048, ge=8)
    pack: Literal["boundaries", "concat"] = "boundaries"
    seed: int = 1234


class OptimConfig(_Strict):
    lr: float = Field(default=3e-4, gt=0)
    min_lr: float = Field(default=3e-5, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = Field(default=0.1, ge=0)
    grad_clip: float = Field(default=1.0, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(default=100, ge=0)
    decay_fraction: float = Field(default=0.2, gt=0, le=1)   # wsd: final fraction of steps spent decaying


class ParallelConfig(_Strict):
    ep_size: int = Field(default=1, ge=1)
    zero_stage: int = Field(default=1, ge=0, le=3)
    micro_batch: int = Field(default=1, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    dtype: Literal["bf16", "fp32"] = "bf16"
    activation_checkpointing: bool = False

    @model_validator(mode="after")
    def _no_zero3_with_moe(self) -> ParallelConfig:
        if self.zero_stage == 3:
            raise ValueError("zero_stage 3 is not supported with DeepSpeed's native MoE (expert) parameters; "
                             "use zero_stage 1 or 2")
        return self


class CheckpointConfig(_Strict):
    dir: str
    every: int = Field(default=100, ge=1)
    keep: int = Field(default=3, ge=1)


class LogConfig(_Strict):
    every: int = Field(default=1, ge=1)
    tensorboard: bool = True


class TrainConfig(_Strict):
    model: str                                         # a configs/model/*.yaml
    data: DataConfig
    steps: int = Field(ge=1)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig
    log: LogConfig = Field(default_factory=LogConfig)
    seed: int = 0


def load_train_config(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> TrainConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise TrainConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise TrainConfigError(f"{path}: invalid YAML: {exc}") from None
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        cfg = TrainConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        msg = msg.removeprefix("Value error, ")
        raise TrainConfigError(f"{path}: {loc or '<root>'}: {msg}") from None
    # ~ and $VARS expand; relative paths are relative to the working directory (the repository root)
    cfg.model = _expand(cfg.model)
    cfg.data.runs = [_expand(r) for r in cfg.data.runs]
    cfg.checkpoint.dir = _expand(cfg.checkpoint.dir)
    return cfg


def _expand(value: str) -> str:
    return os.path.expandvars(os.path.expanduser(value))
