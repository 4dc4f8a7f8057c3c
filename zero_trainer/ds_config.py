"""Everything zero_trainer knows about DeepSpeed JSON: finding it, filling "auto", checking combinations.

Nobody else edits config dicts. The "auto" convention is HF Trainer's (transformers/integrations/deepspeed.py):
an "auto" value is filled from the recipe; an explicit value that contradicts the recipe is an error listing
every mismatch, so the same JSON file works unchanged here and in `TrainingArguments(deepspeed=path)`.
"""

import copy
import json
import os
from pathlib import Path

from .errors import UsageError, did_you_mean
from .recipe import REPO_ROOT

DS_CONFIG_DIR = REPO_ROOT / "ds_configs"

# Used when a user's JSON has no optimizer/scheduler block: the same ones the shipped files carry.
DEFAULT_OPTIMIZER = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}
DEFAULT_SCHEDULER = {"type": "WarmupCosineLR",
                     "params": {"total_num_steps": "auto", "warmup_num_steps": "auto", "warmup_min_ratio": 0.0,
                                "cos_min_ratio": 0.1, "warmup_type": "linear"}}


def available_ds_configs() -> list[str]:
    return sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))


def load_ds_config(name_or_path: str) -> tuple[str, dict]:
    """A ds_configs/ name without `.json` (`zero3_offload`) or a path. Returns (name, config dict)."""
    path = Path(name_or_path)
    if not (name_or_path.endswith(".json") or os.sep in name_or_path):
        path = DS_CONFIG_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise UsageError(f"unknown ds_config '{name_or_path}'", "deepspeed.config",
                             did_you_mean(name_or_path, available_ds_configs() + ["auto"]) +
                             " (or give a path to a JSON file)")
    if not path.is_file():
        raise UsageError(f"ds_config file '{name_or_path}' not found", "deepspeed.config",
                         "give an existing JSON path or a name from ds_configs/")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"ds_config is not valid JSON: {err.msg}", f"{path}:{err.lineno}:{err.colno}",
                         "fix the JSON at that position") from None
    if not isinstance(config, dict):
        raise UsageError("ds_config must be a JSON object", str(path), "wrap the settings in { ... }")
    return path.stem, config


def select_ds_config(recipe: dict, model_cfg, world_size: int) -> tuple[str, dict]:
    """The recipe's deepspeed.config; "auto" asks the planner for the least-sharded rung that fits here."""
    name = recipe["deepspeed"]["config"]
    if name == "auto":
        from .plan import plan_for_recipe

        name = plan_for_recipe(recipe, model_cfg, world_size)
    return load_ds_config(name)


def load_universal_checkpoint(ds: dict) -> dict:
    """The config that makes engine.load_checkpoint read a universal checkpoint (another world size/stage)."""
    ds = copy.deepcopy(ds)
    ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offload_device(ds: dict, what: str) -> str:
    """'none', 'cpu' or 'nvme' for what in ('optimizer', 'param')."""
    block = ds.get("zero_optimization", {}).get(f"offload_{what}") or {}
    return str(block.get("device", "none"))


class _Filler:
    """HF's fill_match: replace "auto", and record explicit values that disagree with the recipe."""

    def __init__(self, config: dict):
        self.config, self.mismatches = config, []

    def fill(self, dotted: str, value, recipe_field: str, must_match: bool = True):
        *parents, leaf = dotted.split(".")
        node = self.config
        for part in parents:
            node = node.get(part)
            if not isinstance(node, dict):
                return
        if node.get(leaf) == "auto":
            node[leaf] = value
        elif must_match and leaf in node and node[leaf] != value:
            self.mismatches.append(f"{dotted}={node[leaf]!r} vs {recipe_field}={value!r}")


