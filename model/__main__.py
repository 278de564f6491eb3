"""``python -m model``: params, init, convert, generate."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model", description="The Jamba model: inspect, convert, run.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("params", help="total and active parameter counts of a config (no memory used)")
    p.add_argument("config", type=Path, help="model YAML, e.g. configs/model/jamba-v0.1.yaml")
    p.add_argument("--json", action="store_true")

    i = sub.add_parser("init", help="write a randomly initialised native checkpoint")
    i.add_argument("config", type=Path)
    i.add_argument("--out", type=Path, required=True)
    i.add_argument("--seed", type=int, default=0)

    c = sub.add_parser("convert", help="convert between Hugging Face (ai21labs/Jamba-v0.1 layout) and native")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", type=Path, metavar="HF_DIR", help="Hugging Face checkpoint -> native")
    src.add_argument("--to-hf", type=Path, metavar="DIR", help="native checkpoint -> Hugging Face")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--dtype", choices=sorted(DTYPES), default="float32")

    g = sub.add_parser("generate", help="generate text from a checkpoint (native or Hugging Face)")
    g.add_argument("--checkpoint", type=Path, required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--tokenizer", type=Path, help="tokenizer.json (e.g. a pipeline run's tokenizer/); "
                   "without it the prompt is comma-separated token ids")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from model.config import ModelConfigError
    from model.hf import CheckpointError

    try:
        return {"params": _params, "init": _init, "convert": _convert, "generate": _generate}[args.command](args)
    except (ModelConfigError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _params(args) -> int:
    from model.config import JambaConfig
    from model.params import count_parameters

    cfg = JambaConfig.from_yaml(args.config)
    counts = count_parameters(cfg)
    if args.json:
        print(json.dumps({"config": str(args.config), **counts, "layers": cfg.layer_kinds,
                          "moe_layers": [i for i in range(cfg.n_layers) if cfg.is_moe(i)]}, indent=2))
        return 0
    print(f"{args.config}: {cfg.n_blocks} blocks x {cfg.layers_per_block} layers, "
          f"attention:Mamba = {len(cfg.attention_layers)}:{cfg.n_layers - len(cfg.attention_layers)}, "
          f"{sum(cfg.is_moe(i) for i in range(cfg.n_layers))} MoE layers ({cfg.n_experts} experts, top-{cfg.top_k})")
    print(f"  total parameters:  {counts['total']:>16,}  ({counts['total'] / 1e9:.2f}B)")
    print(f"  active per token:  {counts['active']:>16,}  ({counts['active'] / 1e9:.2f}B)")
    for key, value in counts.items():
        if key.startswith("part_"):
            print(f"    {key[5:]:<14} {value:>16,}")
    return 0


def _init(args) -> int:
    import torch

    from model.config import JambaConfig
    from model.hf import save_native
    from model.jamba import Jamba

    torch.manual_seed(args.seed)
    model = Jamba(JambaConfig.from_yaml(args.config))
    print(f"wrote {save_native(model, args.out)}")
    return 0


def _convert(args) -> int:
    from model.hf import load_hf, load_native, save_hf, save_native

    if args.from_hf:
        model = load_hf(args.from_hf, _dtype(args.dtype))
        save_native(model, args.out)
    else:
        model = load_native(args.to_hf)
        save_hf(model, args.out, _dtype(args.dtype))
    print(f"wrote {args.out}")
    return 0


def _generate(args) -> int:
    import torch

    from model.generate import generate
    from model.hf import load_any

    model = load_any(args.checkpoint, _dtype(args.dtype))
    tokenizer = None
    if args.tokenizer:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(args.tokenizer))
        ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids
    else:
        ids = [int(t) for t in args.prompt.split(",") if t.strip()]
    prompt = torch.tensor([ids], dtype=torch.long)
    out, cache = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_p,
                          eos_id=model.cfg.eos_token_id if tokenizer is None else None, seed=args.seed)
    new = out[0, len(ids):].tolist()
    print(tokenizer.decode(out[0].tolist()) if tokenizer else ",".join(map(str, out[0].tolist())))
    mem = cache.nbytes()
    print(f"[{len(ids)} prompt + {len(new)} new tokens; cache: KV {mem['kv']:,} B in "
          f"{len(model.cfg.attention_layers)} attention layers, Mamba state {mem['mamba_state']:,} B]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
