"""``python -m train``: train (default), plan the memory of a launch, or export a checkpoint.

    deepspeed --num_gpus N --module train --config X.yaml          # many ranks (the launcher adds --local_rank)
    python -m train --config X.yaml [--set key=value ...]         # one process
    python -m train plan --config X.yaml --gpus 64 --gpu-memory 80GB [--json]
    python -m train export --checkpoint DIR [--tag T] --to-hf OUT [--native OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

from train.config import TrainConfigError, load_train_config

EXIT_BAD_CONFIG, EXIT_DOES_NOT_FIT = 2, 3


def _overrides(items: list[str]) -> dict:
    import yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise TrainConfigError(f"--set {item}: write KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    return overrides


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="configs/train/*.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set steps=10 --set parallel.ep_size=2")


def cmd_train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description="Train Jamba with DeepSpeed on pipeline "
                                     "shards. Subcommands: plan, export (see `python -m train plan --help`).")
    _config_args(parser)
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = parser.parse_args(argv)
    # A plain `python -m train` is a world of one: give torch.distributed what the launcher would.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    try:
        cfg = load_train_config(args.config, _overrides(args.set))
        from train.engine import train

        train(cfg)
    except (TrainConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    return 0


def cmd_plan(argv: list[str]) -> int:
    from train.plan import DEFAULT_OVERHEAD_CUDA, load_deepspeed_extra, parse_size, plan_memory

    parser = argparse.ArgumentParser(prog="python -m train plan", description="Per-GPU memory plan of a training "
                                     "config; exit status 3 when it does not fit.")
    _config_args(parser)
    parser.add_argument("--gpus", type=int, required=True, help="total number of ranks (GPUs)")
    parser.add_argument("--gpu-memory", default="80GB", help="memory per GPU, e.g. 80GB (10^9) or 80GiB")
    parser.add_argument("--overhead", default=str(DEFAULT_OVERHEAD_CUDA),
                        help="CUDA context, NCCL and allocator reserve per GPU (default 3GiB)")
    parser.add_argument("--expert-imbalance", type=float, default=None,
                        help="most-loaded expert-parallel rank / mean (default: parallel.expert_imbalance)")
    parser.add_argument("--pure", action="store_true", help="plan for the pure-PyTorch Mamba path (no kernels)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    try:
        from model import JambaConfig

        cfg = load_train_config(args.config, _overrides(args.set))
        model_cfg = JambaConfig.from_yaml(cfg.model)
        plan = plan_memory(cfg, model_cfg, args.gpus, parse_size(args.gpu_memory), parse_size(args.overhead),
                           args.expert_imbalance or cfg.parallel.expert_imbalance, kernels=not args.pure,
                           deepspeed_extra=load_deepspeed_extra(cfg.parallel.deepspeed))
    except (TrainConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    print(json.dumps(plan.to_json(), indent=2) if args.json else plan.summary())
    return 0 if plan.fits else EXIT_DOES_NOT_FIT


def cmd_export(argv: list[str]) -> int:
    from train.export import ExportError, export_checkpoint

    parser = argparse.ArgumentParser(prog="python -m train export", description="Stream a DeepSpeed checkpoint "
                                     "(non-expert weights memory-mapped, one MoE layer's expert files at a time) "
                                     "into sharded Hugging Face and/or native safetensors checkpoints.")
    parser.add_argument("--checkpoint", required=True, help="the training checkpoint directory (checkpoint.dir)")
    parser.add_argument("--tag", default=None, help="a tag such as step200 (default: the one in 'latest')")
    parser.add_argument("--to-hf", default=None, help="output directory for the Hugging Face checkpoint")
    parser.add_argument("--native", default=None, help="output directory for the native checkpoint")
    parser.add_argument("--model", default=None, help="configs/model/*.yaml, for checkpoints without one")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output checkpoint (a directory with a config.json)")
    args = parser.parse_args(argv)
    if not args.to_hf and not args.native:
        parser.error("give --to-hf and/or --native")
    try:
        model_cfg = None
        if args.model:
            from model import JambaConfig

            model_cfg = JambaConfig.from_yaml(args.model)
        summary = export_checkpoint(args.checkpoint, args.to_hf, args.native, args.tag, model_cfg,
                                    overwrite=args.overwrite)
    except (ExportError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"plan": cmd_plan, "export": cmd_export, "train": cmd_train}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    return cmd_train(argv)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    raise SystemExit(main())
