"""The `drift` command: a thin dispatcher. Every subcommand calls one documented function
with the same typed config a Python user would build (flags are generated from its fields)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from typing import Any

from drift import DriftError, __version__
from drift.config import add_arguments, from_cli
from drift.rundir import is_space_error, space_error

# subcommand -> (module, config class, run function, positional field, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str | None, str]] = {
    "rollout": ("drift.rollout.engine", "RolloutConfig", "run_rollout", None,
                "sample multi-turn try-again conversations once from a reference model"),
    "weights": ("drift.weights", "WeightsConfig", "run_weights", "input",
                "score trajectories (returns) and add per-group importance weights"),
    "train": ("drift.train.trainer", "TrainConfig", "run_train", None,
              "importance-weighted fine-tuning on weighted trajectories"),
    "online": ("drift.online.run", "OnlineConfig", "run_online", None,
               "online multi-turn RL on fresh samples of the current policy (the GRPO family): DRIFT's baseline"),
    "eval": ("drift.evaluate", "EvalConfig", "run_eval", None,
             "multi-turn evaluation (succ@k, correction rate, unique-answer ratio, pass@k)"),
    "compare": ("drift.evaluate", "CompareConfig", "run_compare", "dirs",
                "side-by-side table of several eval runs, paired differences, optional succ@k plot"),
    "run": ("drift.pipeline", "RunConfig", "run_pipeline", "config_path",
            "the whole pipeline from one config file: rollout -> weights -> train -> eval -> report"),
    "demo": ("drift.pipeline", "DemoConfig", "run_demo", None,
             "the pipeline on the embedded SmolLM2-135M and mul: base, then one and two rounds of RFT and of DRIFT"),
    "inspect": ("drift.train.inspect", "InspectConfig", "run_inspect", "data",
                "show a training row with its trained tokens marked"),
}


def _load(name: str) -> tuple[type, Callable[[Any], Any], str | None]:
    module, cls, fn, positional, _ = COMMANDS[name]
    mod = importlib.import_module(module)
    return getattr(mod, cls), getattr(mod, fn), positional


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (so `drift --help` stays fast)."""
    parser = argparse.ArgumentParser(prog="drift", description="Teach language models to correct themselves "
                                     "with decoupled rollouts and importance-weighted fine-tuning.")
    parser.add_argument("--version", action="version", version=f"drift {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, _, _, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name != command:
            continue
        cls, _, positional = _load(name)
        p.add_argument("--config", help="TOML/YAML/JSON file with the same keys as the flags (flags win)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key (dotted for nested sections); repeatable")
        add_arguments(p, cls, positional=(positional,) if positional else ())
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cls, run, _ = _load(args.command)
        cfg = from_cli(cls, args, _config_file(args), args.set)
        result = run(cfg)
        _print_result(args.command, result)
        _barrier()
    except DriftError as e:
        print(f"drift {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if not is_space_error(e):
            raise
        # a full disk anywhere in a stage: the file it was writing, not a traceback
        print(f"drift {args.command}: error: {space_error(e.filename or '.')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"drift {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        _teardown()
    return 0


def _process_group() -> Any:
    """`torch.distributed` when this process is one rank of an `accelerate launch` group, else None.
    A group exists only after a stage imported torch, so torch is never loaded here for nothing
    (`drift --help` stays fast)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    return torch.distributed


def _barrier() -> None:
    """Every rank reaches the teardown together: a rank that tore its group down while a peer's
    gloo threads still served it made that peer abort at exit (about 1 launch in 20 of a
    2-process `drift train` on two loaded cores; 75 launches passed with the barrier, at 67e911b)."""
    if (dist := _process_group()) is not None:
        dist.barrier()


def _teardown() -> None:
    if (dist := _process_group()) is not None:
        dist.destroy_process_group()


def _config_file(args: argparse.Namespace) -> str | None:
    """`--config FILE`; `drift run` also takes it as its positional (`drift run FILE`), not both."""
    positional = getattr(args, "config_path", None)
    if positional is not None and args.config is not None:
        raise DriftError(f"two config files ({positional} and --config {args.config}): give one")
    if hasattr(args, "config_path"):
        args.config_path = positional or args.config
    return positional or args.config


def _print_result(command: str, result: Any) -> None:
    """What each command shows when it is done (the stage functions return data and print nothing)."""
    from rich.console import Console

    if command == "rollout":
        from drift.rollout.engine import summary_table

        Console().print(summary_table(result))
    elif command == "weights":
        from rich.table import Table

        from drift.weights import diagnostics_table

        table = Table(title="weights")
        table.add_column("diagnostic")
        table.add_column("value")
        for k, v in diagnostics_table(result):
            table.add_row(k, v)
        Console().print(table)
    elif command == "eval":
        from drift.evaluate import markdown_table, run_label

        print(markdown_table([result], [run_label(result["config"]["output"])]))
    elif isinstance(result, str):
        print(result)


if __name__ == "__main__":
    sys.exit(main())
