"""``python -m train --config X`` (one process) or ``deepspeed --module train --config X`` (many)."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from train.config import TrainConfigError, load_train_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description="Train Jamba with DeepSpeed on pipeline shards.")
    parser.add_argument("--config", required=True, help="configs/train/*.yaml")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set steps=10 --set parallel.ep_size=2")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        import yaml

        overrides[key] = yaml.safe_load(value)
    # A plain `python -m train` is a world of one: give torch.distributed what the launcher would.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    try:
        cfg = load_train_config(args.config, overrides)
        from train.engine import train

        train(cfg)
    except (TrainConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    raise SystemExit(main())
