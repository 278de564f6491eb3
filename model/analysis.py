"""The Jamba paper's section 3 from the memory model: Table 1 (KV cache at 256K tokens) and Figure 2 (the
longest context on one 80 GB GPU), for Jamba and the attention-only models it is compared with, all
expressed in ``JambaConfig``'s schema under ``configs/model/``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from model.config import JambaConfig
from model.memory import REGIMES, MemorySettings, kv_bytes_per_token, max_context, memory_at
from model.params import count_parameters

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "model"

# name -> (config file, the paper's Table 1 row: available params, active params, KV cache at 256K in "GB";
# None for Llama-2-70B, which appears in Figure 2 but not in Table 1)
PAPER_MODELS: dict[str, tuple[str, tuple[str, str, int] | None]] = {
    "Llama-2-7B": ("llama-2-7b.yaml", ("6.7B", "6.7B", 128)),
    "Mistral-7B": ("mistral-7b.yaml", ("7.2B", "7.2B", 32)),
    "Mixtral-8x7B": ("mixtral-8x7b.yaml", ("46.7B", "12.9B", 32)),
    "Jamba": ("jamba-v0.1.yaml", ("52B", "12B", 4)),
    "Llama-2-70B": ("llama-2-70b.yaml", None),
}
FIGURE2_MODELS = ("Llama-2-70B", "Mixtral-8x7B", "Jamba")  # the paper's Figure 2 bars
LOGITS_MODES = ("last", "all", "hf2024")


def load_models(names: list[str] | None = None) -> dict[str, JambaConfig]:
    return {name: JambaConfig.from_yaml(CONFIG_DIR / PAPER_MODELS[name][0]) for name in names or PAPER_MODELS}


def billions(n: int) -> str:
    return f"{n / 1e9:.1f}B"


def kv_table(context: int = 262144, kv_bytes: int = 2, models: dict[str, JambaConfig] | None = None
             ) -> list[dict[str, Any]]:
    """Table 1: parameters and the KV cache of one sequence of ``context`` tokens."""
    rows = []
    for name, cfg in (models or load_models()).items():
        counts = count_parameters(cfg)
        kv = context * kv_bytes_per_token(cfg, kv_bytes)
        paper = PAPER_MODELS.get(name, (None, None))[1]
        rows.append({
            "model": name, "available_params": counts["total"], "active_params": counts["active"],
            "available": billions(counts["total"]), "active": billions(counts["active"]),
            "attention_layers": len(cfg.attention_layers), "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
            "kv_cache_bytes": kv, "kv_cache_gib": kv / 2**30,
            "paper": None if paper is None else {"available": paper[0], "active": paper[1], "kv_cache_gb": paper[2]},
        })
    return rows


def settings_for(cfg: JambaConfig, base: MemorySettings, logits: str) -> MemorySettings:
    """``hf2024``: every position's logits (plus a float32 copy) for attention-only models, the last
    position for models with Mamba layers -- how Hugging Face's Llama/Mixtral and Jamba (whose config sets
    ``num_logits_to_keep=1``) ran prefill when the paper was written."""
    if logits == "hf2024":
        logits = "last" if len(cfg.attention_layers) < cfg.n_layers else "all"
    return replace(base, logits=logits)


def fit_table(budget: int, base: MemorySettings, logits: str = "last",
              models: dict[str, JambaConfig] | None = None) -> dict[str, Any]:
    """Figure 2: the longest context under each regime, and Jamba's ratios to Mixtral and Llama-2-70B."""
    models = models or load_models()
    rows = []
    for name, cfg in models.items():
        settings = settings_for(cfg, base, logits)
        row = {"model": name, "logits": settings.logits,
               "weights_bytes": memory_at(cfg, 0, settings, "kv_state")["weights"]}
        for regime in REGIMES:
            row[regime] = max_context(cfg, budget, settings, regime)
        rows.append(row)
    ratios: dict[str, dict[str, float | None]] = {}
    by_name = {r["model"]: r for r in rows}
    if "Jamba" in by_name:
        for other in ("Mixtral-8x7B", "Llama-2-70B"):
            if other not in by_name:
                continue
            ratios[f"Jamba/{other}"] = {
                regime: (by_name["Jamba"][regime] / by_name[other][regime]
                         if by_name["Jamba"][regime] and by_name[other][regime] else None)
                for regime in REGIMES}
    return {"gpu_memory_bytes": budget, "weights": base.weights, "kv_bytes": base.kv_bytes,
            "act_bytes": base.act_bytes, "batch": base.batch, "prefill_chunk": base.prefill_chunk,
            "logits": logits, "reserve_bytes": base.reserve, "models": rows, "ratios": ratios}


def plot_fit(result: dict[str, Any], path: Path) -> Path:
    """Grouped bars like the paper's Figure 2: one group per model, one bar per regime (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["models"]
    labels = {"kv_state": "weights + KV + state", "prefill_chunked": f"+ chunked prefill ({result['prefill_chunk']})",
              "prefill_unchunked": "+ unchunked prefill"}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(REGIMES)
    for j, regime in enumerate(REGIMES):
        xs = [i + (j - (len(REGIMES) - 1) / 2) * width for i in range(len(rows))]
        vals = [r[regime] or 0 for r in rows]
        bars = ax.bar(xs, [max(v, 1) for v in vals], width, label=labels[regime])
        for bar, v in zip(bars, vals):
            ax.annotate(f"{v / 1024:.0f}K" if v else "-", (bar.get_x() + bar.get_width() / 2, max(v, 1)),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)), [r["model"] for r in rows])
    ax.set_yscale("log")
    ax.set_ylim(1024, max((r["kv_state"] or 1) for r in rows) * 4)
    ax.set_ylabel("longest context (tokens)")
    ax.set_title(f"Context that fits in {result['gpu_memory_bytes'] / 1e9:.0f} GB, {result['weights']} weights, "
                 f"batch {result['batch']}, logits: {result['logits']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def memory_report(cfg: JambaConfig, contexts: list[int], settings: MemorySettings) -> dict[str, Any]:
    """Every term of the memory model at each context, under each regime."""
    from model.memory import activation_elements_per_token, mamba_state_bytes, weight_bytes

    return {
        "settings": vars(settings),
        "weights_by_part": weight_bytes(cfg, settings.weights),
        "kv_bytes_per_token": kv_bytes_per_token(cfg, settings.kv_bytes),
        "mamba_state_bytes_per_sequence": mamba_state_bytes(cfg, settings.act_bytes),
        "activation_elements_per_token": activation_elements_per_token(cfg),
        "contexts": [{"context": L, **{regime: memory_at(cfg, L, settings, regime) for regime in REGIMES}}
                     for L in contexts],
    }

