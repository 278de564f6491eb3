"""``python -m model``: params, init, convert, generate, analyze (memory, kv, fit)."""

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

    a = sub.add_parser("analyze", help="inference memory: the memory model, the paper's Table 1 and Figure 2")
    asub = a.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    m = asub.add_parser("memory", help="every term of the memory model for one config")
    m.add_argument("--config", type=Path, required=True)
    m.add_argument("--context", type=int, nargs="+", default=[4096, 65536, 262144])
    k = asub.add_parser("kv", help="Table 1: parameters and KV cache at a context length")
    k.add_argument("--context", type=int, default=262144)
    k.add_argument("--config", type=Path, action="append", default=[],
                   help="add a config to the paper's models (repeatable)")
    f = asub.add_parser("fit", help="Figure 2: the longest context that fits in one GPU's memory")
    f.add_argument("--gpu-memory", default="80GB", help="80GB (10^9 bytes) or 80GiB (2^30)")
    f.add_argument("--plot", type=Path, help="write a bar chart (PNG) here")
    f.add_argument("--reserve", default="0", help="memory set aside for the runtime, e.g. 2GiB")
    for p in (m, k, f):
        p.add_argument("--json", action="store_true")
        p.add_argument("--kv-bits", type=int, choices=(8, 16, 32), default=16, help="KV cache precision")
    for p in (m, f):
        p.add_argument("--weights", choices=("bf16", "fp16", "fp32", "int8"), default="int8" if p is f else "bf16")
        p.add_argument("--batch", type=int, default=1)
        p.add_argument("--prefill-chunk", type=int, default=4096, help="tokens per forward, chunked prefill")
    m.add_argument("--logits", choices=("last", "all"), default="last",
                   help="prefill logits kept: the last position or all of them")
    f.add_argument("--logits", choices=("last", "all", "hf2024"), default="last",
                   help="prefill logits kept; hf2024: all for attention-only models, last for Jamba")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from model.config import ModelConfigError
    from model.hf import CheckpointError

    try:
        return {"params": _params, "init": _init, "convert": _convert, "generate": _generate,
                "analyze": _analyze}[args.command](args)
    except (ModelConfigError, CheckpointError, ValueError) as exc:
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


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _analyze(args) -> int:
    from model.memory import MemorySettings, parse_size

    base = MemorySettings(kv_bytes=args.kv_bits // 8)
    if args.analysis != "kv":
        base = MemorySettings(weights=args.weights, kv_bytes=args.kv_bits // 8, batch=args.batch,
                              prefill_chunk=args.prefill_chunk,
                              logits="last" if args.logits == "hf2024" else args.logits)
    return {"memory": _analyze_memory, "kv": _analyze_kv, "fit": _analyze_fit}[args.analysis](args, base, parse_size)


def _analyze_memory(args, base, parse_size) -> int:
    from model.analysis import memory_report
    from model.config import JambaConfig

    cfg = JambaConfig.from_yaml(args.config)
    report = memory_report(cfg, args.context, base)
    if args.json:
        print(json.dumps({"config": str(args.config), **report}, indent=2))
        return 0
    print(f"{args.config}: {base.weights} weights, {8 * base.kv_bytes}-bit KV cache, batch {base.batch}, "
          f"prefill chunk {base.prefill_chunk}, logits: {base.logits}")
    for part, value in report["weights_by_part"].items():
        print(f"  weights {part:<20} {_gib(value):>14}")
    print(f"  KV cache per token          {report['kv_bytes_per_token']:>10,} B")
    print(f"  Mamba state per sequence    {_gib(report['mamba_state_bytes_per_sequence']):>14}  (any length)")
    print(f"  {'context':>9} {'KV cache':>14} {'chunked act.':>14} {'unchunked act.':>15} "
          f"{'total (KV+state)':>17} {'total (chunked)':>16} {'total (unchunked)':>18}")
    for row in report["contexts"]:
        kv, ch, un = row["kv_state"], row["prefill_chunked"], row["prefill_unchunked"]
        print(f"  {row['context']:>9,} {_gib(kv['kv_cache']):>14} {_gib(ch['prefill_activations']):>14} "
              f"{_gib(un['prefill_activations']):>15} {_gib(kv['total']):>17} {_gib(ch['total']):>16} "
              f"{_gib(un['total']):>18}")
    return 0


def _analyze_kv(args, base, parse_size) -> int:
    from model.analysis import kv_table, load_models
    from model.config import JambaConfig

    models = load_models()
    for path in args.config:
        models[path.stem] = JambaConfig.from_yaml(path)
    rows = kv_table(args.context, base.kv_bytes, models)
    if args.json:
        print(json.dumps({"context": args.context, "kv_bits": 8 * base.kv_bytes, "models": rows}, indent=2))
        return 0
    print(f"KV cache of one sequence of {args.context:,} tokens, {8 * base.kv_bytes}-bit (the Jamba paper's Table 1)")
    print(f"  {'model':<14}{'available':>10}{'active':>9}{'attn layers':>12}{'KV heads':>9}{'KV cache':>13}   paper")
    for r in rows:
        p = r["paper"]
        paper = f"{p['available']} / {p['active']} / {p['kv_cache_gb']}GB" if p else "(not in Table 1)"
        print(f"  {r['model']:<14}{r['available']:>10}{r['active']:>9}{r['attention_layers']:>12}"
              f"{r['n_kv_heads']:>9}{_gib(r['kv_cache_bytes']):>13}   {paper}")
    return 0


def _analyze_fit(args, base, parse_size) -> int:
    from dataclasses import replace

    from model.analysis import fit_table, plot_fit
    from model.memory import REGIMES

    budget = parse_size(args.gpu_memory)
    base = replace(base, reserve=parse_size(args.reserve))
    result = fit_table(budget, base, args.logits)
    if args.plot:
        result["plot"] = str(plot_fit(result, args.plot))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"Longest context in {budget / 1e9:.1f} GB ({budget / 2**30:.1f} GiB), {base.weights} weights, "
          f"{8 * base.kv_bytes}-bit KV, batch {base.batch}, logits: {args.logits}")
    print(f"  {'model':<14}{'weights':>12}{'KV + state':>14}{'chunked (' + str(base.prefill_chunk) + ')':>17}"
          f"{'unchunked':>12}")
    for r in result["models"]:
        cells = "".join(f"{'unbounded' if r[k] is None else f'{r[k]:,}':>{w}}"
                        for k, w in zip(REGIMES, (14, 17, 12)))
        print(f"  {r['model']:<14}{_gib(r['weights_bytes']):>12}{cells}")
    for name, ratio in result["ratios"].items():
        print(f"  {name:<26}" + "".join(f"{'-' if ratio[k] is None else f'{ratio[k]:.2f}x':>{w}}"
                                        for k, w in zip(REGIMES, (14, 17, 12))))
    if args.plot:
        print(f"plot: {result['plot']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
