"""A DeepSpeed checkpoint of this trainer -> Hugging Face and native checkpoints, streamed (one process, no GPU).

DeepSpeed writes, per tag, ``mp_rank_00_model_states.pt`` (non-expert weights in ``module``, plus our
client state: step, sampler position, model config) and one ``layer_{m}_expert_{g}_mp_rank_00_model_states.pt``
per MoE layer ``m`` (counted among the MoE layers) and *global* expert ``g`` (= EP rank x local count + local
id), whose keys name the model layer (``layers.{i}.feed_forward.deepspeed_moe.experts.deepspeed_experts.{g}.
gate_up``). The optimizer files (``*zero_pp_rank_*_optim_states.pt``) are not read.

The export never holds the model: the non-expert weights are memory-mapped from the main file, and the
output is written as safetensors shards, one per MoE layer (with the non-expert tensors of the layers up to
it), each built from that layer's expert files only: the experts are copied one file at a time into the
layer's stacked tensors ``[E, 2F, d]`` (the native layout; Hugging Face's per-expert tensors are views of
them), the shard is written to both outputs and freed before the next layer is read. Peak memory is about
the non-expert weights plus one MoE layer's experts (``tests/test_train.py`` measures it).

The weights are the model-dtype copies the engine trained with (bf16 in bf16 runs: what inference uses).
Outputs are written to a temporary directory next to the destination and renamed into place at the end,
so a failed or interrupted export never leaves a half-written checkpoint under the destination's name.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import JambaConfig

MAIN_FILE = "mp_rank_00_model_states.pt"
EXPERT_KEY = re.compile(r"^(layers\.(\d+)\.feed_forward)\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(\w+)$")
EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")
LAYER_KEY = re.compile(r"^layers\.(\d+)\.")
# Non-expert tensors of consecutive dense layers go into one shard until it holds this many bytes; every
# MoE layer ends a shard (its experts are the bulk of it).
SHARD_BUDGET = 5 * 10**9


class ExportError(ValueError):
    pass


def resolve_tag(checkpoint: Path, tag: str | None) -> Path:
    if tag is None:
        latest = checkpoint / "latest"
        if not latest.exists():
            raise ExportError(f"{checkpoint}: no 'latest' file; is this a training checkpoint directory? "
                              "(pass --tag to pick one)")
        tag = latest.read_text().strip()
    directory = checkpoint / tag
    if not (directory / MAIN_FILE).exists():
        raise ExportError(f"{directory}: {MAIN_FILE} is missing")
    return directory


def _load(path: Path, weights_only: bool) -> dict:
    """``torch.load`` memory-mapped: tensors stay in the page cache, not copied into this process (torch.save's
    zip format, which DeepSpeed writes, can be mapped; anything older is read the ordinary way)."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=weights_only)


@dataclass
class DeepSpeedCheckpoint:
    directory: Path
    cfg: JambaConfig
    client: dict
    dense: dict[str, torch.Tensor]           # non-expert weights, memory-mapped, in model order
    expert_files: dict[int, dict[int, Path]]  # model layer -> global expert id -> its file
    expert_shapes: dict[str, tuple[int, ...]]  # "gate_up"/"down" -> shape of one expert's tensor
    dtype: torch.dtype

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self.expert_files)

    def expert_layer_bytes(self) -> int:
        """Bytes of one MoE layer's experts in the checkpoint's dtype."""
        per_expert = sum(_numel(shape) for shape in self.expert_shapes.values())
        return self.cfg.n_experts * per_expert * torch.empty((), dtype=self.dtype).element_size()

    def dense_bytes(self) -> int:
        """Bytes of the non-expert tensors the export writes (a tied LM head is the embedding)."""
        return sum(t.numel() * t.element_size() for k, t in self.dense.items()
                   if not (self.cfg.tie_embeddings and k == "lm_head.weight"))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def open_checkpoint(directory: Path, model_cfg: JambaConfig | None = None) -> DeepSpeedCheckpoint:
    """The tag's main file memory-mapped and its expert files listed, checked against the model (every
    non-expert key with its shape, every expert of every MoE layer) before anything is written."""
    from model import Jamba

    try:   # DeepSpeed 0.19 stores only tensors and plain containers there: nothing needs unpickling
        main = _load(directory / MAIN_FILE, weights_only=True)
    except pickle.UnpicklingError:   # a DeepSpeed that stores its own objects; this trainer's own file
        main = _load(directory / MAIN_FILE, weights_only=False)
    if model_cfg is None:
        if "model_config" not in main:
            raise ExportError(f"{directory}: the checkpoint does not record its model config; pass --model")
        model_cfg = JambaConfig.from_dict(main["model_config"], f"{directory} model_config")
    cfg = model_cfg
    with torch.device("meta"):   # shapes and key order only: no memory
        expected = Jamba(cfg).state_dict()
    moe_layers = [i for i in range(cfg.n_layers) if cfg.is_moe(i)]
    expert_keys = {f"layers.{i}.feed_forward.{name}" for i in moe_layers for name in ("gate_up", "down")}
    module = {k: v for k, v in main["module"].items() if ".deepspeed_moe." not in k}
    dense: dict[str, torch.Tensor] = {}
    for key, meta in expected.items():
        if key in expert_keys:
            continue
        if key not in module:
            raise ExportError(f"{directory / MAIN_FILE}: missing key {key} (is the model config right?)")
        if tuple(module[key].shape) != tuple(meta.shape):
            raise ExportError(f"{directory / MAIN_FILE}: {key}: shape {tuple(module[key].shape)} != "
                              f"{tuple(meta.shape)} expected from the model config")
        dense[key] = module[key]
    extra = sorted(set(module) - set(dense))
    if extra:
        raise ExportError(f"{directory / MAIN_FILE}: unexpected key {extra[0]} (is the model config right?)")
    dtype = dense["embed_tokens.weight"].dtype

    files: dict[int, dict[int, Path]] = {i: {} for i in moe_layers}
    for path in sorted(directory.iterdir()):
        match = EXPERT_FILE.match(path.name)
        if not match:
            continue
        m, g = int(match.group(1)), int(match.group(2))
        if m >= len(moe_layers):
            raise ExportError(f"{path}: MoE layer {m}, but the model has {len(moe_layers)} MoE layers")
        files[moe_layers[m]][g] = path
    for m, i in enumerate(moe_layers):
        have = set(files[i])
        missing = sorted(set(range(cfg.n_experts)) - have)
        if missing:
            raise ExportError(f"{directory}: layers.{i}.feed_forward (MoE layer {m}): experts {missing} are missing")
        beyond = sorted(have - set(range(cfg.n_experts)))
        if beyond:
            raise ExportError(f"{directory}: layers.{i}.feed_forward (MoE layer {m}): experts {beyond} beyond "
                              f"n_experts {cfg.n_experts}")
    shapes = {}
    if moe_layers:
        for name in ("gate_up", "down"):
            shapes[name] = tuple(expected[f"layers.{moe_layers[0]}.feed_forward.{name}"].shape[1:])
    client = {k: main[k] for k in ("step", "sampler") if k in main}
    return DeepSpeedCheckpoint(directory, cfg, client, dense, files, shapes, dtype)


