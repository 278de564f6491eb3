"""Training loader throughput: samples/s of ``RankLoader.next_batch`` alone (windows located and gathered,
targets, segments) for one data-parallel rank, side by side with the loader of the baseline commit (read
from git) on the same data, against the rate a 52B Jamba run on 128 H100s needs.

    .venv/bin/python bench/loader.py --run runs/demo [--seconds 5]

Sources of 10^9 windows each (4 x 10^12 tokens at seq_len 4096) are built from a real pipeline run without
copying data: each source's index lists the run's real record batches over and over with advancing starts,
read through ``--links`` symbolic links to each shard file (so the loader sees that many distinct shard
files: with ``max_open_shards`` 64 most reads open one and close another), and the index is repeated
(``SourceStream.repeated``) up to 10^9 windows. The baseline gets the same layout as a list of pieces, as its
``load_streams`` would build it, at the largest sizes it handles in reasonable time.

Writes bench/results/loader.json. Needs a pipeline run (``make demo``, or ``python -m pipeline run``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import write_result

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from train.data import MixtureSampler, RankLoader, SamplerState, ShardReaders, SourceStream, load_streams  # noqa: E402


def needed_rate(model_yaml: str, device: str, gpus: int, mfu: float, seq_len: int) -> dict:
    """Samples/s that ``gpus`` devices at ``mfu`` consume training the model at ``seq_len``."""
    from model import JambaConfig
    from model.flops import device_peak_flops, training_flops_per_token

    flops_per_token = training_flops_per_token(JambaConfig.from_yaml(model_yaml), seq_len)
    peak = device_peak_flops(device)
    tokens_per_s = gpus * peak * mfu / flops_per_token
    return {"model": os.path.relpath(model_yaml, ROOT), "device": device, "gpus": gpus, "mfu": mfu,
            "seq_len": seq_len, "training_flops_per_token": flops_per_token, "device_peak_flops": peak,
            "tokens_per_s": tokens_per_s, "samples_per_s_global": tokens_per_s / seq_len,
            "samples_per_s_per_rank": tokens_per_s / seq_len / gpus}


def baseline_module(rev: str, tmp: Path):
    """``train/data.py`` as of ``rev``, imported as a module of its own."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:train/data.py"], check=True,
                            capture_output=True, text=True).stdout
    path = tmp / "baseline_train_data.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_train_data", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class Layout:
    """One source's pieces: its real record batches cycled ``count`` times over, copy ``c`` of a record
    batch read through link ``c mod L`` of its shard."""

    def __init__(self, stream: SourceStream, links: dict[Path, list[Path]]):
        self.stream = stream
        self.files = [link for f in stream.files for link in links[f]]   # file f's links side by side
        self.n_links = len(links[stream.files[0]])
        self.real_tokens = np.diff(stream.piece_start)

    def pieces(self, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        i = np.arange(count, dtype=np.int64)
        real, copy = i % len(self.real_tokens), (i // len(self.real_tokens)) % self.n_links
        return (self.stream.piece_file[real].astype(np.int64) * self.n_links + copy,
                self.stream.piece_batch[real], self.real_tokens[real])

    def count_for(self, tokens: int) -> int:
        """Pieces to reach at least ``tokens`` tokens."""
        cycle = int(self.real_tokens.sum())
        whole, rest = divmod(tokens, cycle)
        return whole * len(self.real_tokens) + int(np.searchsorted(np.cumsum(self.real_tokens), rest) + 1)

    def new_stream(self, tokens: int, max_pieces: int, readers) -> SourceStream:
        """At least ``tokens`` tokens: an index of at most ``max_pieces`` pieces, repeated."""
        count = min(self.count_for(tokens), max_pieces)
        piece_file, piece_batch, piece_tokens = self.pieces(count)
        stream = SourceStream(self.stream.name, self.stream.kind, self.files, piece_file, piece_batch, piece_tokens,
                              readers=readers)
        return stream.repeated(-(-tokens // stream.period))

    def old_stream(self, old, tokens: int):
        """The baseline's ``SourceStream`` of the same pieces (no repeat: it lists every piece)."""
        piece_file, piece_batch, piece_tokens = self.pieces(self.count_for(tokens))
        starts = np.concatenate([[0], np.cumsum(piece_tokens)[:-1]])
        stream = old.SourceStream(self.stream.name, self.stream.kind)
        stream.pieces = [old._Piece(self.files[f], int(b), int(s))
                         for f, b, s in zip(piece_file.tolist(), piece_batch.tolist(), starts.tolist())]
        stream.tokens = int(piece_tokens.sum())
        return stream


def measure(loader, seconds: float, min_batches: int) -> dict:
    loader.next_batch()   # warm-up: first maps, first permutations
    batches, start = 0, time.perf_counter()
    while batches < min_batches or time.perf_counter() - start < seconds:
        batch = loader.next_batch()
        batches += 1
    elapsed = time.perf_counter() - start
    rows = batch.input_ids.shape[0]
    return {"batches": batches, "seconds": round(elapsed, 3), "samples_per_s": batches * rows / elapsed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=str(ROOT / "runs/demo"), help="pipeline run directory (its shards are read)")
    parser.add_argument("--baseline", default="b2ced8f", help="commit whose train/data.py is the old loader")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--world", type=int, default=128)
    parser.add_argument("--rank", type=int, default=5)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--windows", type=float, default=1e9, help="windows per source for the new loader")
    parser.add_argument("--old-windows", default="1e5,1e6,2e6",
                        help="windows per source at which both loaders are measured (comma-separated)")
    parser.add_argument("--links", type=int, default=256, help="symbolic links per shard file (distinct files seen)")
    parser.add_argument("--max-pieces", type=int, default=1 << 18, help="index entries per source (then repeated)")
    parser.add_argument("--max-open-shards", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement (at least 3 batches)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=str(ROOT / "configs/model/jamba-v0.1.yaml"))
    parser.add_argument("--device", default="NVIDIA H100 80GB HBM3")
    parser.add_argument("--gpus", type=int, default=128)
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--out", default=str(ROOT / "bench/results/loader.json"))
    args = parser.parse_args()
    if not (Path(args.run) / "manifest.json").exists():
        parser.error(f"{args.run}: no manifest.json (run the pipeline first)")

    need = needed_rate(args.model, args.device, args.gpus, args.mfu, args.seq_len)
    load_before = os.getloadavg()[0]   # the machine may be shared: numbers scale with the CPU left
    window = args.seq_len + 1
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = baseline_module(args.baseline, tmp)
        streams, tokenizer = load_streams([args.run], model_vocab=1 << 31)
        eos = tokenizer["eos_id"]
        real_files = sorted({f for s in streams.values() for f in s.files})
        links = {}
        for i, f in enumerate(real_files):
            links[f] = []
            for c in range(args.links):
                link = tmp / f"shard-{i:06d}-link-{c:04d}.arrow"
                link.symlink_to(f.resolve())
                links[f].append(link)
        layouts = {name: Layout(s, links) for name, s in streams.items()}

        def new_loader(windows: int, max_pieces: int, max_open: int, world: int, rank: int, micro: int,
                       drawn: int = 0) -> RankLoader:
            readers = ShardReaders(max_open)
            built = {n: lay.new_stream(windows * window, max_pieces, readers) for n, lay in layouts.items()}
            sampler = MixtureSampler(built, None, args.seq_len, args.seed)
            sampler.state = SamplerState(drawn=drawn)
            return RankLoader(sampler, micro, rank, world, eos)

        def record(loader_name: str, variant: str, streams_of, outcome: dict, **extra) -> None:
            windows = {n: s.tokens // window for n, s in streams_of.items()}
            row = {"loader": loader_name, "variant": variant, "windows_per_source_min": min(windows.values()),
                   "sources": len(windows), **extra, **outcome}
            results.append(row)
            print(json.dumps(row), file=sys.stderr)

        per_rank = dict(world=args.world, rank=args.rank, micro=args.micro_batch)
        for size in [int(float(x)) for x in args.old_windows.split(",") if x]:
            old_streams = {n: lay.old_stream(old, size * window) for n, lay in layouts.items()}
            old_loader = old.RankLoader(old.MixtureSampler(old_streams, None, args.seq_len, args.seed),
                                        args.micro_batch, args.rank, args.world, eos)
            record("old", "per rank", old_streams, measure(old_loader, args.seconds, 3),
                   pieces_per_source_max=max(len(s.pieces) for s in old_streams.values()))
            del old_loader, old_streams
            # the same pieces, listed in full (max_pieces unbounded: no repeat)
            loader = new_loader(size, 1 << 62, args.max_open_shards, **per_rank)
            record("new", "per rank", loader.sampler.streams, measure(loader, args.seconds, 3),
                   pieces_per_source_max=max(len(s.piece_batch) for s in loader.sampler.streams.values()))

        big = int(args.windows)
        whole_step = dict(world=1, rank=0, micro=args.world * args.micro_batch)
        variants = [   # (name, links: read through the links (else the run's files), loader geometry)
            ("per rank", True, per_rank),
            ("per rank, from global sample 10^12", True, dict(**per_rank, drawn=10**12)),
            ("per rank, the run's own files (every read a hit of the open shards)", False, per_rank),
            (f"one process building whole global steps (world 1, micro-batch {whole_step['micro']})", True,
             whole_step),
        ]
        for variant, through_links, geometry in variants:
            if through_links:
                loader = new_loader(big, args.max_pieces, args.max_open_shards, **geometry)
            else:
                direct, _ = load_streams([args.run], model_vocab=1 << 31, max_open_shards=args.max_open_shards)
                built = {n: s.repeated(-(-big * window // s.period)) for n, s in direct.items()}
                loader = RankLoader(MixtureSampler(built, None, args.seq_len, args.seed), geometry["micro"],
                                    geometry["rank"], geometry["world"], eos)
            readers = next(iter(loader.sampler.streams.values())).readers
            opened = readers.opened
            outcome = measure(loader, args.seconds, 3)
            samples = (outcome["batches"] + 1) * loader.micro_batch
            record("new", variant, loader.sampler.streams, outcome,
                   pieces_per_source_max=max(len(s.piece_batch) for s in loader.sampler.streams.values()),
                   shard_files=len(next(iter(loader.sampler.streams.values())).files),
                   shard_opens_per_sample=round((readers.opened - opened) / samples, 3))
    per_rank_new = next(r for r in results if r["loader"] == "new" and r["variant"] == "per rank"
                        and r["windows_per_source_min"] >= big)
    whole = next(r for r in results if r["variant"].startswith("one process"))
    result = {
        "command": " ".join(["python", "bench/loader.py", *sys.argv[1:]]),
        "run": os.path.relpath(args.run, ROOT) if args.run.startswith(str(ROOT)) else args.run,
        "baseline": args.baseline,
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "cpus": os.cpu_count(),
        "need": need,
        "results": results,
        "new_per_rank_samples_per_s": per_rank_new["samples_per_s"],
        "ratio_to_per_rank_need": per_rank_new["samples_per_s"] / need["samples_per_s_per_rank"],
        "ratio_to_global_need": per_rank_new["samples_per_s"] / need["samples_per_s_global"],
        "whole_step_samples_per_s": whole["samples_per_s"],
        "whole_step_ratio_to_global_need": whole["samples_per_s"] / need["samples_per_s_global"],
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
