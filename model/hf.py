"""Checkpoints: our native layout and Hugging Face's ``ai21labs/Jamba-v0.1`` layout, safetensors only.

Native: ``DIR/config.json`` (``JambaConfig`` fields) + ``DIR/model.safetensors`` with this package's keys
(experts stacked: ``layers.{i}.feed_forward.gate_up [E, 2F, d]``), or the same keys sharded like Hugging Face's.
Hugging Face: ``config.json`` (``JambaConfig`` of transformers) + ``model.safetensors`` or sharded
``model-0000x-of-0000y.safetensors`` with ``model.safetensors.index.json``, experts stored per expert::

    model.layers.{i}.feed_forward.experts.{e}.{gate_proj,up_proj,down_proj}.weight

(transformers >= 5 fuses them in memory as ``experts.gate_up_proj`` / ``experts.down_proj``; both are read.)
Nothing is ever unpickled: ``.bin``/``.pt``/``.pth``/``.pkl`` files are refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from model.config import JambaConfig
from model.jamba import Jamba

NATIVE_WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_EXPERT = re.compile(r"^layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class CheckpointError(ValueError):
    """A checkpoint problem, naming the file or key."""


# ------------------------------------------------------------------------------------- key mapping
def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: JambaConfig) -> dict[str, torch.Tensor]:
    """Our keys -> Hugging Face on-disk keys (per-expert layout)."""
    out: dict[str, torch.Tensor] = {}
    F = cfg.ffn_dim
    for key, value in state.items():
        if key == "lm_head.weight":
            out[key] = value
        elif key.endswith("feed_forward.gate_up"):
            base = key[: -len("gate_up")]
            for e in range(value.shape[0]):
                out[f"model.{base}experts.{e}.gate_proj.weight"] = value[e, :F]
                out[f"model.{base}experts.{e}.up_proj.weight"] = value[e, F:]
        elif key.endswith("feed_forward.down"):
            base = key[: -len("down")]
            for e in range(value.shape[0]):
                out[f"model.{base}experts.{e}.down_proj.weight"] = value[e]
        else:
            out[f"model.{key}"] = value
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: JambaConfig) -> dict[str, torch.Tensor]:
    """Hugging Face keys (per-expert on disk, or fused as in transformers 5 memory) -> our keys."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for key, value in hf.items():
        short = key[len("model."):] if key.startswith("model.") else key
        match = _EXPERT.match(short)
        if match:
            layer, e, proj = int(match.group(1)), int(match.group(2)), match.group(3)
            experts.setdefault((layer, proj), {})[e] = value
        elif short.endswith("feed_forward.experts.gate_up_proj"):
            out[short.replace("experts.gate_up_proj", "gate_up")] = value
        elif short.endswith("feed_forward.experts.down_proj"):
            out[short.replace("experts.down_proj", "down")] = value
        else:
            out[short] = value
    layers = sorted({layer for layer, _ in experts})
    for layer in layers:
        missing = [p for p in ("gate_proj", "up_proj", "down_proj") if (layer, p) not in experts]
        if missing:
            raise CheckpointError(f"model.layers.{layer}.feed_forward.experts.*.{missing[0]}.weight: missing")
        n = cfg.n_experts
        for proj in ("gate_proj", "up_proj", "down_proj"):
            have = experts[(layer, proj)]
            absent = [e for e in range(n) if e not in have]
            if absent:
                raise CheckpointError(f"model.layers.{layer}.feed_forward.experts.{absent[0]}.{proj}.weight: missing")
        gate = torch.stack([experts[(layer, "gate_proj")][e] for e in range(n)])
        up = torch.stack([experts[(layer, "up_proj")][e] for e in range(n)])
        out[f"layers.{layer}.feed_forward.gate_up"] = torch.cat([gate, up], dim=1)
        out[f"layers.{layer}.feed_forward.down"] = torch.stack([experts[(layer, "down_proj")][e] for e in range(n)])
    return out