def load_layer_experts(ckpt: DeepSpeedCheckpoint, layer: int) -> dict[str, torch.Tensor]:
    """One MoE layer's experts stacked by global id (``layers.{i}.feed_forward.gate_up [E, 2F, d]``, ``down``),
    reading one expert file at a time into tensors allocated once."""
    E = ckpt.cfg.n_experts
    stacked = {name: torch.empty((E, *shape), dtype=ckpt.dtype) for name, shape in ckpt.expert_shapes.items()}
    for g in range(E):
        _copy_expert(ckpt.expert_files[layer][g], layer, g, stacked)
    return {f"layers.{layer}.feed_forward.{name}": t for name, t in stacked.items()}


def _copy_expert(path: Path, layer: int, g: int, stacked: dict[str, torch.Tensor]) -> None:
    """Expert ``g``'s file into row ``g`` of ``stacked``; the file's mapping goes when this returns."""
    seen = set()
    for key, tensor in _load(path, weights_only=True).items():
        match = EXPERT_KEY.match(key)
        if match is None or int(match.group(2)) != layer or int(match.group(3)) != g:
            raise ExportError(f"{path}: unexpected key {key} (expected layer {layer}, expert {g})")
        name = match.group(4)
        if name not in stacked:
            raise ExportError(f"{path}: unexpected tensor {key}")
        if tuple(tensor.shape) != tuple(stacked[name].shape[1:]):
            raise ExportError(f"{path}: {key}: shape {tuple(tensor.shape)} != {tuple(stacked[name].shape[1:])} "
                              "expected from the model config")
        stacked[name][g].copy_(tensor)
        seen.add(name)
    missing = sorted(set(stacked) - seen)
    if missing:
        raise ExportError(f"{path}: no {missing[0]} tensor")


@dataclass
class Shard:
    keys: list[str]          # non-expert keys, model order
    moe_layer: int | None    # the MoE layer whose experts close this shard


def plan_shards(ckpt: DeepSpeedCheckpoint, budget: int = SHARD_BUDGET) -> list[Shard]:
    """Consecutive layers' non-expert tensors, cut after every MoE layer (its experts join that shard) and
    whenever they reach ``budget`` bytes."""
    def layer_of(key: str) -> int | None:
        match = LAYER_KEY.match(key)
        return int(match.group(1)) if match else None

    shards, keys, size = [], [], 0
    for layer, group in itertools.groupby(ckpt.dense, key=layer_of):
        group = list(group)
        keys += group
        size += sum(ckpt.dense[k].numel() * ckpt.dense[k].element_size() for k in group)
        if layer is not None and layer in ckpt.expert_files:
            shards.append(Shard(keys, layer))
            keys, size = [], 0
        elif size >= budget:
            shards.append(Shard(keys, None))
            keys, size = [], 0
    if keys:
        shards.append(Shard(keys, None))
    return shards


