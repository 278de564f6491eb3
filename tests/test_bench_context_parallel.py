"""bench/context_parallel.py --quick (cp 2 and 4 of jamba-tiny, 256 tokens, gloo): the bytes each rank
receives per Mamba and attention layer equal the formulas exactly, the backward (checkpointed forward
recomputed + the gradients' exchanges) receives twice the forward's, and the loss is the same at cp 2 and 4."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.fast

sys.path.insert(0, str(ROOT / "bench"))


def test_quick_run_bytes_equal_the_formulas(tmp_path):
    out = tmp_path / "cp.json"
    proc = subprocess.run([sys.executable, "bench/context_parallel.py", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [e["cp"] for e in result["exchange"]] == [2, 4]
    L = 256
    d_inner, d_conv, d_state, heads, kv, hd = 128, 4, 8, 4, 2, 16   # configs/model/jamba-tiny.yaml
    for e in result["exchange"]:
        cp = e["cp"]
        halo = (cp - 1) * d_inner * (d_conv - 1) * 4
        states = (cp - 1) * 2 * d_inner * d_state * 4
        attention = (cp - 1) * (L // cp) * (2 * heads + 2 * max(kv, cp)) * hd * 4 // cp
        assert e["all_exact"]
        for rank in e["ranks"]:
            assert rank["mamba_halo_per_layer"] == halo and rank["mamba_states_per_layer"] == states
            assert rank["attention_per_layer"] == attention
            assert rank["backward_over_forward_mamba"] == 2.0
            assert rank["backward_over_forward_attention"] == 2.0
            assert rank["backward_collectives_agree"]
    losses = [t["loss"] for t in result["step_time"]]
    assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[0])


def test_released_size_formulas():
    import context_parallel as bench

    rows = {(r["seq_len"], r["cp"]): r for r in bench.released_table(ROOT / "configs/model/jamba-v0.1.yaml")}
    r = rows[(262144, 8)]
    # halo 7 x 8192 x 3 x 2 bytes, states 7 x 2 x 8192 x 16 x 4 bytes
    assert r["mamba_state_passing_bytes"] == {"halo": 344064, "states": 7340032, "total": 7684096}
    # x, dt, y: 7/8 x 32768 x 3 x 8192 x 2; B, C: 7 x 32768 x 2 x 16 x 2
    assert r["mamba_channel_split_bytes"]["all_to_all"] == 7 * 4096 * 3 * 8192 * 2
    assert r["mamba_channel_split_bytes"]["B_C_all_gather"] == 7 * 32768 * 64
    assert r["attention_ulysses_bytes"] == 7 * 4096 * (64 + 16) * 128 * 2
    assert rows[(1048576, 32)]["attention_ulysses_bytes"] == 31 * 1024 * (64 + 64) * 128 * 2   # kv heads to 32
