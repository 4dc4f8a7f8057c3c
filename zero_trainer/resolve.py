"""resolve: recipe + world size -> everything a run needs, checked. One function, called twice on one path:

by `zero-trainer train` before it launches anything (so bad input is one line, and the data cache is warm), and by
every rank before `deepspeed.initialize` (so the ranks train exactly what the launcher checked).

Cheapest first, so most mistakes fail in seconds: the DeepSpeed JSON (and, for `auto`, the plan that picks it),
precision, the JSON through DeepSpeed's own parser, the directories the run will write, the model, NVMe room, the
data, then the checkpoint to resume from. Creates nothing: no output dir, no nvme dir; only the data cache fills.
"""

import contextlib
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from datasets.exceptions import DatasetGenerationError

from . import checkpoint
from .data import DataError, PreparedData, prepare_data
from .ds_config import (
    ds_config_path,
    fill_sized,
    load_ds_config,
    nvme_bytes_needed,
    resolve_auto_values,
    uses_nvme,
    validate_ds_config,
    with_leaf_modules,
    with_model_parallel,
    zero_stage,
)
from .errors import UsageError
from .hardware import filesystem_type, free_bytes, unwritable_reason
from .lora import check as check_lora
from .lora import check_parallel as check_lora_parallel
from .metrics import check_reporters
from .model import model_config, param_sizes, supports_checkpointing
from .parallelize import check_parallel
from .pipeline import check_pipeline
from .plan import Plan, plan_recipe
from .probe import load_cached
from .recipe import Recipe


@dataclass
class Resolved:
    recipe: Recipe
    world_size: int
    model_cfg: object  # a transformers PretrainedConfig
    params: int  # unique parameters
    ds_name: str  # the ds_configs name (or JSON file stem) the run uses
    ds_config: dict  # every "auto" filled: ready for deepspeed.initialize
    plan: Plan  # the planner's decision: the rung (chosen by auto, or named), AC, sized knobs, predicted peak
    activation_checkpointing: bool  # the recipe's, or the plan's when auto needs it to fit
    resume_from: Path | None  # the complete checkpoint to continue from
    universal: bool  # that checkpoint is at another world size or stage: load through DeepSpeed's universal format
    data: PreparedData
    pretrained: dict | None = None  # model.pretrained: {"path", "fingerprint", "dtype"} of the checked checkpoint

    @property
    def zero_stage(self) -> int:
        return zero_stage(self.ds_config)