# -------------------------------------------------------------------------------------- file I/O
def _refuse_pickles(directory: Path) -> None:
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    safes = list(directory.glob("*.safetensors"))
    if pickles and not safes:
        raise CheckpointError(f"{directory / pickles[0]}: pickle-based checkpoints are refused (they can run "
                              f"arbitrary code); convert it to safetensors first")


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory")
    _refuse_pickles(directory)
    index = directory / INDEX
    weight_map: dict[str, str] | None = None
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index ({exc!r})") from None
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no .safetensors file")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            state.update(load_file(str(directory / name)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{directory / name}: not a readable safetensors file ({exc})") from None
    if weight_map is not None:  # a shard that lost a tensor would otherwise surface as a vague missing key
        absent = sorted(k for k in weight_map if k not in state)
        if absent:
            raise CheckpointError(f"{directory / weight_map[absent[0]]}: {absent[0]} is in {INDEX} but not in "
                                  "the file")
    return state


def shard_name(number: int, count: int) -> str:
    """Hugging Face's shard file name, ``number`` counted from 1."""
    return f"model-{number:05d}-of-{count:05d}.safetensors"


class ShardWriter:
    """A sharded safetensors checkpoint written one shard at a time (so that only one shard's tensors need
    to exist at once), then its ``model.safetensors.index.json``. The number of shards is fixed up front
    because it is part of every file name."""

    def __init__(self, directory: Path, count: int, metadata: dict[str, str]):
        self.directory, self.count, self.metadata = Path(directory), count, metadata
        self.written = 0
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> Path:
        from safetensors.torch import save_file

        if self.written == self.count:
            raise ValueError(f"{self.directory}: more than the {self.count} shards planned")
        self.written += 1
        name = shard_name(self.written, self.count)
        save_file(tensors, str(self.directory / name), metadata=self.metadata)
        for key, tensor in tensors.items():
            self.weight_map[key] = name
            self.total_size += tensor.numel() * tensor.element_size()
        return self.directory / name

    def finish(self) -> None:
        if self.written != self.count:
            raise ValueError(f"{self.directory}: {self.written} of {self.count} shards written")
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def hf_config(cfg: JambaConfig, dtype: torch.dtype | None) -> dict:
    """transformers' config.json for ``cfg``; ``torch_dtype`` names the dtype the weights are stored in."""
    config = cfg.to_hf()
    if dtype is not None:
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
    return config


def _read_config_json(directory: Path) -> dict:
    path = Path(directory) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None


def load_state_into(model: Jamba, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load: every parameter present with its exact shape, nothing extra."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise CheckpointError(f"{source}: missing key {key}")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{source}: {key}: shape {tuple(state[key].shape)} != expected {tuple(tensor.shape)}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(f"{source}: unexpected key {extra[0]}")
    model.load_state_dict(state, strict=True)


def load_hf(directory: str | Path, dtype: torch.dtype = torch.float32) -> Jamba:
    directory = Path(directory)
    cfg = JambaConfig.from_hf(_read_config_json(directory))
    hf_state = read_safetensors(directory)
    state = from_hf_state_dict(hf_state, cfg)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Jamba(cfg)
    model = model.to_empty(device="cpu")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    load_state_into(model, {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
                    str(directory))
    return model.to(dtype)


def save_hf(model: Jamba, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype) if dtype else v.detach() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    hf_state = to_hf_state_dict(state, model.cfg)
    save_file(hf_state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config(model.cfg, dtype), indent=2) + "\n")
    return directory


def load_native(directory: str | Path, dtype: torch.dtype = torch.float32) -> Jamba:
    directory = Path(directory)
    cfg = JambaConfig.from_dict(_read_config_json(directory), str(directory / "config.json"))
    state = read_safetensors(directory)
    model = Jamba(cfg)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state["embed_tokens.weight"]
    load_state_into(model, state, str(directory))
    return model.to(dtype)


def save_native(model: Jamba, directory: str | Path) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(directory / NATIVE_WEIGHTS), metadata={"format": "jamba-pretrain"})
    (directory / "config.json").write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    return directory


def load_any(directory: str | Path, dtype: torch.dtype = torch.float32) -> Jamba:
    """A native or Hugging Face checkpoint directory, told apart by its config.json."""
    config = _read_config_json(Path(directory))
    if config.get("model_type") == "jamba":
        return load_hf(directory, dtype)
    return load_native(directory, dtype)