def resolve_auto_values(ds: dict, recipe: dict, *, world_size: int, hidden_size: int,
                        largest_param_numel: int = 0, output_dir: str | None = None) -> dict:
    """A copy of `ds` with every "auto" filled from the recipe, ready for deepspeed.initialize."""
    ds = copy.deepcopy(ds)
    train = recipe["train"]
    ds.setdefault("optimizer", copy.deepcopy(DEFAULT_OPTIMIZER))
    ds.setdefault("scheduler", copy.deepcopy(DEFAULT_SCHEDULER))
    precision = train["precision"]
    ds.setdefault("bf16", {"enabled": "auto"})
    ds.setdefault("fp16", {"enabled": "auto"})
    f = _Filler(ds)
    micro, accum = train["micro_batch"], train["grad_accum"]
    f.fill("train_micro_batch_size_per_gpu", micro, "train.micro_batch")
    f.fill("gradient_accumulation_steps", accum, "train.grad_accum")
    f.fill("train_batch_size", micro * accum * world_size, "train.micro_batch*train.grad_accum*world_size")
    f.fill("gradient_clipping", train["grad_clip"], "train.grad_clip")
    f.fill("optimizer.params.lr", train["lr"], "train.lr")
    f.fill("optimizer.params.betas", list(train["betas"]), "train.betas")
    f.fill("optimizer.params.eps", train["eps"], "train.eps")
    f.fill("optimizer.params.weight_decay", train["weight_decay"], "train.weight_decay")
    f.fill("scheduler.params.total_num_steps", train["max_steps"], "train.max_steps")
    # DeepSpeed >= 0.19.6 rejects warmup_num_steps <= 0 (HF clamps the same way).
    f.fill("scheduler.params.warmup_num_steps", max(1, train["warmup_steps"]), "train.warmup_steps")
    f.fill("scheduler.params.warmup_max_lr", train["lr"], "train.lr")
    f.fill("scheduler.params.warmup_min_lr", 0, "train.lr", must_match=False)
    f.fill("fp16.enabled", precision == "fp16", "train.precision")
    f.fill("bf16.enabled", precision == "bf16", "train.precision")
    # Bucket sizes scale with the hidden size, as HF's trainer_config_finalize sets them.
    f.fill("zero_optimization.reduce_bucket_size", hidden_size * hidden_size, "model.hidden_size", must_match=False)
    f.fill("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size),
           "model.hidden_size", must_match=False)
    f.fill("zero_optimization.stage3_param_persistence_threshold", 10 * hidden_size, "model.hidden_size",
           must_match=False)
    if f.mismatches:
        raise UsageError("ds_config contradicts the recipe: " + "; ".join(f.mismatches), "deepspeed.config",
                         'set these DeepSpeed values to "auto" or change the recipe to match')

    zero = ds.get("zero_optimization", {})
    nvme_path = recipe["deepspeed"]["nvme_path"] or (os.path.join(output_dir, "nvme") if output_dir else None)
    for what in ("optimizer", "param"):
        block = zero.get(f"offload_{what}")
        if block and block.get("device") == "nvme" and nvme_path:
            block["nvme_path"] = str(Path(nvme_path).resolve())
    # The NVMe parameter swap buffer must hold the largest single parameter (the embedding, usually).
    param_block = zero.get("offload_param") or {}
    if param_block.get("device") == "nvme" and param_block.get("buffer_size", 0) < largest_param_numel:
        param_block["buffer_size"] = largest_param_numel

    if output_dir:
        ds["csv_monitor"] = {"enabled": True, "output_path": str(Path(output_dir).resolve() / "monitor"),
                             "job_name": "ds"}
    return ds


def preflight(recipe: dict, world_size: int) -> dict:
    """Every check that can run before a process is launched. Raises UsageError; returns the resolved config.

    Checks run in the order a user would fix them: model, precision, DeepSpeed JSON, data.
    """
    import torch

    from .data import DataError
    from .model import model_config
    from .trainer import load_data, model_source

    field = "model.config" if recipe["model"]["config"] else "model.preset"
    try:
        cfg = model_config(model_source(recipe))
    except (ValueError, OSError) as err:
        raise UsageError(str(err).splitlines()[0], field,
                         "use a preset name or a local causal-LM config.json") from None
    seq_len, positions = recipe["data"]["seq_len"], getattr(cfg, "max_position_embeddings", None)
    if positions and seq_len > positions:
        raise UsageError(f"data.seq_len {seq_len} exceeds the model's max_position_embeddings {positions}",
                         "data.seq_len", f"use data.seq_len <= {positions}")
    if recipe["train"]["precision"] == "fp16" and not torch.cuda.is_available():
        raise UsageError("fp16 training needs a GPU; this machine has none", "train.precision",
                         "use train.precision=bf16 or fp32 on CPU")
    _, raw = select_ds_config(recipe, cfg, world_size)
    resolved = resolve_auto_values(raw, recipe, world_size=world_size, hidden_size=cfg.hidden_size)
    try:
        load_data(recipe, cfg.vocab_size)
    except DataError as err:
        raise UsageError(str(err)) from None  # DataError already says where: file:line or the field
    return resolved