def resolve(recipe: Recipe, world_size: int, resume: bool = False) -> Resolved:
    """Everything a run needs, or a UsageError naming the first bad input (see the module docstring)."""
    train = recipe.train
    auto = recipe.deepspeed.config == "auto"
    model_cfg = build_config(recipe)
    can_checkpoint = supports_checkpointing(model_cfg)
    if train.activation_checkpointing and not can_checkpoint:
        raise UsageError(f"train.activation_checkpointing is on, but {type(model_cfg).__name__.removesuffix('Config')} "
                         "models cannot recompute activations (transformers: supports_gradient_checkpointing is "
                         "False)", "train.activation_checkpointing",
                         "set train.activation_checkpointing=false, or use a model type that supports it")
    trainable = check_lora(recipe, model_cfg)  # the adapters' parameters (None: every weight trains)
    probe = load_cached()  # this machine's rates, for the step time the run reports beside its own (never measured)
    plan = plan_recipe(recipe, model_cfg, world_size, can_checkpoint=can_checkpoint,
                       trainable=trainable, probe=probe) if auto else None
    if plan is not None:  # auto may split the sequence (sp) or tile the loss/MLP to fit
        recipe = with_planned_parallel(recipe, plan)
    name = plan.chosen.name if plan else recipe.deepspeed.config
    ds_name, raw = load_ds_config(name)
    if train.precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("fp16 training needs a GPU; this machine has none", "train.precision",
                             "use train.precision=bf16 or fp32 on CPU")
    check_parallel(recipe, model_cfg, world_size)
    dp = world_size // recipe.parallel.model_parallel  # the batch is counted over data-parallel ranks only
    validate_ds_config(raw, recipe, world_size=dp, source=ds_config_path(name))
    check_reporters(train.reporters)
    _check_run_dirs(recipe, raw)
    positions = getattr(model_cfg, "max_position_embeddings", None)
    if positions and recipe.data.seq_len > positions:
        raise UsageError(f"data.seq_len {recipe.data.seq_len} exceeds the model's max_position_embeddings "
                         f"{positions}", "data.seq_len", f"use data.seq_len <= {positions}")
    sizes = param_sizes(model_cfg)
    source = check_pretrained(recipe, model_cfg)
    _check_nvme(recipe, raw, sum(sizes))
    if plan is None:  # a named JSON: its "auto" knobs sized, the whole judged against the hardware
        plan = plan_recipe(recipe, model_cfg, world_size, ds=(name, raw), can_checkpoint=can_checkpoint,
                           trainable=trainable, probe=probe)
    recipe = with_planned_parallel(recipe, plan)
    check_lora_parallel(recipe)  # auto may have chosen sequence parallelism
    ds_config = resolve_auto_values(raw, recipe, world_size=dp, hidden_size=model_cfg.hidden_size,
                                    output_dir=recipe.output_dir, params=sum(sizes))
    ds_config, _ = fill_sized(ds_config, plan.sized)
    ds_config = with_model_parallel(ds_config, recipe.parallel.tp, recipe.parallel.sp,
                                    llama_names=model_cfg.model_type in ("zero_lm", "llama"))
    ds_config = check_experts(recipe, model_cfg, world_size, ds_config)
    check_pipeline(recipe, ds_config)
    data = load_data(recipe, model_cfg.vocab_size)
    resume_from = checkpoint.check_resume(recipe, model_cfg, resume)
    universal = False
    if resume_from is not None:
        checkpoint.check_same_source(resume_from, recipe, source)
        checkpoint.check_stage_change(resume_from, zero_stage(ds_config))
        checkpoint.check_tensor_parallel_change(resume_from, recipe.parallel.tp, world_size)
        checkpoint.check_expert_parallel_change(resume_from, recipe.parallel.ep, world_size)
        universal = checkpoint.needs_universal(checkpoint.read_state(resume_from), world_size, zero_stage(ds_config),
                                               recipe.parallel.pp)
    return Resolved(recipe, world_size, model_cfg, sum(sizes), ds_name, ds_config, plan,
                    bool(train.activation_checkpointing or plan.activation_checkpointing),
                    resume_from, universal, data, source)


def with_planned_parallel(recipe: Recipe, plan: Plan) -> Recipe:
    """The recipe with what the plan added to its `parallel:` section: a sequence- or pipeline-parallel degree (auto
    only) and tiling, each needed to fit. The run trains this recipe, and its checkpoints record it."""
    p = recipe.parallel
    planned = dataclasses.replace(p, sp=plan.sequence_parallel, pp=plan.pipeline_parallel,
                                  tiled_mlp=p.tiled_mlp or plan.tiled_mlp, tiled_loss=p.tiled_loss or plan.tiled_loss)
    return recipe if planned == p else dataclasses.replace(recipe, parallel=planned)


def check_experts(recipe: Recipe, model_cfg, world_size: int, ds_config: dict) -> dict:
    """parallel.ep against the model, the world size and the ZeRO stage; at ZeRO-3 a MoE block becomes a leaf
    module. Returns the DeepSpeed config to run."""
    from .model import SparseMoeBlock

    ep, stage, experts = recipe.parallel.ep, zero_stage(ds_config), getattr(model_cfg, "num_local_experts", 0)
    if ep > 1 and not experts:
        raise UsageError(f"parallel.ep={ep} splits experts, but {recipe.model_source} is a dense model", "parallel.ep",
                         "use parallel.ep=1, or a MoE model (e.g. model.preset=debug-moe)")
    if experts % ep:
        raise UsageError(f"parallel.ep={ep} does not divide the model's {experts} experts", "parallel.ep",
                         f"use an ep that divides {experts}")
    if world_size % ep:
        raise UsageError(f"parallel.ep={ep} does not divide the world size {world_size}", "parallel.ep",
                         f"use an ep that divides {world_size}, or launch a multiple of {ep} ranks")
    if ep > 1 and stage not in (1, 2):
        why = ("DeepSpeed refuses its native MoE layers under ZeRO-3" if stage == 3 else
               "expert parallelism is tested here on ZeRO-1/2 only")
        raise UsageError(f"parallel.ep={ep} needs ZeRO stage 1 or 2, not {stage}: {why}", "parallel.ep",
                         "use --ds-config zero1 or zero2 for ep > 1, or parallel.ep=1 (ZeRO-3 trains the MoE as a "
                         "leaf module, experts replicated)")
    if experts:
        ds_config = with_leaf_modules(ds_config, [f"{SparseMoeBlock.__module__}.{SparseMoeBlock.__qualname__}"])
    return ds_config


