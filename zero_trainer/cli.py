"""`zero-trainer` (and `python -m zero_trainer`): train, plan, report, export, doctor, probe.

`train` checks everything it can in this process, then hands the ranks to DeepSpeed's own launcher.
"""

import argparse
import contextlib
import os
import sys
from pathlib import Path

from .errors import UsageError


def cmd_train(args) -> int:
    from .hardware import local_gpus
    from .launch import launch, multi_node
    from .ops import clear_stale_locks
    from .resolve import resolve
    from .train import recipe_from_args

    nodes = multi_node(args)  # cheap first: most bad input is caught before torch is imported
    recipe = recipe_from_args(args)
    if nodes is None:
        resolve(recipe, world_size=args.num_procs or local_gpus()[0] or 1, resume=args.resume)
    else:  # plan the hostfile's nodes: the ranks learn their node's size from the launcher's LOCAL_SIZE
        with ranks_per_node(nodes.ranks_per_node):
            resolve(recipe, world_size=nodes.world_size, resume=args.resume)
    clear_stale_locks()
    os.environ["ZERO_TRAINER_PREFLIGHT"] = "1"  # the ranks resolve again: warnings were printed here already
    rank_args = ["--recipe", str(Path(recipe.path).resolve())]
    for flag in ("ds_config", "output_dir", "nvme_path"):
        if getattr(args, flag) is not None:
            rank_args += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    rank_args += (["--resume"] if args.resume else []) + list(args.overrides)
    return launch(args.num_procs, args.master_port, rank_args, nodes)


@contextlib.contextmanager
def ranks_per_node(count: int):
    """LOCAL_WORLD_SIZE as a rank on one of the hostfile's nodes has it (hardware.local_world_size), while the
    preflight plans: so it plans the same nodes × ranks as the ranks will."""
    before = os.environ.get("LOCAL_WORLD_SIZE")
    os.environ["LOCAL_WORLD_SIZE"] = str(count)
    try:
        yield
    finally:
        if before is None:
            del os.environ["LOCAL_WORLD_SIZE"]
        else:
            os.environ["LOCAL_WORLD_SIZE"] = before


def add_train_subcommand(sub) -> None:
    from .train import build_parser as train_parser

    t = sub.add_parser("train", parents=[train_parser()], add_help=False,
                       help="train a recipe through the deepspeed launcher, on this machine or a hostfile's nodes")
    t.add_argument("--num-procs", type=int, help="ranks on this machine (default: all GPUs; 1 on CPU)")
    t.add_argument("--master-port", type=int, help="rendezvous port (default: a free one)")
    nodes = t.add_argument_group("multi-node (DeepSpeed's runner: --hostfile, --launcher, --no_ssh, --node_rank, "
                                 "--master_addr)")
    nodes.add_argument("--hostfile", help="'hostname slots=N' lines: train on these nodes, N ranks on each")
    nodes.add_argument("--launcher", help="how DeepSpeed starts the nodes: pdsh (default), openmpi, mpich, impi, "
                                          "mvapich, slurm")
    nodes.add_argument("--no-ssh", action="store_true",
                       help="start only this node's ranks (run once per node, with --node-rank, --master-addr, "
                            "--master-port)")
    nodes.add_argument("--node-rank", type=int, help="with --no-ssh: this node's line among the hostfile's hosts "
                                                      "(from 0)")
    nodes.add_argument("--master-addr", help="node 0's address, where every rank meets")
    t.set_defaults(func=cmd_train)


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (an unknown flag, a missing --recipe) as the one line every bad input gets."""

    def error(self, message):
        self.exit(2, UsageError(message, "command line", f"see '{self.prog} --help'").line() + "\n")


def build_parser() -> argparse.ArgumentParser:
    # Each subcommand's flags live beside the code it drives (add_subcommand in each module).
    from . import doctor, export, plan_report, probe, report

    p = _Parser(prog="zero-trainer", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    add_train_subcommand(sub)
    for module in (plan_report, report, export, doctor, probe):
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
