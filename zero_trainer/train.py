"""The per-rank entry point. Any launcher runs it with the same flags:

    deepspeed [launcher args] --module zero_trainer.train --recipe recipes/debug.yaml train.max_steps=30
    torchrun --nproc-per-node 2 -m zero_trainer.train --recipe recipes/debug.yaml
    zero-trainer train --recipe recipes/debug.yaml --num-procs 2     (wraps the deepspeed launcher)
"""

import argparse
import os
import sys

from .errors import UsageError


def build_parser(prog: str = "zero_trainer.train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train a causal LM through DeepSpeed ZeRO.")
    p.add_argument("--recipe", required=True, help="recipe YAML path, or a name from recipes/")
    p.add_argument("--ds-config", help="ds_configs name (zero3, zero3_offload, ...), a JSON path, or auto")
    p.add_argument("--output-dir", help="where metrics.csv, summary.json and checkpoints go")
    p.add_argument("--nvme-path", help="NVMe swap directory for zero3_nvme (default OUTPUT_DIR/nvme)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. train.max_steps=30")
    return p


def parse_with_overrides(parser: argparse.ArgumentParser, argv=None):
    """argparse stops collecting KEY=VALUE positionals at the first flag; gather the ones after it too."""
    args, extra = parser.parse_known_args(argv)
    takes_overrides = hasattr(args, "overrides")
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not takes_overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(getattr(args, "overrides", None) or []) + extra
    return args


def recipe_from_args(args):
    """The recipe after file, overrides and CLI flags — identical in the launcher and in every rank."""
    from .recipe import load_recipe

    flags = {field: (getattr(args, flag), f"--{flag.replace('_', '-')}") for flag, field in (
        ("ds_config", "deepspeed.config"), ("output_dir", "output_dir"), ("nvme_path", "deepspeed.nvme_path"))}
    return load_recipe(args.recipe, args.overrides, flags)


def main(argv=None) -> int:
    parser = build_parser()
    # Launchers append --local_rank=N (deepspeed) or set LOCAL_RANK (torchrun); we read the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parse_with_overrides(parser, argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        recipe = recipe_from_args(args)
        from .trainer import run_training

        run_training(recipe, resume=args.resume)
    except UsageError as err:
        print(err.line(), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
