"""`zero-trainer` (and `python -m zero_trainer`): train, plan, report, export, doctor.

`train` checks everything it can in this process, then hands the ranks to DeepSpeed's own launcher.
"""

import argparse
import os
import sys
from pathlib import Path

from .errors import UsageError


def cmd_train(args) -> int:
    from .hardware import local_gpus
    from .launch import launch
    from .ops import clear_stale_locks
    from .resolve import resolve
    from .train import recipe_from_args

    recipe = recipe_from_args(args)  # cheap first: most bad input is caught before torch is imported
    resolve(recipe, world_size=args.num_procs or local_gpus()[0] or 1, resume=args.resume)
    clear_stale_locks()
    os.environ["ZERO_TRAINER_PREFLIGHT"] = "1"  # the ranks resolve again: warnings were printed here already
    rank_args = ["--recipe", str(Path(recipe.path).resolve())]
    for flag in ("ds_config", "output_dir", "nvme_path"):
        if getattr(args, flag) is not None:
            rank_args += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    rank_args += (["--resume"] if args.resume else []) + list(args.overrides)
    return launch(args.num_procs, args.master_port, rank_args)


def add_train_subcommand(sub) -> None:
    from .train import build_parser as train_parser

    t = sub.add_parser("train", parents=[train_parser()], add_help=False,
                       help="train a recipe through the deepspeed launcher on local resources")
    t.add_argument("--num-procs", type=int, help="ranks on this machine (default: all GPUs; 1 on CPU)")
    t.add_argument("--master-port", type=int, help="rendezvous port (default: a free one)")
    t.set_defaults(func=cmd_train)


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (an unknown flag, a missing --recipe) as the one line every bad input gets."""

    def error(self, message):
        self.exit(2, UsageError(message, "command line", f"see '{self.prog} --help'").line() + "\n")


def build_parser() -> argparse.ArgumentParser:
    # Each subcommand's flags live beside the code it drives (add_subcommand in each module).
    from . import doctor, export, plan_report, report

    p = _Parser(prog="zero-trainer", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    add_train_subcommand(sub)
    for module in (plan_report, report, export, doctor):
        module.add_subcommand(sub)
    return p


def main(argv=None) -> int:
    from .train import parse_with_overrides

    args = parse_with_overrides(build_parser(), argv)
    try:
        if getattr(args, "num_procs", None) is not None and args.num_procs < 1:
            raise UsageError(f"--num-procs {args.num_procs} is invalid", "--num-procs", "use a whole number >= 1")
        return args.func(args)
    except UsageError as err:
        print(err.line(), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
