"""End-to-end generation throughput (prefill + N decoded tokens, N = 512 as in the paper) of a scaled-down
Jamba, a Mixtral-like and a Llama-like model of matched active parameters, measured side by side in one
run: across batch sizes (the paper's Figure 3a) and context lengths (Figure 3b).

The three models share d_model, depth, heads and vocabulary; Jamba has the released layout (1 attention
layer in 8, MoE on every other layer, 16 experts top-2), the Mixtral-like model attention everywhere with
8 experts top-2 in every layer, the Llama-like model attention everywhere with dense FFNs. The FFN widths of
the two attention-only models are solved so that their active parameters per token (embeddings excluded)
equal Jamba's. Settings are interleaved (all three models at one setting, then the next) so that machine
noise affects them alike.

    python bench/throughput.py                      # CPU default: a few minutes
    python bench/throughput.py --quick              # CPU smoke run: under a minute
    python bench/throughput.py --preset gpu --device cuda --dtype bf16   # realistic scale on one GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model import Jamba, JambaConfig  # noqa: E402
from model.params import count_parameters  # noqa: E402

PRESETS = {
    # CPU: small enough for two cores; at d_model 256 attention's per-token cost (4 d L) overtakes the
    # weights' (~2 x 1M active) near L = 2K, which is where the paper's 4096-wide models are near L = 32K.
    "cpu": {"d_model": 256, "n_heads": 8, "n_kv_heads": 2, "ffn_dim": 896, "vocab_size": 8192, "layers": 8,
            "contexts": [512, 1024, 2048, 4096, 8192], "batch_context": 512, "batches": [1, 2, 4, 8]},
    "quick": {"d_model": 128, "n_heads": 4, "n_kv_heads": 1, "ffn_dim": 448, "vocab_size": 4096, "layers": 8,
              "contexts": [256, 1024, 4096], "batch_context": 512, "batches": [1, 4, 16]},
    # GPU: half the released width, one block; the paper's settings (8K context for the batch sweep,
    # 1K-128K at batch 1)
    "gpu": {"d_model": 2048, "n_heads": 16, "n_kv_heads": 4, "ffn_dim": 7168, "vocab_size": 32000, "layers": 8,
            "contexts": [1024, 4096, 16384, 32768, 65536, 131072], "batch_context": 8192,
            "batches": [1, 2, 4, 8, 16]},
}


def _active_body(cfg: JambaConfig) -> int:
    counts = count_parameters(cfg)
    return counts["active"] - counts["part_embedding"] - counts["part_lm_head"]


def _match_ffn(cfg: JambaConfig, target: int) -> JambaConfig:
    """The smallest multiple-of-16 ffn_dim whose active parameters reach ``target`` (bisection)."""
    lo, hi = 1, 1
    while _active_body(replace(cfg, ffn_dim=16 * hi)) < target:
        hi *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _active_body(replace(cfg, ffn_dim=16 * mid)) >= target else (mid, hi)
    best = min((lo, hi), key=lambda m: abs(_active_body(replace(cfg, ffn_dim=16 * m)) - target))
    return replace(cfg, ffn_dim=16 * best)


def build_configs(preset: dict) -> dict[str, JambaConfig]:
    common = dict(d_model=preset["d_model"], n_heads=preset["n_heads"], n_kv_heads=preset["n_kv_heads"],
                  vocab_size=preset["vocab_size"], mamba_dt_rank=None)
    L = preset["layers"]
    jamba = JambaConfig(**common, n_blocks=L // 8, layers_per_block=8, attn_period=8, attn_offset=4,
                        expert_period=2, expert_offset=1, n_experts=16, top_k=2, ffn_dim=preset["ffn_dim"])
    attention_only = dict(common, n_blocks=L, layers_per_block=1, attn_period=1, attn_offset=0, expert_period=1,
                          expert_offset=0)
    target = _active_body(jamba)
    mixtral = _match_ffn(JambaConfig(**attention_only, n_experts=8, top_k=2, ffn_dim=16), target)
    llama = _match_ffn(JambaConfig(**attention_only, n_experts=1, top_k=1, ffn_dim=16), target)
    return {"jamba": jamba, "mixtral-like": mixtral, "llama-like": llama}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def run_once(model: Jamba, batch: int, context: int, new_tokens: int, device: torch.device) -> dict:
    """Prefill ``context`` tokens then decode ``new_tokens`` greedily (no early stop), timed separately."""
    prompt = torch.randint(3, model.cfg.vocab_size, (batch, context), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    cache = model.new_cache()
    logits = model(prompt, cache=cache, logits_to_keep=1).logits[:, -1]
    _sync(device)
    prefilled = time.perf_counter()
    for _ in range(new_tokens - 1):  # the prefill produced the first new token
        logits = model(logits.argmax(-1)[:, None], cache=cache).logits[:, -1]
    logits.argmax(-1)
    _sync(device)
    end = time.perf_counter()
    mem = cache.nbytes()
    out = {"prefill_s": prefilled - start, "decode_s": end - prefilled, "total_s": end - start,
           "tokens_per_s": batch * new_tokens / (end - start),
           "decode_tokens_per_s": batch * (new_tokens - 1) / max(end - prefilled, 1e-9),
           "kv_bytes": mem["kv"], "state_bytes": mem["mamba_state"]}
    if device.type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def measure(models: dict[str, Jamba], batch: int, context: int, new_tokens: int, device: torch.device) -> dict:
    row = {"batch": batch, "context": context}
    for name, model in models.items():
        try:
            row[name] = run_once(model, batch, context, new_tokens, device)
        except torch.OutOfMemoryError:  # as Mixtral at batch 16 in the paper: recorded, not fatal
            row[name] = {"oom": True}
            torch.cuda.empty_cache()
        tps = row[name].get("tokens_per_s")
        print(f"  batch {batch:>3} context {context:>7}  {name:<13} "
              + (f"{tps:9.1f} tok/s  (prefill {row[name]['prefill_s']:.2f} s, decode {row[name]['decode_s']:.2f} s)"
                 if tps else "out of memory"), file=sys.stderr, flush=True)
    for other in models:
        if other != "jamba" and "tokens_per_s" in row["jamba"] and "tokens_per_s" in row[other]:
            row[f"jamba/{other}"] = row["jamba"]["tokens_per_s"] / row[other]["tokens_per_s"]
            row[f"decode jamba/{other}"] = row["jamba"]["decode_tokens_per_s"] / row[other]["decode_tokens_per_s"]
    return row


def plot(rows: list[dict], key: str, names: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        pts = [(r[key], r[name]["tokens_per_s"]) for r in rows if "tokens_per_s" in r[name]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(key)
    ax.set_ylabel("end-to-end tokens/s (generated)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--quick", action="store_true", help="the 'quick' preset with 64 new tokens")
    parser.add_argument("--new-tokens", type=int, default=None, help="decoded tokens per run (paper: 512)")
    parser.add_argument("--contexts", type=int, nargs="+", help="override the preset's context sweep")
    parser.add_argument("--batches", type=int, nargs="+", help="override the preset's batch sweep")
    parser.add_argument("--batch-context", type=int, help="context of the batch sweep")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/throughput.json")
    args = parser.parse_args()

    preset = dict(PRESETS["quick" if args.quick else args.preset])
    new_tokens = args.new_tokens or (64 if args.quick else 512)
    contexts = args.contexts or preset["contexts"]
    batches = args.batches or preset["batches"]
    batch_context = args.batch_context or preset["batch_context"]
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    torch.set_num_threads(args.threads)

    configs = build_configs(preset)
    models = {}
    for i, (name, cfg) in enumerate(configs.items()):
        torch.manual_seed(i)
        models[name] = Jamba(cfg).to(device=device, dtype=dtype).eval()
        if device.type == "cuda":
            models[name].set_cuda_kernels(True)
    params = {name: {"active_non_embedding": _active_body(cfg), **{k: v for k, v in count_parameters(cfg).items()
                                                                  if k in ("total", "active")},
                     "ffn_dim": cfg.ffn_dim, "attention_layers": len(cfg.attention_layers), "n_layers": cfg.n_layers}
              for name, cfg in configs.items()}
    for name, p in params.items():
        print(f"{name:<13} ffn {p['ffn_dim']:>5}  active (no embeddings) {p['active_non_embedding']:>11,}  "
              f"total {p['total']:>12,}", file=sys.stderr)
    for model in models.values():  # warm-up: allocator, kernels, code paths
        run_once(model, 1, 64, 4, device)

    print(f"batch sweep at context {batch_context}, {new_tokens} new tokens", file=sys.stderr)
    by_batch = [measure(models, b, batch_context, new_tokens, device) for b in batches]
    print(f"context sweep at batch 1, {new_tokens} new tokens", file=sys.stderr)
    by_context = [measure(models, 1, L, new_tokens, device) for L in contexts]

    result = {
        "command": " ".join(["python", *sys.argv]), "preset": "quick" if args.quick else args.preset,
        "new_tokens": new_tokens, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"), "configs": {k: v.to_dict() for k, v in configs.items()}, "params": params,
        "by_batch": by_batch, "by_context": by_context,
    }
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    stem = args.out.with_suffix("")
    plot(by_batch, "batch", list(models), f"context {batch_context}, {new_tokens} new tokens, {device.type}",
         Path(f"{stem}_batch.png"))
    plot(by_context, "context", list(models), f"batch 1, {new_tokens} new tokens, {device.type}",
         Path(f"{stem}_context.png"))
    print(f"{'':>18}" + "".join(f"{n:>14}" for n in models)
          + "   jamba/mixtral  jamba/llama  (end to end; decode only)")
    for label, rows, key in (("batch", by_batch, "batch"), ("context", by_context, "context")):
        for r in rows:
            cells = "".join(f"{r[n]['tokens_per_s']:>14.1f}" if "tokens_per_s" in r[n] else f"{'OOM':>14}"
                            for n in models)
            ratios = "".join(f"{r[k]:>14.2f}" if k in r else f"{'-':>14}"
                             for k in ("jamba/mixtral-like", "jamba/llama-like",
                                       "decode jamba/mixtral-like", "decode jamba/llama-like"))
            print(f"{label} {r[key]:>10}{cells}{ratios}")
    print(f"results: {args.out}, plots: {stem}_batch.png, {stem}_context.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
