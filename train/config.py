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
    # context parallelism: each sample's sequence split over cp consecutive ranks (train/context_parallel.py)
    cp_size: int = Field(default=1, ge=1)
    zero_stage: int = Field(default=1, ge=0, le=3)
    micro_batch: int = Field(default=1, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    dtype: Literal["bf16", "fp32"] = "bf16"
    activation_checkpointing: bool = False
    loss_chunk_tokens: int = Field(default=0, ge=0)   # > 0: LM head + loss this many tokens at a time
    deepspeed: str | None = None          # configs/deepspeed/*.json: ZeRO buckets, comm overlap, ...
    memory_check: bool = True             # on CUDA, refuse to start when the memory plan does not fit
    expert_imbalance: float = Field(default=1.5, ge=1.0)   # memory plan: most-loaded EP rank / mean
    # bf16 runs: the dtype gradients are accumulated in over micro-steps and reduced in across ranks
    grad_reduce_dtype: Literal["fp32", "bf16"] = "fp32"

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
    peak_tflops: float | None = Field(default=None, gt=0)  # per device, for MFU; known GPUs are detected


class TrainConfig(_Strict):
    model: str                                         # a configs/model/*.yaml
    init_from: str | None = None                       # native or HF checkpoint to start from (not on resume)
    data: DataConfig
    steps: int = Field(ge=1)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig
    log: LogConfig = Field(default_factory=LogConfig)
    seed: int = 0

    @model_validator(mode="after")
    def _context_splits_the_sequence(self) -> TrainConfig:
        if self.data.seq_len % self.parallel.cp_size:
            raise ValueError(f"parallel.cp_size: {self.parallel.cp_size} must divide data.seq_len {self.data.seq_len}")
        return self


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
    if cfg.init_from:
        cfg.init_from = _expand(cfg.init_from)
    cfg.data.runs = [_expand(r) for r in cfg.data.runs]
    cfg.checkpoint.dir = _expand(cfg.checkpoint.dir)
    if cfg.parallel.deepspeed:
        cfg.parallel.deepspeed = _expand(cfg.parallel.deepspeed)
        _check_deepspeed_json(path, cfg)
    return cfg


# Keys the YAML owns; a DeepSpeed JSON may repeat them only with the same value.
_OWNED = {"train_micro_batch_size_per_gpu": lambda c: c.parallel.micro_batch,
          "gradient_accumulation_steps": lambda c: c.parallel.grad_accum,
          "gradient_clipping": lambda c: c.optim.grad_clip,
          "zero_optimization.stage": lambda c: c.parallel.zero_stage,
          "bf16.enabled": lambda c: c.parallel.dtype == "bf16",
          "communication_data_type": lambda c: c.parallel.grad_reduce_dtype if c.parallel.dtype == "bf16" else "fp32",
          "data_types.grad_accum_dtype": lambda c: c.parallel.grad_reduce_dtype if c.parallel.dtype == "bf16" else "fp32"}
# Settings with which DeepSpeed reduces expert gradients wrongly or not at all, refused with the reason.
_BROKEN_WITH_EXPERTS = {
    "zero_optimization.contiguous_gradients": (False, "its non-contiguous fallback all-reduces the gradients of "
                                               "different experts over the whole data-parallel group"),
    "zero_optimization.reduce_scatter": (False, "ZeRO-2 reduces expert gradients over the expert-data-parallel "
                                         "group only on the reduce-scatter path"),
    "zero_optimization.offload_optimizer": (None, "not with expert parallelism here: untested, and the plan does "
                                            "not model host memory"),
}
_REFUSED = ("optimizer", "scheduler", "train_batch_size", "fp16")


def _check_deepspeed_json(path: Path, cfg: TrainConfig) -> None:
    import json

    where = f"{path}: parallel.deepspeed"
    try:
        extra = json.loads(Path(cfg.parallel.deepspeed).read_text())
    except OSError as exc:
        raise TrainConfigError(f"{where}: cannot read {cfg.parallel.deepspeed}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise TrainConfigError(f"{where}: {cfg.parallel.deepspeed} is not valid JSON: {exc}") from None
    if not isinstance(extra, dict):
        raise TrainConfigError(f"{where}: {cfg.parallel.deepspeed} must hold a JSON object")
    for key in _REFUSED:
        if key in extra:
            raise TrainConfigError(f"{where}: {key}: set by the trainer (optim.* / parallel.*), remove it from the JSON")
    for dotted, value_of in _OWNED.items():
        node = _lookup(extra, dotted)
        if node is not None and node != value_of(cfg):
            raise TrainConfigError(f"{where}: {dotted} is {node!r} in the JSON but {value_of(cfg)!r} in the YAML; "
                                   f"set it in one place")


    for dotted, (bad, why) in _BROKEN_WITH_EXPERTS.items():
        node = _lookup(extra, dotted)
        if node is not None and (bad is None or node == bad):
            raise TrainConfigError(f"{where}: {dotted}: {node!r} is refused for a mixture-of-experts model: {why}")


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part, None) if isinstance(tree, dict) else None
    return tree


def _expand(value: str) -> str:
    return os.path.expandvars(os.path.expanduser(value))
