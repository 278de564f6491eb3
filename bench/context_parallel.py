"""Context parallelism on CPU (gloo, one process per rank): the longest context that fits a per-rank memory
budget at cp 1, 2 and 4, step time against cp, and the bytes each rank receives per layer against the formulas.

    .venv/bin/python bench/context_parallel.py [--budget-mb 144] [--model configs/model/jamba-tiny.yaml]

Every rank builds the same Jamba with the same seed (fp32, activation checkpointing on, the LM loss in
``--loss-chunk`` token chunks), applies ``train.context_parallel.apply_context_parallel`` and feeds columns
``[c L/cp, (c+1) L/cp)`` of one batch of packed documents (segment ids; documents of ``--doc-min`` to
``--doc-max`` tokens, so they cross rank boundaries). A step is forward + backward of ``replica_losses``'
total (LM + aux coef x load balancing, + z when the config has a z coefficient), gradients dropped after it
as ``zero_grad(set_to_none=True)`` would.

1. Memory. A fresh set of processes per trial (``torch.multiprocessing.spawn``, ``torch.set_num_threads(1)``
   per rank, ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors go back to the OS and RSS follows the
   live ones). Each rank builds the model, runs one warm-up step of ``--warmup-len`` tokens (the first step
   of a process pages in code and one-time buffers, tens of MB that do not grow with the context), resets
   its resident high-water mark (``/proc/self/clear_refs``), takes VmRSS as the baseline and runs the
   measured step; its peak is VmHWM minus that baseline. Lengths go up geometrically (x1.5 and x4/3
   alternately) from ``cp x --min-len`` until one exceeds ``--budget-mb`` on some rank.
2. Step time at ``--time-len`` for every cp: the median of ``--steps`` steps after the warm-up, each the
   slowest rank's wall time from a barrier to the end of its backward (glibc's default malloc here). On
   this 2-core machine cp 4 runs 4 processes on 2 cores: its time measures CPU contention, not scaling.
3. Bytes. ``train.context_parallel.EXCHANGED`` after one forward, per Mamba and attention layer, against
   the formulas; the collectives of ``torch.distributed`` are wrapped for the same steps, so the bytes of the
   backward (the checkpointed forward recomputed + the gradients' exchanges) are measured too. The same
   formulas at the released size (configs/model/jamba-v0.1.yaml, bf16) for 256K / cp 8 and 1M / cp 32,
   against an all-to-all channel split of the Mamba layer.

Prints JSON and writes bench/results/context_parallel.json (Linux only: reads /proc). ``--quick``: tiny
lengths, cp 2 and 4, for the smoke test (tests/test_bench_context_parallel.py).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from common import write_result

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MMAP_ENV, MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_", "65536"
NOTE_CONTENTION = ("cp ranks are processes with one thread each; with more ranks than cores (cp 4 on this "
                   "2-core machine) the step time measures CPU contention, not context-parallel scaling")


# ---------------------------------------------------------------------------------------- formulas
def mamba_state_passing_bytes(cp: int, b: int, d_inner: int, d_conv: int, d_state: int, act_bytes: int) -> dict:
    """Bytes one rank receives per Mamba layer and forward: the conv halo (activations) and the final states
    and total decays (float32) of the other ranks (``ContextParallelMamba``)."""
    halo = (cp - 1) * b * d_inner * (d_conv - 1) * act_bytes
    states = (cp - 1) * 2 * b * d_inner * d_state * 4
    return {"halo": halo, "states": states, "total": halo + states}


def attention_ulysses_bytes(cp: int, b: int, L: int, heads: int, kv_heads: int, head_dim: int,
                            act_bytes: int) -> int:
    """Bytes one rank receives per attention layer and forward: q, k, v sequence -> heads and the output
    back, (cp-1)/cp of each (kv heads replicated to cp when cp > n_kv)."""
    kv_eff = max(kv_heads, cp)
    return (cp - 1) * (L // cp) * b * (2 * heads + 2 * kv_eff) * head_dim * act_bytes // cp


def mamba_channel_split_bytes(cp: int, b: int, L: int, d_inner: int, d_state: int, act_bytes: int) -> dict:
    """The alternative: x and dt all-to-all to a channel layout and y back, B and C all-gathered."""
    a2a = (cp - 1) * (L // cp) * b * 3 * d_inner * act_bytes // cp
    bc = (cp - 1) * (L // cp) * b * 2 * d_state * act_bytes
    return {"all_to_all": a2a, "B_C_all_gather": bc, "total": a2a + bc}


def released_table(path: Path, cases=((262144, 8), (1048576, 32)), act_bytes: int = 2) -> list[dict]:
    from model import JambaConfig

    cfg = JambaConfig.from_yaml(path)
    kinds = cfg.layer_kinds
    n_mamba, n_attn = kinds.count("mamba"), kinds.count("attention")
    rows = []
    for L, cp in cases:
        sp = mamba_state_passing_bytes(cp, 1, cfg.d_inner, cfg.mamba_d_conv, cfg.mamba_d_state, act_bytes)
        ch = mamba_channel_split_bytes(cp, 1, L, cfg.d_inner, cfg.mamba_d_state, act_bytes)
        attn = attention_ulysses_bytes(cp, 1, L, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, act_bytes)
        rows.append({"seq_len": L, "cp": cp, "tokens_per_rank": L // cp, "d_inner": cfg.d_inner,
                     "d_state": cfg.mamba_d_state, "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads,
                     "head_dim": cfg.head_dim, "act_bytes": act_bytes,
                     "mamba_state_passing_bytes": sp, "mamba_channel_split_bytes": ch,
                     "channel_split_over_state_passing": ch["total"] / sp["total"],
                     "attention_ulysses_bytes": attn, "mamba_layers": n_mamba, "attention_layers": n_attn,
                     "model_forward_bytes_state_passing": n_mamba * sp["total"] + n_attn * attn,
                     "model_forward_bytes_channel_split": n_mamba * ch["total"] + n_attn * attn})
    return rows


# ---------------------------------------------------------------------------------------- measuring
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Collectives:
    """Payload bytes this rank receives from the other ranks, by phase and collective, counted by wrapping
    torch.distributed's functions (which train/context_parallel.py's autograd Functions call at run time)."""

    def __init__(self):
        self.counts: Counter[str] = Counter()
        self.phase = "forward"

    def install(self) -> None:
        import torch.distributed as dist

        orig = {name: getattr(dist, name) for name in ("all_gather", "all_gather_single", "all_to_all_single",
                                                        "all_reduce")}

        def key(op, tensor):
            return f"{self.phase} {op} {'float' if tensor.is_floating_point() else 'int'}"

        def all_gather(tensor_list, tensor, group=None, async_op=False):
            me = dist.get_rank(group)
            self.counts[key("all_gather", tensor)] += sum(
                t.numel() * t.element_size() for j, t in enumerate(tensor_list) if j != me)
            return orig["all_gather"](tensor_list, tensor, group=group, async_op=async_op)

        def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                              async_op=False):
            assert output_split_sizes is None, "only equal splits are counted"
            n = dist.get_world_size(group)
            self.counts[key("all_to_all_single", output)] += (n - 1) * output.numel() // n * output.element_size()
            return orig["all_to_all_single"](output, input, output_split_sizes, input_split_sizes, group=group,
                                             async_op=async_op)

        def all_gather_single(output, input, group=None, async_op=False):
            n = dist.get_world_size(group)
            self.counts[key("all_gather_single", input)] += (n - 1) * input.numel() * input.element_size()
            return orig["all_gather_single"](output, input, group=group, async_op=async_op)

        def all_reduce(tensor, *args, **kw):
            # counted as the tensor's size (what is reduced), not the algorithm's traffic
            self.counts[key("all_reduce", tensor)] += tensor.numel() * tensor.element_size()
            return orig["all_reduce"](tensor, *args, **kw)

        dist.all_gather, dist.all_gather_single, dist.all_to_all_single, dist.all_reduce = (
            all_gather, all_gather_single, all_to_all_single, all_reduce)


def model_config(spec: dict):
    import yaml

    from model import JambaConfig

    data = yaml.safe_load(Path(spec["model"]).read_text())
    data = dict(data.get("model", data))
    data.update(spec["overrides"])
    return JambaConfig.from_dict(data, spec["model"])


def make_batch(L: int, spec: dict, vocab: int):
    """Packed documents of ``doc_min..doc_max`` tokens: ids, next-token targets (-100 at each document's
    last token), segment ids; the same on every rank (seeded)."""
    import torch

    g = torch.Generator().manual_seed(spec["seed"] + L)
    b = spec["batch"]
    ids = torch.randint(3, vocab, (b, L), generator=g)
    segment = torch.empty(b, L, dtype=torch.int64)
    for row in range(b):
        lengths, total = [], 0
        while total < L:
            lengths.append(int(torch.randint(spec["doc_min"], spec["doc_max"] + 1, (1,), generator=g)))
            total += lengths[-1]
        lengths[-1] -= total - L
        segment[row] = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    targets = torch.roll(ids, -1, dims=1)
    last = torch.ones_like(segment, dtype=torch.bool)
    last[:, :-1] = segment[:, 1:] != segment[:, :-1]
    targets[last] = -100
    return ids, targets, segment


def _rank(rank: int, cp: int, port: int, spec: dict, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=cp)
    from model import Jamba
    from train.context_parallel import EXCHANGED, apply_context_parallel, make_groups, replica_losses

    cfg = model_config(spec)
    torch.manual_seed(0)
    model = Jamba(cfg)
    model.activation_checkpointing = True
    model.train()
    ctx = make_groups(cp)
    apply_context_parallel(model, ctx)
    counter = Collectives()
    counter.install()

    def step(L: int) -> dict:
        ids, targets, segment = make_batch(L, spec, cfg.vocab_size)
        part = slice(ctx.rank * L // cp, (ctx.rank + 1) * L // cp)
        ids, targets, segment = ids[:, part].contiguous(), targets[:, part].contiguous(), segment[:, part].contiguous()
        dist.barrier()
        EXCHANGED.clear()
        counter.counts.clear()
        counter.phase = "forward"
        started = time.perf_counter()
        out = model(ids, segment=segment, output_router_logits=True, targets=targets,
                    loss_chunk=spec["loss_chunk"], loss_reduction="sum")
        lm, aux, z = replica_losses(out, targets, cfg.n_experts, cfg.top_k, ctx, z_loss=cfg.router_z_loss_coef > 0)
        loss = lm
        if aux is not None:
            loss = loss + cfg.router_aux_loss_coef * aux
        if z is not None:
            loss = loss + cfg.router_z_loss_coef * z
        forward = {"exchanged": dict(EXCHANGED), "collectives": dict(counter.counts)}
        EXCHANGED.clear()
        counter.counts.clear()
        counter.phase = "backward"
        loss.backward()
        seconds = time.perf_counter() - started
        backward = {"exchanged": dict(EXCHANGED), "collectives": dict(counter.counts)}
        for p in model.parameters():
            p.grad = None
        return {"seq_len": L, "seconds": seconds, "loss": float(loss.detach()), "lm": float(lm.detach()),
                "aux": None if aux is None else float(aux.detach()), "forward": forward, "backward": backward}

    if spec["warmup_len"]:
        step(-(-spec["warmup_len"] // cp) * cp)
    import gc

    gc.collect()
    hwm_reset = _reset_hwm()
    base = _status_kb("VmRSS")
    steps = [step(spec["seq_len"]) for _ in range(spec["steps"])]
    peak = _status_kb("VmHWM")
    result = {"rank": rank, "baseline_mb": base / 1024, "peak_above_baseline_mb": (peak - base) / 1024,
              "hwm_reset": hwm_reset, "steps": steps}
    Path(outdir, f"{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def trial(cp: int, seq_len: int, steps: int, spec: dict, mmap_threshold: bool = True) -> list[dict] | str:
    """One fresh set of ``cp`` rank processes: their results, or the error that stopped them.
    ``mmap_threshold``: large blocks from mmap, returned to the OS when freed (RSS follows the live tensors;
    costs page faults, so the timing runs go without it)."""
    import torch.multiprocessing as mp

    spec = {**spec, "seq_len": seq_len, "steps": steps}
    saved = os.environ.pop(MMAP_ENV, None)
    if mmap_threshold:
        os.environ[MMAP_ENV] = MMAP_THRESHOLD
    try:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                mp.spawn(_rank, args=(cp, _port(), spec, tmp), nprocs=cp, join=True)
            except Exception as exc:   # a rank killed for memory, or an error in one
                lines = str(exc).strip().splitlines()
                return f"{type(exc).__name__}: {lines[-1] if lines else ''}"
            return [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(cp)]
    finally:
        os.environ.pop(MMAP_ENV, None)
        if saved is not None:
            os.environ[MMAP_ENV] = saved


def crossings(seq_len: int, cp: int, spec: dict, vocab: int) -> int:
    """Rank boundaries (of batch row 0) that fall inside a document."""
    _, _, segment = make_batch(seq_len, spec, vocab)
    return sum(int(segment[0, c * seq_len // cp - 1] == segment[0, c * seq_len // cp]) for c in range(1, cp))


def series(start: int, stop: int) -> list[int]:
    """start, 1.5 start, 2 start, 3 start, 4 start, ... (x1.5 and x4/3 alternately), up to stop."""
    out, n = [], start
    while n <= stop:
        out.append(n)
        out.append(n * 3 // 2)
        n *= 2
    return [n for n in out if n <= stop]


def bytes_check(cp: int, seq_len: int, ranks: list[dict], cfg, b: int) -> dict:
    """Measured bytes of one step (every rank's) against the formulas, per layer."""
    kinds = cfg.layer_kinds
    n_mamba, n_attn = kinds.count("mamba"), kinds.count("attention")
    act = 4  # fp32
    mamba = mamba_state_passing_bytes(cp, b, cfg.d_inner, cfg.mamba_d_conv, cfg.mamba_d_state, act)
    attn = attention_ulysses_bytes(cp, b, seq_len, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, act)
    per_rank = []
    for r in ranks:
        s = r["steps"][0]
        fe, be = Counter(s["forward"]["exchanged"]), Counter(s["backward"]["exchanged"])
        fc, bc = Counter(s["forward"]["collectives"]), Counter(s["backward"]["collectives"])
        halo, states = fe["mamba conv halo"], fe["mamba states"]
        a2a = fe["attention all-to-all"]
        per_rank.append({
            "rank": r["rank"],
            "forward_exchanged": dict(fe),
            "mamba_halo_per_layer": halo / n_mamba, "mamba_states_per_layer": states / n_mamba,
            "attention_per_layer": a2a / n_attn if n_attn else 0,
            "mamba_exact": halo == n_mamba * mamba["halo"] and states == n_mamba * mamba["states"],
            "attention_exact": a2a == n_attn * attn,
            # the wrapped collectives see the same forward payload as EXCHANGED
            "collectives_agree": (fc["forward all_gather_single float"] == halo + states
                                  and fc["forward all_to_all_single float"] == a2a),
            "forward_collectives": dict(fc), "backward_collectives": dict(bc),
            "backward_recompute_exchanged": dict(be),
            # backward: the checkpointed forward recomputed (its exchanges again) + the gradients sent back
            # (an all-gather's gradient returns with an all-to-all; the all-to-all's with the inverse one)
            "backward_mamba_bytes": sum(be[k] for k in ("mamba conv halo", "mamba states", "mamba conv halo (backward)",
                                                        "mamba states (backward)")),
            "backward_attention_bytes": be["attention all-to-all"] + be["attention all-to-all (backward)"],
            "backward_over_forward_mamba": (sum(be[k] for k in ("mamba conv halo", "mamba states",
                                                                "mamba conv halo (backward)", "mamba states (backward)"))
                                            / (halo + states)) if halo + states else None,
            "backward_over_forward_attention": ((be["attention all-to-all"] + be["attention all-to-all (backward)"])
                                                / a2a) if a2a else None,
            # the wrapped collectives see the same backward payload as EXCHANGED
            "backward_collectives_agree": (bc["backward all_gather_single float"] + bc["backward all_to_all_single float"]
                                           == sum(be.values())),
        })
    return {"cp": cp, "seq_len": seq_len, "batch": b, "mamba_layers": n_mamba, "attention_layers": n_attn,
            "formula_mamba_per_layer": mamba, "formula_attention_per_layer": attn,
            "kv_heads_effective": max(cfg.n_kv_heads, cp), "ranks": per_rank,
            "all_exact": all(p["mamba_exact"] and p["attention_exact"] and p["collectives_agree"] for p in per_rank)}


def _mb(x: float) -> str:
    return f"{x / 2**20:,.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="See the module docstring (and docs/benchmarks.md) for the method.")
    parser.add_argument("--model", default=str(ROOT / "configs/model/jamba-tiny.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="model config override, e.g. --set d_model=128 (YAML value)")
    parser.add_argument("--cps", default="1,2,4", help="comma-separated context-parallel sizes")
    parser.add_argument("--budget-mb", type=float, default=144.0,
                        help="per-rank peak above the baseline, MB (default: cp 1 tops out between 6K and 8K tokens)")
    parser.add_argument("--min-len", type=int, default=1024, help="tokens per rank of the first length tried")
    parser.add_argument("--warmup-len", type=int, default=1280,
                        help="sequence length of the untimed, unmeasured first step of every trial (0: none)")
    parser.add_argument("--max-len", type=int, default=131072, help="longest sequence tried")
    parser.add_argument("--time-len", type=int, default=8192, help="sequence length of the step-time comparison")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per cp (median)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--doc-min", type=int, default=128)
    parser.add_argument("--doc-max", type=int, default=4096)
    parser.add_argument("--loss-chunk", type=int, default=1024, help="LM head + loss this many tokens at a time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-memory", action="store_true", help="only step time and bytes")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: cp 2 and 4, 256 tokens, no warm-up, no memory sweep")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/context_parallel.json")
    args = parser.parse_args()

    import torch
    import yaml

    if args.quick:
        args.cps, args.time_len, args.steps, args.warmup_len, args.skip_memory = "2,4", 256, 1, 0, True
        args.doc_min, args.doc_max = 16, 96
    cps = [int(c) for c in args.cps.split(",")]
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    spec = {"model": args.model, "overrides": overrides, "batch": args.batch, "doc_min": args.doc_min,
            "doc_max": args.doc_max, "loss_chunk": args.loss_chunk, "seed": args.seed, "warmup_len": args.warmup_len}
    cfg = model_config(spec)
    from train.context_parallel import check_layout

    for cp in cps:
        check_layout(cp, cp, args.time_len, cfg)
    log = sys.stderr
    started = time.perf_counter()

    # 1. memory
    memory, longest = [], {}
    if not args.skip_memory:
        for cp in cps:
            longest[cp] = None
            for L in series(cp * args.min_len, args.max_len):
                ranks = trial(cp, L, 1, spec)
                if isinstance(ranks, str):
                    memory.append({"cp": cp, "seq_len": L, "error": ranks})
                    print(f"cp {cp} L {L}: {ranks}", file=log)
                    break
                peak = max(r["peak_above_baseline_mb"] for r in ranks)
                row = {"cp": cp, "seq_len": L, "tokens_per_rank": L // cp, "peak_per_rank_mb": peak,
                       "peak_by_rank_mb": [r["peak_above_baseline_mb"] for r in ranks],
                       "baseline_mb": max(r["baseline_mb"] for r in ranks),
                       "step_s": max(r["steps"][0]["seconds"] for r in ranks),
                       "fits": peak <= args.budget_mb, "hwm_reset": all(r["hwm_reset"] for r in ranks),
                       "boundaries_inside_documents": crossings(L, cp, spec, cfg.vocab_size)}
                memory.append(row)
                print(f"cp {cp} L {L}: peak {peak:.1f} MB/rank, step {row['step_s']:.1f} s "
                      f"({'fits' if row['fits'] else 'over'} {args.budget_mb:g} MB) "
                      f"[{time.perf_counter() - started:.0f} s]", file=log)
                if not row["fits"]:
                    break
                longest[cp] = L

    # 2. step time and 3. bytes, at one length
    timing, exchange = [], []
    for cp in cps:
        ranks = trial(cp, args.time_len, args.steps, spec, mmap_threshold=False)
        if isinstance(ranks, str):
            timing.append({"cp": cp, "seq_len": args.time_len, "error": ranks})
            print(f"cp {cp} timing: {ranks}", file=log)
            continue
        per_step = [max(r["steps"][i]["seconds"] for r in ranks) for i in range(args.steps)]
        timing.append({"cp": cp, "seq_len": args.time_len, "step_s_median": statistics.median(per_step),
                       "step_s": per_step, "tokens_per_s": args.time_len * args.batch / statistics.median(per_step),
                       "loss": ranks[0]["steps"][0]["loss"], "lm": ranks[0]["steps"][0]["lm"],
                       "aux": ranks[0]["steps"][0]["aux"],
                       "losses_equal_on_ranks": len({r["steps"][0]["loss"] for r in ranks}) == 1})
        print(f"cp {cp} L {args.time_len}: step {timing[-1]['step_s_median']:.2f} s (median of {per_step}), "
              f"loss {timing[-1]['loss']:.6f} [{time.perf_counter() - started:.0f} s]", file=log)
        if cp > 1:
            exchange.append(bytes_check(cp, args.time_len, ranks, cfg, args.batch))
            e = exchange[-1]
            print(f"  bytes per Mamba layer {e['ranks'][0]['mamba_halo_per_layer'] + e['ranks'][0]['mamba_states_per_layer']:.0f}"
                  f" (formula {e['formula_mamba_per_layer']['total']}), per attention layer "
                  f"{e['ranks'][0]['attention_per_layer']:.0f} (formula {e['formula_attention_per_layer']}), "
                  f"exact on every rank: {e['all_exact']}", file=log)
    # the series is coarse (x1.5, x4/3): the budget crossing interpolated linearly between the last length
    # that fits and the first that does not, and the memory per token of this rank from the same two trials
    interpolated, per_local_token = {}, {}
    for cp in longest:
        rows = [m for m in memory if m["cp"] == cp and "error" not in m]
        over = next((m for m in rows if not m["fits"]), None)
        fit = next((m for m in reversed(rows) if m["fits"]), None)
        if fit and over:
            slope = (over["peak_per_rank_mb"] - fit["peak_per_rank_mb"]) / (over["seq_len"] - fit["seq_len"])
            interpolated[str(cp)] = fit["seq_len"] + (args.budget_mb - fit["peak_per_rank_mb"]) / slope
            per_local_token[str(cp)] = slope * cp * 2**20 / 1024
    ok = [t for t in timing if "loss" in t]
    base = ok[0]["loss"] if ok else None
    for t in ok:
        t["loss_rel_diff_vs_first"] = abs(t["loss"] - base) / abs(base)

    released = released_table(ROOT / "configs/model/jamba-v0.1.yaml")
    for row in released:
        print(f"released, L {row['seq_len']} cp {row['cp']}: Mamba state passing "
              f"{_mb(row['mamba_state_passing_bytes']['total'])} MiB vs channel split "
              f"{_mb(row['mamba_channel_split_bytes']['total'])} MiB per layer; attention "
              f"{_mb(row['attention_ulysses_bytes'])} MiB per layer", file=log)

    result = {"model": os.path.relpath(args.model, ROOT), "overrides": overrides,
              "model_config": {k: getattr(cfg, k) for k in ("d_model", "n_layers", "n_heads", "n_kv_heads",
                                                            "head_dim", "d_inner", "mamba_d_state",
                                                            "mamba_d_conv", "n_experts", "top_k", "vocab_size")},
              "layer_kinds": cfg.layer_kinds, "dtype": "float32", "activation_checkpointing": True,
              "loss_chunk": args.loss_chunk, "batch": args.batch, "documents": [args.doc_min, args.doc_max],
              "threads_per_rank": 1, "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "malloc_mmap_threshold": {"memory": MMAP_THRESHOLD, "step_time": "glibc default"},
              "budget_mb": args.budget_mb, "memory": memory,
              "longest_fitting": {str(cp): L for cp, L in longest.items()},
              "longest_over_cp1": ({str(cp): (L / longest[cps[0]] if L and longest.get(cps[0]) else None)
                                    for cp, L in longest.items()} if longest else {}),
              "longest_interpolated": interpolated,
              "longest_interpolated_over_cp1": {cp: L / interpolated[str(cps[0])] for cp, L in interpolated.items()
                                                if str(cps[0]) in interpolated},
              "kb_per_token_of_the_rank": per_local_token,
              "step_time": timing, "step_time_note": NOTE_CONTENTION, "exchange": exchange,
              "released": released, "wall_s": time.perf_counter() - started,
              "command": " ".join(["bench/context_parallel.py", *sys.argv[1:]])}
    write_result(args.out, result)
    return 0 if all(e["all_exact"] for e in exchange) and all("error" not in t for t in timing) else 1


if __name__ == "__main__":
    raise SystemExit(main())