def build_config(recipe: Recipe):
    """The recipe's model config (a preset, a local config.json of a causal decoder, or a pretrained model's), or a
    UsageError."""
    if recipe.model.pretrained is not None:
        from .pretrained import weight_files

        weight_files(recipe.model.pretrained)  # a directory with config.json and safetensors, or one line
    try:
        return model_config(recipe.model_source)
    except (ValueError, OSError, TypeError) as err:
        raise UsageError(str(err).splitlines()[0], recipe.model_field,
                         "use a preset name or a local config.json of a causal decoder LM") from None


def check_pretrained(recipe: Recipe, model_cfg) -> dict | None:
    """model.pretrained: its safetensors headers against the model its config builds (pretrained.preflight), and a
    tokenizer to read the data with. Returns what identifies the checkpoint (recorded in every checkpoint)."""
    path = recipe.model.pretrained
    if path is None:
        return None
    from .pretrained import fingerprint, has_tokenizer, preflight, source_dtype

    index = preflight(path, model_cfg)
    if recipe.data.tokenizer is None and not has_tokenizer(path):
        raise UsageError(f"model.pretrained {path} has no tokenizer (tokenizer.json), and data.tokenizer is unset",
                         "data.tokenizer", "set data.tokenizer to the tokenizer these weights were trained with")
    return {"path": str(Path(path).resolve()), "fingerprint": fingerprint(index), "dtype": source_dtype(index)}


def load_data(recipe: Recipe, vocab_size: int) -> PreparedData:
    """The recipe's corpus, tokenized and packed (cached on disk; the first caller builds, others wait)."""
    data = recipe.data
    try:
        # Progress bars and library chatter go to stdout: on failure stderr holds the one error line.
        with contextlib.redirect_stderr(sys.stdout):
            return prepare_data({**{k: getattr(data, k) for k in ("path", "eval_fraction", "max_documents", "format",
                                                                  "chat_template", "train_on_prompt", "packing")},
                                 "tokenizer": recipe.tokenizer_path},
                                vocab_size=vocab_size, seq_len=data.seq_len, seed=recipe.train.seed,
                                cache_dir=recipe.cache_dir)
    except DataError as err:
        raise UsageError(" ".join(str(err).split())) from None  # DataError already says where: file:line or field
    except (OSError, ValueError, DatasetGenerationError) as err:  # a reader's own error on a malformed file
        raise UsageError(f"cannot read the data: {' '.join(str(err).split())}", f"data.path={data.path}",
                         "check that data.path holds .jsonl/.parquet/.txt files or a saved dataset") from None


def _check_run_dirs(recipe: Recipe, ds: dict) -> None:
    if reason := unwritable_reason(recipe.output_dir):
        raise UsageError(f"output_dir cannot be written: {reason}", "output_dir",
                         "choose a writable directory with --output-dir or output_dir=...")
    if uses_nvme(ds) and (reason := unwritable_reason(recipe.nvme_path)):
        raise UsageError(f"nvme_path cannot be written: {reason}", "deepspeed.nvme_path",
                         "point --nvme-path at a writable directory on a local disk")


def _check_nvme(recipe: Recipe, ds: dict, params: int) -> None:
    if not uses_nvme(ds):
        return
    from .ops import libaio_available

    needed, path = nvme_bytes_needed(ds, params, recipe.train.precision), recipe.nvme_path
    if (fs := filesystem_type(path)) in ("tmpfs", "ramfs"):
        raise UsageError(f"nvme_path {path} is on {fs}, which lives in RAM: swapping there spends the memory NVMe "
                         "offload is meant to save", "deepspeed.nvme_path",
                         "point --nvme-path at a directory on a local disk (not /dev/shm or a tmpfs /tmp)")
    free = free_bytes(path)
    if needed > free:
        raise UsageError(f"nvme_path {path} has {free / 2**30:.1f} GiB free; NVMe offload of this "
                         f"{params / 1e9:.2f}B-parameter model needs about {needed / 2**30:.1f} GiB",
                         "deepspeed.nvme_path", "point --nvme-path at a disk with enough room, or use a smaller "
                         "model or CPU offload (zero3_offload)")
    if not libaio_available():
        raise UsageError("NVMe offload needs DeepSpeed's async_io op, which cannot be built here (libaio not found)",
                         "deepspeed.config", "apt-get install -y libaio-dev, or use CPU offload (zero3_offload)")
