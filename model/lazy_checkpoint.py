"""One tensor at a time from a native or Hugging Face checkpoint, by this package's key, memory-mapped.

``model.hf`` loads whole checkpoints; a training rank that owns a fraction of the parameters (its local
experts and the non-expert weights) must read only those. ``CheckpointTensors`` reads the safetensors
header (8 bytes of length, a JSON table of dtype, shape and byte offsets) and then, for one parameter or one
expert of a stacked MoE parameter (``layers.{i}.feed_forward.gate_up`` with ``expert=e`` is ``gate_up[e]``,
contiguous bytes on disk), exactly those bytes with a positioned read into a fresh tensor.

Why not ``safe_open``'s memory map: every page a process touches through a map counts in its resident set
until the map closes, so reading a rank's shard through it showed the shard twice in the rank's peak
(the mapped file and the copy: 923 MiB for a 423 MiB shard, measured); a positioned read leaves the file
in the kernel's page cache, shared by the node's ranks and not charged to any of them.

Both layouts of ``model.hf`` are understood: native (stacked experts) and Hugging Face (``model.``
prefix, per-expert ``gate_proj``/``up_proj``/``down_proj``, or transformers 5's fused
``experts.gate_up_proj``/``experts.down_proj``), single-file or sharded with an index.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.config import JambaConfig
from model.hf import CheckpointError, _read_config_json, _refuse_pickles

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class _SafetensorsFile:
    """Header of one safetensors file, and positioned reads of its tensors (or of one index along dim 0)."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            try:
                header = json.loads(fh.read(size))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + size
        self.entries = header

    def read(self, key: str, index: int | None = None) -> torch.Tensor:
        entry = self.entries[key]
        dtype, shape = _DTYPES[entry["dtype"]], list(entry["shape"])
        begin, end = entry["data_offsets"]
        if index is not None:
            if not 0 <= index < shape[0]:
                raise CheckpointError(f"{self.path}: {key}: index {index} outside its {shape[0]} rows")
            row = (end - begin) // shape[0]
            begin, end, shape = begin + index * row, begin + (index + 1) * row, shape[1:]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(self.data_start + begin)
            view, done = memoryview(buffer.numpy()), 0
            while done < len(view):
                got = fh.readinto(view[done:])
                if not got:
                    raise CheckpointError(f"{self.path}: {key}: file ends early")
                done += got
        return buffer.view(dtype).view(shape)


class CheckpointTensors:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: not a checkpoint directory")
        _refuse_pickles(self.directory)
        raw = _read_config_json(self.directory)
        self.hf = raw.get("model_type") == "jamba"
        self.config = JambaConfig.from_hf(raw) if self.hf else JambaConfig.from_dict(
            raw, str(self.directory / "config.json"))
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.directory}: no .safetensors file")
        self._file_of: dict[str, _SafetensorsFile] = {}
        for name in files:
            handle = _SafetensorsFile(self.directory / name)
            for key in handle.entries:
                self._file_of[key] = handle

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def _read(self, key: str, index: int | None = None) -> torch.Tensor:
        handle = self._file_of.get(key)
        if handle is None:
            raise CheckpointError(f"{self.directory}: missing key {key}")
        return handle.read(key, index)

    def get(self, key: str, expert: int | None = None) -> torch.Tensor:
        """Our key (``model.hf``'s native names); ``expert`` selects one expert of a stacked parameter."""
        if not self.hf:
            if key == "lm_head.weight" and key not in self and self.config.tie_embeddings:
                key = "embed_tokens.weight"
            return self._read(key, expert)
        if key == "lm_head.weight":
            return self._read(key if key in self else "model.embed_tokens.weight")
        hf_key = f"model.{key}"
        if expert is None:
            return self._read(hf_key)
        base, leaf = hf_key.rsplit(".", 1)  # ...feed_forward.gate_up | ...feed_forward.down
        fused = f"{base}.experts.{leaf}_proj"
        if fused in self:
            return self._read(fused, expert)
        if leaf == "gate_up":
            return torch.cat([self._read(f"{base}.experts.{expert}.gate_proj.weight"),
                              self._read(f"{base}.experts.{expert}.up_proj.weight")])
        return self._read(f"{base}.experts.{expert}.down_proj.weight")
