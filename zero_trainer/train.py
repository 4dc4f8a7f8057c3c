"""The per-rank entry point. Any launcher runs it with the same flags, and so does no launcher at all:

    deepspeed [launcher args] --module zero_trainer.train --recipe recipes/debug.yaml train.max_steps=30
    torchrun --nproc-per-node 2 -m zero_trainer.train --recipe recipes/debug.yaml
    accelerate launch --multi_gpu --num_processes 2 -m zero_trainer.train --recipe recipes/debug.yaml
    accelerate launch --use_deepspeed --deepspeed_config_file F.json --num_processes 2 -m zero_trainer.train ...
    python -m zero_trainer.train --recipe recipes/debug.yaml          (one rank: a debugger, a notebook)
    zero-trainer train --recipe recipes/debug.yaml --num-procs 2     (wraps the deepspeed launcher)

`accelerate launch` hands its own flags to the script as ACCELERATE_* variables; each one is honoured (it sets the
recipe field it means, as a command-line flag would) or refused with one line, never ignored.
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


def recipe_from_args(args, env=None):
    """The recipe after file, overrides, CLI flags and accelerate's flags — identical in the launcher and in every
    rank."""
    from .recipe import load_recipe

    flags = {field: (getattr(args, flag), f"--{flag.replace('_', '-')}") for flag, field in (
        ("ds_config", "deepspeed.config"), ("output_dir", "output_dir"), ("nvme_path", "deepspeed.nvme_path"))}
    for field, (value, flag) in accelerate_flags(os.environ if env is None else env).items():
        given, given_flag = flags.get(field, (None, None))
        if given is not None and str(given) != str(value):
            raise UsageError(f"{given_flag} {given} and accelerate's {flag} {value} disagree", flag,
                             "give the setting once")
        flags[field] = (value, f"accelerate launch {flag}")
    return load_recipe(args.recipe, args.overrides, flags)


# accelerate launch's --zero_stage / --offload_*_device (without a config file) -> the shipped JSON that means it
ACCELERATE_ZERO = {("0", "none", "none"): "zero0", ("1", "none", "none"): "zero1", ("2", "none", "none"): "zero2",
                   ("2", "cpu", "none"): "zero2_offload", ("3", "none", "none"): "zero3",
                   ("3", "cpu", "none"): "zero3_offload_optimizer", ("3", "cpu", "cpu"): "zero3_offload",
                   ("3", "nvme", "nvme"): "zero3_nvme"}


def accelerate_flags(env) -> dict:
    """Recipe fields set by the flags of an `accelerate launch` that started this process: {field: (value, flag)}.

    accelerate puts them in the environment (accelerate/utils/launch.py). `--mixed_precision no` is also what
    accelerate writes when the flag is absent, so it leaves train.precision to the recipe."""
    fields = {}
    if not any(key.startswith("ACCELERATE_") for key in env):
        return fields

    def refuse(flag, why, fix):
        raise UsageError(f"accelerate launch {flag}: {why}", f"accelerate launch {flag}", fix)

    mixed = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mixed in ("bf16", "fp16"):
        fields["train.precision"] = (mixed, "--mixed_precision")
    elif mixed not in ("no", ""):
        refuse("--mixed_precision", f"{mixed} is not a precision zero_trainer trains in",
               "use bf16, fp16 or no (no: the recipe's train.precision)")
    for var, flag in (("ACCELERATE_USE_FSDP", "--use_fsdp"), ("ACCELERATE_USE_MEGATRON_LM", "--use_megatron_lm")):
        if env.get(var, "").lower() == "true":
            refuse(flag, "zero_trainer trains through DeepSpeed only", "use --use_deepspeed (or no backend flag)")
    if env.get("ACCELERATE_DYNAMO_BACKEND", "no").lower() not in ("no", ""):
        refuse("--dynamo_backend", "torch.compile is not part of a zero_trainer run", "drop --dynamo_backend")
    if env.get("ACCELERATE_USE_CPU", "").lower() == "true":
        import torch

        if torch.cuda.is_available():
            refuse("--cpu", "zero_trainer trains on the GPUs it is given", "drop --cpu or hide the GPUs "
                   "(CUDA_VISIBLE_DEVICES=)")
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return fields
    if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        fields["deepspeed.config"] = (env["ACCELERATE_DEEPSPEED_CONFIG_FILE"], "--deepspeed_config_file")
    elif "ACCELERATE_DEEPSPEED_ZERO_STAGE" in env:
        key = (env["ACCELERATE_DEEPSPEED_ZERO_STAGE"], env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none"),
               env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none"))
        if key not in ACCELERATE_ZERO:
            refuse("--zero_stage", f"stage {key[0]} with optimizer offload {key[1]} and parameter offload {key[2]} "
                   "is not a shipped ds_config", "use --deepspeed_config_file FILE.json, or one of: " +
                   ", ".join(f"--zero_stage {k[0]} --offload_optimizer_device {k[1]} --offload_param_device {k[2]}"
                             for k in ACCELERATE_ZERO if k[0] == key[0]))
        fields["deepspeed.config"] = (ACCELERATE_ZERO[key], "--zero_stage")
    if env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS"):
        fields["train.grad_accum"] = (_number(env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"], int,
                                              "--gradient_accumulation_steps"), "--gradient_accumulation_steps")
    if env.get("ACCELERATE_GRADIENT_CLIPPING"):
        fields["train.grad_clip"] = (_number(env["ACCELERATE_GRADIENT_CLIPPING"], float, "--gradient_clipping"),
                                     "--gradient_clipping")
    if env.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "").lower() == "false":
        refuse("--zero3_init_flag false", "zero_trainer always builds a stage-3 model under deepspeed.zero.Init "
               "(each rank allocates only its shard)", "drop --zero3_init_flag")
    return fields


def _number(text: str, kind, flag: str):
    try:
        return kind(text)
    except ValueError:
        raise UsageError(f"accelerate launch {flag} {text} is not a number", f"accelerate launch {flag}",
                         "give a number") from None


def single_rank_environment() -> None:
    """No launcher (`python -m zero_trainer.train`, a debugger, `accelerate launch` without --multi_gpu): one rank.
    Without RANK and friends DeepSpeed looks for MPI instead (and dies on the missing mpi4py)."""
    if any(key in os.environ for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")):
        return
    from .hardware import free_port

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def main(argv=None) -> int:
    parser = build_parser()
    # Launchers append --local_rank=N (deepspeed) or set LOCAL_RANK (torchrun); we read the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parse_with_overrides(parser, argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    single_rank_environment()
    try:
        recipe = recipe_from_args(args)
        honoured = accelerate_flags(os.environ)
        if honoured and os.environ.get("RANK") == "0":
            print("accelerate launch flags honoured: " + ", ".join(
                f"{flag} {value} -> {field}" for field, (value, flag) in honoured.items()), flush=True)
        from .trainer import run_training

        run_training(recipe, resume=args.resume)
    except UsageError as err:
        print(err.line(), file=sys.stderr)
        return 2
    shut_down_process_group()
    return 0


def shut_down_process_group() -> None:
    """Tear the process group down before the interpreter does: left to exit, gloo's threads were once destroyed
    still joinable ("terminate called without an active exception", SIGABRT) after a rank had finished and written
    everything (an accelerate launch in CI). Every rank has passed the run's last collective when this runs."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_now(code: int) -> None:
    """A rank's last act once everything is written and the process group is down: flush and leave without the
    interpreter's teardown. Twice in CI a rank that had finished and written everything then aborted at exit
    ("terminate called without an active exception": a native thread destroyed while still joinable, after
    destroy_process_group too), and its launcher reported the whole run as failed. Files are closed by then (metrics,
    reporters, summary, checkpoints); only the teardown is skipped. For `python -m zero_trainer.train` (and test
    harnesses), never for main() called in-process."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
