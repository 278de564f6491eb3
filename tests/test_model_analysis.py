"""The paper's section 3 from the memory model: Table 1 exactly, the Figure 2 fit table and plot, the
comparison models' configs (built and run at small scale), and the ``python -m model analyze`` CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from model import Jamba, JambaConfig
from model.__main__ import main
from model.analysis import FIGURE2_MODELS, PAPER_MODELS, fit_table, kv_table, load_models
from model.generate import generate
from model.memory import REGIMES, MemorySettings, max_context, parse_size
from tests.test_model import ROOT
from tests.test_model_memory import small_version

GIB = 2**30


def test_table1_kv_cache_at_256k_is_exact():
    rows = {r["model"]: r for r in kv_table(262144)}
    # the paper's "GB" are GiB: 2 (K, V) x attention layers x KV heads x 128 x 262144 tokens x 2 bytes
    assert rows["Llama-2-7B"]["kv_cache_bytes"] == 128 * GIB
    assert rows["Mistral-7B"]["kv_cache_bytes"] == 32 * GIB
    assert rows["Mixtral-8x7B"]["kv_cache_bytes"] == 32 * GIB
    assert rows["Jamba"]["kv_cache_bytes"] == 4 * GIB
    assert rows["Llama-2-70B"]["kv_cache_bytes"] == 80 * GIB and rows["Llama-2-70B"]["paper"] is None
    for name, row in rows.items():
        if row["paper"] is None:
            continue
        assert row["kv_cache_bytes"] == row["paper"]["kv_cache_gb"] * GIB
        # parameters agree with the paper at the paper's own precision (46.7B, 12.9B; 52B, 12B)
        for key, count in (("available", row["available_params"]), ("active", row["active_params"])):
            shown = row["paper"][key].rstrip("B")
            digits = len(shown.split(".")[1]) if "." in shown else 0
            assert round(count / 1e9, digits) == float(shown), (name, key)
    assert rows["Llama-2-7B"]["available_params"] == rows["Llama-2-7B"]["active_params"]


@pytest.mark.parametrize("name", list(PAPER_MODELS))
def test_comparison_configs_build_and_generate_at_small_scale(name):
    full = JambaConfig.from_yaml(ROOT / "configs/model" / PAPER_MODELS[name][0])
    cfg = small_version(full)
    assert [cfg.is_attention(i) for i in range(4)] == [full.is_attention(i) for i in range(4)]
    assert [cfg.is_moe(i) for i in range(4)] == [full.is_moe(i) for i in range(4)]
    assert cfg.n_heads // cfg.n_kv_heads == full.n_heads // full.n_kv_heads
    torch.manual_seed(0)
    model = Jamba(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, 9))
    out, cache = generate(model, prompt, max_new_tokens=4)
    with torch.no_grad():
        full_logits = model(out[:, :-1]).logits
    assert torch.equal(out[:, 9:], full_logits[:, 8:].argmax(-1))  # greedy decode with the cache = full forward
    assert cache.nbytes()["kv"] > 0


def test_all_attention_layout():
    cfg = JambaConfig.from_yaml(ROOT / "configs/model/mixtral-8x7b.yaml")
    assert cfg.attention_layers == list(range(32)) and all(cfg.is_moe(i) for i in range(32))
    dense = JambaConfig.from_yaml(ROOT / "configs/model/llama-2-7b.yaml")
    assert not any(dense.is_moe(i) for i in range(32)) and dense.n_kv_heads == dense.n_heads


def test_fit_table_matches_the_search_and_ratios():
    base = MemorySettings(weights="int8")
    budget = parse_size("80GB")
    result = fit_table(budget, base, "hf2024")
    rows = {r["model"]: r for r in result["models"]}
    assert set(FIGURE2_MODELS) <= set(rows)
    models = load_models()
    for name, row in rows.items():
        logits = "last" if name == "Jamba" else "all"   # hf2024: only Jamba keeps the last position
        assert row["logits"] == logits
        for regime in REGIMES:
            assert row[regime] == max_context(models[name], budget, MemorySettings(weights="int8", logits=logits),
                                              regime)
    for regime in REGIMES:
        assert result["ratios"]["Jamba/Mixtral-8x7B"][regime] == pytest.approx(
            rows["Jamba"][regime] / rows["Mixtral-8x7B"][regime])
    # Jamba's 8x smaller KV cache makes its cache-only context the longest of the large models
    assert rows["Jamba"]["kv_state"] > rows["Mixtral-8x7B"]["kv_state"] > rows["Llama-2-70B"]["kv_state"]


def test_cli_kv_json_reproduces_table1(capsys):
    assert main(["analyze", "kv", "--context", "262144", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    gib = {r["model"]: r["kv_cache_gib"] for r in out["models"]}
    assert gib == {"Llama-2-7B": 128.0, "Mistral-7B": 32.0, "Mixtral-8x7B": 32.0, "Jamba": 4.0, "Llama-2-70B": 80.0}
    assert {r["model"]: (r["available"], r["active"]) for r in out["models"]}["Mixtral-8x7B"] == ("46.7B", "12.9B")


def test_cli_fit_writes_json_and_png(capsys, tmp_path):
    png = tmp_path / "fit.png"
    assert main(["analyze", "fit", "--gpu-memory", "80GB", "--weights", "int8", "--json", "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpu_memory_bytes"] == 80 * 10**9 and out["weights"] == "int8"
    assert set(out["ratios"]) == {"Jamba/Mixtral-8x7B", "Jamba/Llama-2-70B"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_memory_text_and_json(capsys):
    assert main(["analyze", "memory", "--config", str(ROOT / "configs/model/jamba-v0.1.yaml"), "--weights",
                 "int8", "--context", "1024", "262144"]) == 0
    text = capsys.readouterr().out
    assert "KV cache per token              16,384 B" in text and "262,144" in text
    assert main(["analyze", "memory", "--config", str(ROOT / "configs/model/jamba-tiny.yaml"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [c["context"] for c in out["contexts"]] == [4096, 65536, 262144]


def test_cli_errors_are_one_line_naming_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("d_model: 64\nn_heads: 5\n")
    assert main(["analyze", "memory", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "n_heads" in err and err.startswith("error: ")
    assert main(["analyze", "fit", "--gpu-memory", "lots"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lots" in err


def test_cli_through_python_m():
    proc = subprocess.run([sys.executable, "-m", "model", "analyze", "kv"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Jamba" in proc.stdout and "4.00 GiB" in proc.stdout and "128.00 GiB" in proc.stdout


def test_throughput_bench_models_have_matched_active_parameters():
    import importlib.util

    spec = importlib.util.spec_from_file_location("throughput", ROOT / "bench/throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for preset in ("quick", "cpu", "gpu"):
        configs = bench.build_configs(bench.PRESETS[preset])
        active = {name: bench._active_body(cfg) for name, cfg in configs.items()}
        for name in ("mixtral-like", "llama-like"):
            assert abs(active[name] / active["jamba"] - 1) < 0.02, (preset, name)
        assert len(configs["jamba"].attention_layers) * 8 == configs["jamba"].n_layers
        assert configs["mixtral-like"].attention_layers == list(range(configs["mixtral-like"].n_layers))
