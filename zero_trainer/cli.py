"""`zero-trainer` (and `python -m zero_trainer`): train, plan, export, doctor.

`train` checks everything it can in this process, then hands the ranks to DeepSpeed's own launcher.
"""

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .errors import UsageError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_command(args, recipe_path: str) -> list[str]:
    import torch

    deepspeed_bin = Path(sys.executable).with_name("deepspeed")
    cmd = [str(deepspeed_bin) if deepspeed_bin.exists() else "deepspeed"]
    if torch.cuda.is_available():
        if args.num_procs:
            cmd += ["--num_gpus", str(args.num_procs)]
    else:  # CPU ranks: one unless asked for more
        cmd += ["--num_gpus", str(args.num_procs or 1)]
    cmd += ["--master_port", str(args.master_port or free_port()), "--module", "zero_trainer.train",
            "--recipe", recipe_path]
    for flag in ("ds_config", "output_dir", "nvme_path"):
        value = getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag.replace('_', '-')}", value]
    if args.resume:
        cmd.append("--resume")
    return cmd + list(args.overrides)


def run_launcher(cmd: list[str]) -> int:
    """Run the deepspeed launcher in its own process group; a SIGTERM/SIGINT to us goes to the whole group.

    DeepSpeed's top-level runner does not forward signals on a single node, so signalling only it would
    orphan the ranks. Each rank catches SIGTERM, checkpoints the current step and exits; we wait for that.
    """
    proc = subprocess.Popen(cmd, start_new_session=True)
    received = []

    def forward(signum, _frame):
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    code = proc.wait()
    if received:
        deadline = time.time() + 120  # the ranks are writing their checkpoint
        while time.time() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        return 128 + received[0]
    return code


def cmd_train(args) -> int:
    from .train import recipe_from_args

    recipe = recipe_from_args(args)  # cheap first: most bad input is caught before torch is imported
    from .checkpoint import check_resume, check_stage_change
    from .ds_config import preflight, zero_stage
    from .model import model_config
    from .ops import clear_stale_locks, remove_shm_buffers
    from .trainer import model_source

    world_size = args.num_procs or _local_device_count()
    resolved = preflight(recipe, world_size=world_size)
    resume_from = check_resume(recipe, model_config(model_source(recipe)), args.resume)
    if resume_from is not None:
        check_stage_change(resume_from, zero_stage(resolved))
    clear_stale_locks()
    recipe_path = str(Path(recipe["recipe_path"]).resolve())
    if args.master_port is None:
        args.master_port = free_port()
    cmd = launcher_command(args, recipe_path)
    print("launching: " + " ".join(cmd), flush=True)
    try:
        return run_launcher(cmd)
    finally:
        remove_shm_buffers(args.master_port)


def _local_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def add_train_subcommand(sub) -> None:
    from .train import build_parser as train_parser

    t = sub.add_parser("train", parents=[train_parser()], add_help=False,
                       help="train a recipe through the deepspeed launcher on local resources")
    t.add_argument("--num-procs", type=int, help="ranks on this machine (default: all GPUs; 1 on CPU)")
    t.add_argument("--master-port", type=int, help="rendezvous port (default: a free one)")
    t.set_defaults(func=cmd_train)


# Each subcommand lives beside the code it drives; each module has add_subcommand(subparsers).
SUBCOMMANDS = [
    "zero_trainer.cli:add_train_subcommand",
    "zero_trainer.plan:add_subcommand",
    "zero_trainer.export:add_subcommand",
    "zero_trainer.doctor:add_subcommand",
]


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (an unknown flag, a missing --recipe) as the one line every bad input gets."""

    def error(self, message):
        self.exit(2, UsageError(message, "command line", f"see '{self.prog} --help'").line() + "\n")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    p = _Parser(prog="zero-trainer", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for entry in SUBCOMMANDS:
        module, func = entry.split(":")
        getattr(importlib.import_module(module), func)(sub)
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
