"""`python -m drift.train`: the same as `drift train` (used under `accelerate launch`)."""

import argparse
import logging
import sys

import torch

from drift import DriftError
from drift.config import add_arguments, from_cli
from drift.train.trainer import TrainConfig, run_train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drift.train", description="importance-weighted fine-tuning")
    parser.add_argument("--config", help="TOML/YAML file with the same keys as the flags (flags win)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    add_arguments(parser, TrainConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    distributed = torch.distributed.is_available()
    try:
        run_train(from_cli(TrainConfig, args, args.config, args.set))
        if distributed and torch.distributed.is_initialized():
            # every rank reaches the teardown together: a rank that tore its group down while a
            # peer's gloo threads still served it made that peer abort at exit (about 1 launch in 20
            # on two loaded cores)
            torch.distributed.barrier()
    except DriftError as e:
        print(f"drift train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
