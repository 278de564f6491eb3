"""A DeepSpeed checkpoint of this trainer -> native and Hugging Face checkpoints, offline (one process).

DeepSpeed writes, per tag, ``mp_rank_00_model_states.pt`` (non-expert weights in ``module``, plus our
client state: step, sampler position, model config) and one ``layer_{m}_expert_{g}_mp_rank_00_model_states.pt``
per MoE layer ``m`` and *global* expert ``g`` (= EP rank x local count + local id), whose keys name the model
layer (``layers.{i}.feed_forward.deepspeed_moe.experts.deepspeed_experts.{g}.gate_up``). Export stacks the
experts of each layer by global id into the single-process layout (``layers.{i}.feed_forward.gate_up``
``[E, 2F, d]``) and writes it with ``model.hf``.

The weights are the model-dtype copies the engine trained with (bf16 in bf16 runs: what inference uses).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from model.config import JambaConfig

EXPERT_KEY = re.compile(r"^(layers\.\d+\.feed_forward)\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(\w+)$")
EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")


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
    if not (directory / "mp_rank_00_model_states.pt").exists():
        raise ExportError(f"{directory}: mp_rank_00_model_states.pt is missing")
    return directory


def load_checkpoint_state(directory: Path, model_cfg: JambaConfig | None = None
                          ) -> tuple[dict[str, torch.Tensor], JambaConfig, dict]:
    """The full single-process state dict of a tagged DeepSpeed checkpoint, its model config, client state."""
    main = torch.load(directory / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    if model_cfg is None:
        if "model_config" not in main:
            raise ExportError(f"{directory}: the checkpoint does not record its model config; pass --model")
        model_cfg = JambaConfig.from_dict(main["model_config"], f"{directory} model_config")
    state = {k: v for k, v in main["module"].items() if ".deepspeed_moe." not in k}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for path in sorted(directory.iterdir()):
        if not EXPERT_FILE.match(path.name):
            continue
        for key, tensor in torch.load(path, map_location="cpu", weights_only=True).items():
            m = EXPERT_KEY.match(key)
            if m is None:
                raise ExportError(f"{path}: unexpected key {key}")
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = tensor
    for (prefix, name), by_id in experts.items():
        if sorted(by_id) != list(range(model_cfg.n_experts)):
            missing = sorted(set(range(model_cfg.n_experts)) - set(by_id))
            raise ExportError(f"{directory}: {prefix}.{name}: experts {missing} are missing")
        state[f"{prefix}.{name}"] = torch.stack([by_id[g] for g in range(model_cfg.n_experts)])
    client = {k: main[k] for k in ("step", "sampler") if k in main}
    return state, model_cfg, client


def export_checkpoint(checkpoint: str | Path, to_hf: str | Path | None = None, native: str | Path | None = None,
                      tag: str | None = None, model_cfg: JambaConfig | None = None) -> dict:
    from model import Jamba
    from model.hf import load_state_into, save_hf, save_native

    directory = resolve_tag(Path(checkpoint), tag)
    state, model_cfg, client = load_checkpoint_state(directory, model_cfg)
    model = Jamba(model_cfg)
    load_state_into(model, state, str(directory))
    dtype = next(iter(state.values())).dtype
    model.to(dtype)
    if native:
        save_native(model, Path(native))
    if to_hf:
        save_hf(model, Path(to_hf), dtype)
    return {"checkpoint": str(directory), "step": client.get("step"), "dtype": str(dtype).removeprefix("torch."),
            "parameters": sum(p.numel() for p in model.parameters()), "hf": str(to_hf) if to_hf else None,
            "native": str(native) if native else None}