def _status_bytes(field: str) -> int | None:
    """A ``/proc/self/status`` memory field (``VmHWM``: the resident-set high-water mark) in bytes."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _Staging:
    """Destination directories written under temporary names next to them and renamed into place by
    ``commit``; an output inside another one (``--native final --to-hf final/hf``) is staged inside it."""

    def __init__(self, outputs: dict[str, Path], overwrite: bool):
        resolved = {kind: path.resolve() for kind, path in outputs.items()}
        if len(set(resolved.values())) < len(resolved):
            raise ExportError("--to-hf and --native must be different directories")
        self.roots: dict[Path, Path] = {}   # destination -> its staging directory
        self.paths: dict[str, Path] = {}
        tops = [p for p in resolved.values() if not any(p != q and p.is_relative_to(q) for q in resolved.values())]
        for top in tops:
            if top.exists() and (not top.is_dir() or any(top.iterdir())):
                if not overwrite:
                    raise ExportError(f"{top}: exists; pass --overwrite to replace it")
                if not (top / "config.json").is_file():
                    raise ExportError(f"{top}: exists and is not a checkpoint (no config.json); not replacing it")
            top.parent.mkdir(parents=True, exist_ok=True)
            self.roots[top] = top.parent / f".{top.name}.partial-{os.getpid()}"
        for kind, path in resolved.items():
            top = next(t for t in tops if path.is_relative_to(t))
            self.paths[kind] = self.roots[top] / path.relative_to(top)
        for staging in self.roots.values():
            shutil.rmtree(staging, ignore_errors=True)
        for path in self.paths.values():
            path.mkdir(parents=True)

    def commit(self) -> None:
        for top, staging in self.roots.items():
            old = None
            if top.exists():
                old = top.parent / f".{top.name}.old-{os.getpid()}"
                top.rename(old)
            staging.rename(top)
            if old is not None:
                shutil.rmtree(old) if old.is_dir() else old.unlink()

    def discard(self) -> None:
        for staging in self.roots.values():
            shutil.rmtree(staging, ignore_errors=True)


def export_checkpoint(checkpoint: str | Path, to_hf: str | Path | None = None, native: str | Path | None = None,
                      tag: str | None = None, model_cfg: JambaConfig | None = None,
                      overwrite: bool = False, shard_budget: int = SHARD_BUDGET) -> dict:
    from model.hf import ShardWriter, hf_config, to_hf_state_dict

    if not to_hf and not native:
        raise ExportError("nothing to write: give to_hf and/or native")
    # The baseline is this process before any checkpoint byte is read, with what every export loads anyway:
    # initialising a tensor on the meta device (the model's shapes, in open_checkpoint) imports
    # torch._dynamo through torch._refs, ~67 MiB of code and data whatever the model's size.
    torch.empty(1, device="meta").normal_()
    baseline_rss = _status_bytes("VmRSS")
    directory = resolve_tag(Path(checkpoint), tag)
    ckpt = open_checkpoint(directory, model_cfg)
    cfg, dtype = ckpt.cfg, ckpt.dtype
    shards = plan_shards(ckpt, shard_budget)
    outputs = {kind: Path(path) for kind, path in (("native", native), ("hf", to_hf)) if path}
    staging = _Staging(outputs, overwrite)
    try:
        writers = {}
        if "native" in outputs:
            writers["native"] = ShardWriter(staging.paths["native"], len(shards), {"format": "jamba-pretrain"})
        if "hf" in outputs:
            writers["hf"] = ShardWriter(staging.paths["hf"], len(shards), {"format": "pt"})
        parameters = 0
        for shard in shards:
            tensors = {k: ckpt.dense[k] if ckpt.dense[k].dtype == dtype or not ckpt.dense[k].is_floating_point()
                       else ckpt.dense[k].to(dtype) for k in shard.keys
                       if not (cfg.tie_embeddings and k == "lm_head.weight")}   # tied: stored once, as HF does
            if shard.moe_layer is not None:
                tensors.update(load_layer_experts(ckpt, shard.moe_layer))
            parameters += sum(t.numel() for t in tensors.values())
            if "native" in writers:
                writers["native"].write(tensors)
            if "hf" in writers:
                writers["hf"].write(to_hf_state_dict(tensors, cfg))
            del tensors   # this layer's experts are freed before the next layer is read
        for writer in writers.values():
            writer.finish()
        if "native" in outputs:
            (staging.paths["native"] / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if "hf" in outputs:
            (staging.paths["hf"] / "config.json").write_text(json.dumps(hf_config(cfg, dtype), indent=2) + "\n")
        staging.commit()
    except BaseException:
        staging.discard()
        raise
    return {"checkpoint": str(directory), "step": ckpt.client.get("step"),
            "dtype": str(dtype).removeprefix("torch."), "parameters": parameters,
            "hf": str(to_hf) if to_hf else None, "native": str(native) if native else None,
            "shards": len(shards), "non_expert_bytes": ckpt.dense_bytes(),
            "expert_bytes_per_layer": ckpt.expert_layer_bytes() if ckpt.moe_layers else 0,
            "rss_baseline_bytes": baseline_rss, "peak_rss_bytes": _status_bytes("VmHWM")}
