"""Everything zero_trainer knows about DeepSpeed JSON: finding it, filling "auto", checking combinations.

Nobody else edits config dicts. The "auto" convention is HF Trainer's (transformers/integrations/deepspeed.py):
an "auto" value is filled from the recipe; an explicit value that contradicts the recipe is an error listing
every mismatch. The shipped files use "auto" only where HF Trainer and accelerate fill it too (batch, lr, weight
decay, clipping, schedule, precision, bucket sizes), so each works unchanged in `TrainingArguments(deepspeed=path)`
and `accelerate launch --deepspeed_config_file path`. What they leave out is zero_trainer's to fill: Adam's betas and
eps from the recipe, and the memory knobs (SIZED_KEYS) as the planner sizes them; a number written there stays.

`validate_ds_config` checks a JSON with DeepSpeed's own parser (its pydantic models, and which keys it actually
reads) rather than a list of ours; resolve.py calls it before any process starts and again in every rank.
"""

import copy
import difflib
import json
import os
import sys
import typing
from pathlib import Path

from .errors import UsageError, did_you_mean
from .recipe import Recipe, nvme_path_for
from .shipped import DS_CONFIG_DIR

# Used when a user's JSON has no optimizer/scheduler block: the same ones the shipped files carry.
DEFAULT_OPTIMIZER = {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}}
# Optimizers whose betas and eps the recipe gives when the JSON leaves them out (accelerate refuses them as "auto").
_ADAM_TYPES = {"adam", "adamw", "fusedadam", "cpuadam", "onebitadam", "zerooneadam", "lamb", "onebitlamb"}
DEFAULT_SCHEDULER = {"type": "WarmupCosineLR",
                     "params": {"total_num_steps": "auto", "warmup_num_steps": "auto", "warmup_min_ratio": 0.0,
                                "cos_min_ratio": 0.1, "warmup_type": "linear"}}


def available_ds_configs() -> list[str]:
    return sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))


def ds_config_path(name_or_path: str) -> Path:
    """The JSON file behind a ds_configs/ name without `.json` (`zero3_offload`) or a path."""
    if name_or_path.endswith(".json") or os.sep in name_or_path:
        return Path(name_or_path)
    return DS_CONFIG_DIR / f"{name_or_path}.json"


def load_ds_config(name_or_path: str) -> tuple[str, dict]:
    """A ds_configs/ name without `.json` (`zero3_offload`) or a path. Returns (name, config dict)."""
    path = ds_config_path(name_or_path)
    if not (name_or_path.endswith(".json") or os.sep in name_or_path) and not path.is_file():
        raise UsageError(f"unknown ds_config '{name_or_path}'", "deepspeed.config",
                         did_you_mean(name_or_path, available_ds_configs() + ["auto"]) +
                         " (or give a path to a JSON file)")
    if not path.is_file():
        raise UsageError(f"ds_config file '{name_or_path}' not found", "deepspeed.config",
                         "give an existing JSON path or a name from ds_configs/")
    try:
        config = json.loads(path.read_text(), object_pairs_hook=_refuse_duplicate_keys)
    except json.JSONDecodeError as err:
        raise UsageError(f"ds_config is not valid JSON: {err.msg}", f"{path}:{err.lineno}:{err.colno}",
                         "fix the JSON at that position") from None
    except _DuplicateKey as dup:
        raise UsageError(f"ds_config has the key '{dup.key}' twice in one object", str(path),
                         "keep one of them (JSON silently keeps the last; DeepSpeed's own loader refuses it)") from None
    except UnicodeDecodeError as err:
        raise UsageError(f"ds_config is not UTF-8 text (byte {err.start})", str(path),
                         "save the file as UTF-8 JSON") from None
    if not isinstance(config, dict):
        raise UsageError("ds_config must be a JSON object", str(path), "wrap the settings in { ... }")
    return path.stem, with_long_names(config, path)


# DeepSpeed's pydantic aliases in zero_optimization (DeepSpeedZeroConfig: field name -> alias): one setting, two
# names. zero_trainer reads, fills and sizes the stage3_ names (the ones DeepSpeed's docs use); a JSON written with
# the short names (Axolotl's) is read as if it used the long ones, and written back that way. test_ds_config checks
# this list against DeepSpeed's model.
ZERO_ALIASES = {
    "prefetch_bucket_size": "stage3_prefetch_bucket_size",
    "param_persistence_threshold": "stage3_param_persistence_threshold",
    "model_persistence_threshold": "stage3_model_persistence_threshold",
    "max_live_parameters": "stage3_max_live_parameters",
    "max_reuse_distance": "stage3_max_reuse_distance",
    "gather_16bit_weights_on_model_save": "stage3_gather_16bit_weights_on_model_save",
    "module_granularity_threshold": "stage3_module_granularity_threshold",
    "use_all_reduce_for_fetch_params": "stage3_use_all_reduce_for_fetch_params",
    "allgather_sequential": "stage3_allgather_sequential",
}


def with_long_names(config: dict, source) -> dict:
    """`config` with every short alias in zero_optimization renamed to its stage3_ name, in place of it (the order of
    keys kept); both names of one setting is an error: DeepSpeed's parser would fail on it with a traceback."""
    zero = config.get("zero_optimization")
    if not isinstance(zero, dict) or not any(k in zero for k in ZERO_ALIASES):
        return config
    for short, long in ZERO_ALIASES.items():
        if short in zero and long in zero:
            raise UsageError(f"zero_optimization has both '{short}' and '{long}', which are one DeepSpeed setting",
                             str(source), f"keep one of them ({short} is DeepSpeed's alias of {long})")
    renamed = {ZERO_ALIASES.get(k, k): v for k, v in zero.items()}
    return {**config, "zero_optimization": renamed}


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _refuse_duplicate_keys(pairs: list) -> dict:
    keys = [key for key, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise _DuplicateKey(key)
    return dict(pairs)


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
        self.config, self.mismatches, self.keys = config, [], []

    def fill(self, dotted: str, value, recipe_field: str, must_match: bool = True):
        self.keys.append(dotted)
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


# "auto" values filled from the model once it is known (resolve_auto_values); the recipe fills the others.
MODEL_AUTO_KEYS = ("zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
                   "zero_optimization.stage3_param_persistence_threshold")


# Memory knobs a JSON may leave "auto" or out: the planner sizes them for the model and the hardware (plan.size_knobs).
SIZED_KEYS = tuple("zero_optimization." + k for k in (
    "sub_group_size", "stage3_max_live_parameters", "stage3_max_reuse_distance", "offload_optimizer.buffer_count",
    "offload_optimizer.pin_memory", "offload_param.buffer_count", "offload_param.buffer_size",
    "offload_param.max_in_cpu", "offload_param.pin_memory")) + ("aio.intra_op_parallelism",)


def fill_sized(ds: dict, values: dict) -> tuple[dict, dict]:
    """A copy of `ds` with each memory knob that is "auto" or absent set to its value in `values` (dotted path ->
    value, only the knobs that apply on this rung); returns it and what was set.

    A number already there stays (the user's choice wins; plan.check_knobs judges it). An "auto" the planner
    has no value for (a knob that does not apply on this rung) is removed, so DeepSpeed uses its default."""
    ds = copy.deepcopy(ds)
    filled = {}
    for dotted in SIZED_KEYS:
        *parents, leaf = dotted.split(".")
        node = ds
        for part in parents:
            if not isinstance(node, dict):
                break
            if dotted in values and part not in node:
                node[part] = {}
            node = node.get(part)
        if not isinstance(node, dict) or node.get(leaf, "auto") != "auto":
            continue
        if dotted in values:
            node[leaf] = filled[dotted] = values[dotted]
        else:
            node.pop(leaf, None)
    return ds, filled


def for_hf_tools(raw: dict, resolved: dict, sized: dict) -> dict:
    """`raw` as HF Trainer and accelerate take it unchanged: its memory knobs set as sized, its bucket sizes the
    numbers `resolved` (the config as zero_trainer runs it) has. "auto" stays only where both tools fill it: batch,
    learning rate and schedule, weight decay, clipping, precision."""
    config, _ = fill_sized(raw, sized)
    for dotted in MODEL_AUTO_KEYS:
        *parents, leaf = dotted.split(".")
        node, source = config, resolved
        for part in parents:
            node, source = node.get(part) or {}, source.get(part) or {}
        if node.get(leaf) == "auto" and leaf in source:
            node[leaf] = source[leaf]
    return config


def set_nvme_path(ds: dict, path: str) -> None:
    """Point every NVMe offload block of `ds` (in place) at `path`, made absolute."""
    for what in ("optimizer", "param"):
        block = (ds.get("zero_optimization") or {}).get(f"offload_{what}")
        if isinstance(block, dict) and block.get("device") == "nvme":
            block["nvme_path"] = str(Path(path).resolve())


def fill_from_recipe(ds: dict, recipe: Recipe, *, world_size: int) -> tuple[dict, list[str]]:
    """A copy of `ds` with the recipe's "auto" values filled, and the explicit values that contradict it.

    Bucket sizes (from the model's hidden size) stay "auto": DeepSpeed's own parser drops a top-level "auto" in
    its pydantic blocks, so this half is enough to validate a config before the model is known.
    """
    f = _recipe_filler(ds, recipe, world_size)
    return f.config, f.mismatches


def _recipe_filler(ds: dict, recipe: Recipe, world_size: int) -> _Filler:
    ds = copy.deepcopy(ds)
    train = recipe.train
    ds.setdefault("optimizer", copy.deepcopy(DEFAULT_OPTIMIZER))
    optimizer = ds["optimizer"] if isinstance(ds["optimizer"], dict) else {}
    if str(optimizer.get("type", "")).lower().replace("_", "") in _ADAM_TYPES and isinstance(
            optimizer.get("params", {}), dict):
        for key in ("betas", "eps"):
            optimizer.setdefault("params", {}).setdefault(key, "auto")
    ds.setdefault("scheduler", copy.deepcopy(DEFAULT_SCHEDULER))
    precision = train.precision
    ds.setdefault("bf16", {"enabled": "auto"})
    ds.setdefault("fp16", {"enabled": "auto"})
    f = _Filler(ds)
    micro, accum = train.micro_batch, train.grad_accum
    f.fill("train_micro_batch_size_per_gpu", micro, "train.micro_batch")
    f.fill("gradient_accumulation_steps", accum, "train.grad_accum")
    f.fill("train_batch_size", micro * accum * world_size, "train.micro_batch*train.grad_accum*world_size")
    f.fill("gradient_clipping", train.grad_clip, "train.grad_clip")
    f.fill("optimizer.params.lr", train.lr, "train.lr")
    f.fill("optimizer.params.betas", list(train.betas), "train.betas")
    f.fill("optimizer.params.eps", train.eps, "train.eps")
    f.fill("optimizer.params.weight_decay", train.weight_decay, "train.weight_decay")
    f.fill("scheduler.params.total_num_steps", train.max_steps, "train.max_steps")
    # DeepSpeed >= 0.19.6 rejects warmup_num_steps <= 0 (HF clamps the same way).
    f.fill("scheduler.params.warmup_num_steps", max(1, train.warmup_steps), "train.warmup_steps")
    f.fill("scheduler.params.warmup_max_lr", train.lr, "train.lr")
    f.fill("scheduler.params.warmup_min_lr", 0, "train.lr", must_match=False)
    f.fill("fp16.enabled", precision == "fp16", "train.precision")
    f.fill("bf16.enabled", precision == "bf16", "train.precision")
    return f


# A gradient bucket never smaller than this many elements (when the model has that many): each bucket costs one
# collective plus DeepSpeed's per-bucket bookkeeping (~0.5 ms here), so HF's h² buckets for a small hidden size
# (h=128: 16k elements, ~36 all-reduces a step for a 1M model) spend a third of a CPU step on it (bench/hf_trainer.py:
# the debug model trains 30-40% faster with one bucket). From h = 1000 up, h² is larger and is used as HF does.
MIN_REDUCE_BUCKET = 1_000_000


def resolve_auto_values(ds: dict, recipe: Recipe, *, world_size: int, hidden_size: int,
                        output_dir: str | None = None, params: int = 0) -> dict:
    """A copy of `ds` with every "auto" filled from the recipe, ready for deepspeed.initialize. `params` (the
    model's parameter count, when known) caps the reduce bucket's floor at the model's size."""
    ds, mismatches = fill_from_recipe(ds, recipe, world_size=world_size)
    if mismatches:
        raise UsageError("ds_config contradicts the recipe: " + "; ".join(mismatches), "deepspeed.config",
                         'set these DeepSpeed values to "auto" or change the recipe to match')
    f = _Filler(ds)
    # Bucket sizes scale with the hidden size, as HF's trainer_config_finalize sets them; the reduce bucket with a
    # floor (MIN_REDUCE_BUCKET, or the whole model when smaller).
    floor = min(MIN_REDUCE_BUCKET, params) if params else MIN_REDUCE_BUCKET
    f.fill("zero_optimization.reduce_bucket_size", max(hidden_size * hidden_size, floor), "model.hidden_size",
           must_match=False)
    f.fill("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size),
           "model.hidden_size", must_match=False)
    f.fill("zero_optimization.stage3_param_persistence_threshold", 10 * hidden_size, "model.hidden_size",
           must_match=False)

    swap = nvme_path_for(output_dir, recipe.deepspeed.nvme_path) if output_dir else recipe.deepspeed.nvme_path
    if swap:
        set_nvme_path(ds, swap)

    if output_dir:
        ds["csv_monitor"] = {"enabled": True, "output_path": str(Path(output_dir).resolve() / "monitor"),
                             "job_name": "ds"}
    return ds


def with_model_parallel(ds: dict, tp: int, sp: int, llama_names: bool) -> dict:
    """A copy of a resolved config for tp × sp model parallelism. tp > 1 adds the AutoTP block
    (deepspeed.initialize then shards the projections; llama_names: the model uses Llama's module names, which
    DeepSpeed's `llama` preset matches, else its generic parser decides). train_batch_size goes: the batch was
    checked against the data-parallel size already, and DeepSpeed derives it from micro batch x accumulation x
    its own data-parallel count, where zero.Init, which sees no mpu, would count every rank."""
    if tp == 1 and sp == 1:
        return ds
    ds = copy.deepcopy(ds)
    ds.pop("train_batch_size", None)
    if tp > 1:
        ds["tensor_parallel"] = {"autotp_size": tp, **({"preset_model": "llama"} if llama_names else {})}
    return ds


# ---------------------------------------------------------------------------------------------------------
# validation: everything that can be checked before a process is launched

# Read by deepspeed.initialize from the raw dict, outside DeepSpeedConfig's parser.
_READ_BY_INITIALIZE = {"data_parallel_size", "sequence_parallel_size"}
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


class _Reads:
    """Which keys DeepSpeed's parser asked for, per block (a tuple path); None marks a block read whole."""

    def __init__(self):
        self.by_block: dict[tuple, set | None] = {}
        self.last_top_level: str | None = None


class _ReadLog(dict):
    """A config dict that notes which keys DeepSpeed's parser looks up by name.

    DeepSpeed silently ignores a key it never reads: a misspelt `gradient_clippin` trains without clipping,
    `aio.thread_count` (renamed) does nothing. Parsing a copy wrapped in _ReadLog tells, block by block, which
    keys DeepSpeed itself reads. A block the parser iterates or hands on whole (to a pydantic model, to the
    optimizer) is left alone: pydantic forbids unknown keys itself, optimizer params belong to torch.
    """

    def __init__(self, data: dict, reads: _Reads, path: tuple = ()):
        super().__init__({k: _ReadLog(v, reads, path + (k,)) if isinstance(v, dict) else v for k, v in data.items()})
        self._reads, self._path = reads, path
        reads.by_block[path] = set()

    def _read(self, key):
        if not self._path:
            self._reads.last_top_level = key
        names = self._reads.by_block[self._path]
        if names is not None:
            names.add(key)

    def _read_whole(self):
        self._reads.by_block[self._path] = None

    def get(self, key, default=None):
        self._read(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self._read(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self._read(key)
        return super().__contains__(key)

    def keys(self):
        return _ReadLogKeys(self)

    def __iter__(self):
        self._read_whole()
        return super().__iter__()

    def items(self):
        self._read_whole()
        return super().items()

    def values(self):
        self._read_whole()
        return super().values()

    def __copy__(self):
        self._read_whole()
        return dict(super().items())


class _ReadLogKeys:
    """`key in d.keys()` is a read by name; iterating the keys reads the block whole."""

    def __init__(self, owner: _ReadLog):
        self._owner = owner

    def __contains__(self, key):
        return key in self._owner

    def __iter__(self):
        return iter(self._owner)

    def __len__(self):
        return len(self._owner)


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _unknown_key_fix(key: str, known) -> str:
    return did_you_mean(key, known, "remove it, or check the name in https://www.deepspeed.ai/docs/config-json/")


def _node(ds: dict, path: tuple):
    for part in path:
        ds = ds.get(part) if isinstance(ds, dict) else None
    return ds


def _pydantic_keys(model_name: str, loc: tuple) -> set[str]:
    """Field names and aliases of the DeepSpeed pydantic model at `loc` inside the model named model_name."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel
    from pydantic import BaseModel

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    def model_in(annotation):
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return annotation
        return next((m for m in map(model_in, typing.get_args(annotation)) if m), None)

    model = next((c for c in subclasses(DeepSpeedConfigModel) if c.__name__ == model_name), None)
    for part in loc:
        field = model and next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
        model = model_in(field.annotation) if field else None
    if model is None:
        return set()
    return {name for n, f in model.model_fields.items() for name in (n, f.alias) if name}


def _pydantic_error(err, ds: dict, reads: _Reads, source) -> UsageError:
    errors = err.errors()
    first, more = errors[0], f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    loc = tuple(str(part) for part in first["loc"])
    # The model's loc is relative to its block: find the block (the one being parsed, usually). An empty loc is
    # a whole-block check (a model validator) of the block being parsed.
    prefixes = [(), (reads.last_top_level,)] + [(k,) for k, v in ds.items() if isinstance(v, dict)]
    prefix = next((p for p in prefixes if loc and isinstance(_node(ds, p + loc[:-1]), dict)
                   and loc[-1] in _node(ds, p + loc[:-1])), () if loc else (reads.last_top_level,))
    dotted = ".".join(prefix + loc)
    if not loc:
        return UsageError(f"DeepSpeed rejects the '{dotted}' block{more}", str(source), _one_line(first["msg"]))
    if first["type"] == "extra_forbidden":
        return UsageError(f"unknown DeepSpeed config key '{dotted}'{more}", str(source),
                          _unknown_key_fix(loc[-1], _pydantic_keys(err.title, loc[:-1])))
    return UsageError(f"DeepSpeed rejects {dotted} = {first.get('input')!r}{more}", str(source),
                      f"give a value DeepSpeed accepts ({_one_line(first['msg'])})")


def _deepspeed_parse(ds: dict, world_size: int, source):
    """DeepSpeed's own parse of `ds` (DeepSpeedConfig.__init__ minus its probe of torch.distributed, which
    does not exist yet in the launcher): returns the parsed config and which keys it read."""
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = DeepSpeedConfig.__new__(DeepSpeedConfig)
    cfg.global_rank, cfg.world_size, cfg._param_dict = 0, world_size, ds
    reads = _Reads()
    try:
        cfg._initialize_params(_ReadLog(ds, reads))
    except pydantic.ValidationError as err:
        raise _pydantic_error(err, ds, reads, source) from None
    except Exception as err:  # DeepSpeed's asserts and getters on a malformed block: one line, not a traceback
        raise UsageError(f"DeepSpeed cannot parse this config: {_one_line(err) or type(err).__name__}",
                         str(source), "compare the block with https://www.deepspeed.ai/docs/config-json/") from None
    return cfg, reads


def _check_removed_keys(ds: dict, source) -> None:
    from deepspeed.runtime import config as ds_runtime_config

    removed = [((key,), msg) for key, msg in getattr(ds_runtime_config, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {}).items()]
    removed += [(("zero_optimization", key), msg)
                for key, msg in getattr(ds_runtime_config, "_REMOVED_ZERO_CONFIG_KEYS", {}).items()]
    for path, message in removed:
        parent = _node(ds, path[:-1])
        if isinstance(parent, dict) and path[-1] in parent:
            import deepspeed

            raise UsageError(f"DeepSpeed {deepspeed.__version__} no longer supports '{'.'.join(path)}'", str(source),
                             "remove it: " + _one_line(message.split(" See http")[0]))


# How close an unread key must be to one DeepSpeed reads to count as its misspelling (an error) rather than a key
# DeepSpeed simply ignores (a warning): gradient_clippin -> gradient_clipping is 0.97, LLaMA-Factory's comms_config ->
# comms_logger 0.67.
MISSPELLING_CUTOFF = 0.8


def _check_unread_keys(ds: dict, reads: _Reads, source) -> list[str]:
    """A key DeepSpeed never reads: an error when it is the misspelling of one it does read (it would silently not
    apply), else a warning (returned): peers' JSONs carry keys other versions or tools read (comms_config)."""
    warnings = []
    for path, names in reads.by_block.items():
        if names is None or (path and not names):
            continue  # read whole (pydantic checked it), or never asked by name (passed on as it is)
        known = names | _READ_BY_INITIALIZE if not path else names
        for key in _node(ds, path):
            if key in known:
                continue
            dotted = ".".join(path + (key,))
            if difflib.get_close_matches(key, sorted(known), n=1, cutoff=MISSPELLING_CUTOFF):
                raise UsageError(f"unknown DeepSpeed config key '{dotted}' (DeepSpeed would ignore it)",
                                 str(source), _unknown_key_fix(key, known))
            warnings.append(f"warning: DeepSpeed {_deepspeed_version()} ignores '{dotted}' ({source}): it has no "
                            "effect here; remove it to silence this")
    return warnings


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__


def warn(lines: list[str]) -> None:
    """Print warnings once per run: in `zero-trainer train`'s preflight, or on rank 0 when no preflight ran."""
    rank = os.environ.get("RANK")
    if rank is None or (rank == "0" and not os.environ.get("ZERO_TRAINER_PREFLIGHT")):
        for line in dict.fromkeys(lines):
            print(line, file=sys.stderr, flush=True)


def _check_offload(ds: dict, source) -> None:
    """Combinations DeepSpeed accepts without a word (or refuses only inside a rank) but does not honour."""
    zero = ds.get("zero_optimization")
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if not isinstance(stage, int) or isinstance(stage, bool):
        return  # no ZeRO block, or a stage DeepSpeed's parser will name
    opt, param = zero.get("offload_optimizer") or {}, zero.get("offload_param") or {}
    if not isinstance(opt, dict) or not isinstance(param, dict):
        return
    where = f"zero_optimization in {source}"
    if stage < 3 and param.get("device", "none") != "none":
        raise UsageError(f"offload_param is ignored at ZeRO stage {stage}", where,
                         "parameters are offloaded only at stage 3: set zero_optimization.stage to 3 "
                         "(e.g. --ds-config zero3_offload) or remove offload_param")
    if stage < 3 and opt.get("device") == "nvme":
        raise UsageError(f"NVMe optimizer offload is ignored at ZeRO stage {stage} (nothing is written to NVMe)",
                         where, "DeepSpeed swaps optimizer state to NVMe only at stage 3: use stage 3 "
                         "(e.g. --ds-config zero3_nvme) or offload_optimizer.device cpu")
    ratio = opt.get("ratio", 1.0)
    if stage < 3 and isinstance(ratio, (int, float)) and ratio < 1:
        raise UsageError(f"offload_optimizer.ratio {ratio} (partial offload) works only at ZeRO stage 3, "
                         f"not {stage}", where, "set zero_optimization.stage to 3 or remove ratio")
    if stage == 0 and opt.get("device", "none") != "none":
        raise UsageError("offload_optimizer is ignored at ZeRO stage 0", where,
                         "optimizer offload needs stage 1, 2 or 3 (e.g. --ds-config zero2_offload), "
                         "or remove offload_optimizer")


def _check_batch(raw: dict, cfg, mismatches: list[str], recipe: Recipe, world_size: int, source) -> None:
    explicit = {k: raw.get(k) for k in _BATCH_KEYS}
    if all(isinstance(v, int) and not isinstance(v, bool) for v in explicit.values()):
        tbs, micro, accum = explicit.values()
        if tbs != micro * accum * world_size:
            raise UsageError(f"train_batch_size {tbs} != train_micro_batch_size_per_gpu {micro} x "
                             f"gradient_accumulation_steps {accum} x world size {world_size}", str(source),
                             'make the three agree, or set them to "auto" to follow the recipe')
    if mismatches:
        raise UsageError("ds_config contradicts the recipe: " + "; ".join(mismatches), str(source),
                         'set these DeepSpeed values to "auto" or change the recipe to match')
    try:
        cfg._configure_train_batch_size()  # DeepSpeed derives a missing one from the other two
    except AssertionError as err:
        raise UsageError(f"DeepSpeed rejects the batch sizes: {_one_line(err)}", str(source),
                         'set ' + ", ".join(_BATCH_KEYS) + ' to "auto"') from None
    micro, accum = recipe.train.micro_batch, recipe.train.grad_accum
    derived = [(key, getattr(cfg, key), want, field) for key, want, field in (
        ("train_micro_batch_size_per_gpu", micro, "train.micro_batch"),
        ("gradient_accumulation_steps", accum, "train.grad_accum"),
        ("train_batch_size", micro * accum * world_size, "train.micro_batch*train.grad_accum*world_size"))]
    if wrong := [f"{key}={got} vs {field}={want}" for key, got, want, field in derived if got != want]:
        raise UsageError("DeepSpeed would derive batch sizes that contradict the recipe: " + "; ".join(wrong),
                         str(source), 'give all of ' + ", ".join(_BATCH_KEYS) + ' as "auto"')


def auto_keys(node, path=()):
    """The dotted path of every "auto" value left in a config."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from auto_keys(value, path + (key,))
    elif node == "auto":
        yield ".".join(path)


def _check_unfilled_autos(filled: dict, recipe_keys: list[str], source) -> None:
    """An "auto" nothing fills is silently dropped by DeepSpeed (a misspelt key set to "auto" vanishes) or
    reaches it as the string "auto"."""
    fillable = set(recipe_keys) | set(MODEL_AUTO_KEYS) | set(SIZED_KEYS)
    for dotted in auto_keys(filled):
        if dotted not in fillable:
            fix = did_you_mean(dotted, fillable, 'give a value; "auto" works only where HF Trainer fills it: '
                               + ", ".join(sorted(fillable)), cutoff=0.8)
            raise UsageError(f'"auto" at {dotted} is filled by nothing (DeepSpeed would drop it or choke on it)',
                             str(source), fix)


def _enabled(ds: dict, key: str) -> bool:
    block = ds.get(key)
    return isinstance(block, dict) and block.get("enabled") is True


def validate_ds_config(ds: dict, recipe: Recipe, *, world_size: int, source="deepspeed.config") -> dict:
    """Check a DeepSpeed JSON with DeepSpeed's own parser and against the recipe; returns it recipe-filled.

    Raises UsageError for: keys DeepSpeed removed, fp16 and bf16 both on, keys DeepSpeed rejects (pydantic
    blocks) or silently ignores (the rest), bad values, offload combinations that do nothing below stage 3,
    batch sizes that contradict each other or the recipe, and whatever DeepSpeed's own error check refuses.
    """
    _check_removed_keys(ds, source)
    if "bf16" in ds and "bfloat16" in ds:  # DeepSpeed reads bf16 and silently drops its legacy name
        raise UsageError("ds_config has both 'bf16' and 'bfloat16', which are one DeepSpeed setting", str(source),
                         "keep 'bf16' (bfloat16 is its legacy name; DeepSpeed ignores it when bf16 is there)")
    filler = _recipe_filler(ds, recipe, world_size)
    filled, mismatches = filler.config, filler.mismatches
    _check_unfilled_autos(filled, filler.keys, source)
    if _enabled(filled, "fp16") and (_enabled(filled, "bf16") or _enabled(filled, "bfloat16")):
        raise UsageError("fp16 and bf16 are both enabled", f"fp16.enabled, bf16.enabled in {source}",
                         'enable at most one, or set both to "auto" to follow train.precision')
    _check_offload(filled, source)
    cfg, reads = _deepspeed_parse(filled, world_size, source)
    warn(_check_unread_keys(filled, reads, source))
    _check_batch(ds, cfg, mismatches, recipe, world_size, source)
    try:
        cfg._do_error_check()
    except (AssertionError, ValueError) as err:
        raise UsageError(f"DeepSpeed rejects this config: {_one_line(err)}", str(source),
                         "change the setting it names") from None
    return filled


def uses_nvme(ds: dict) -> bool:
    return "nvme" in (offload_device(ds, "optimizer"), offload_device(ds, "param"))


def nvme_bytes_needed(ds: dict, params: int, precision: str) -> int:
    """What ZeRO-Infinity swaps to NVMe, summed over ranks: the optimizer (fp32 master weights, gradients,
    two Adam moments: 16 bytes a parameter) and the parameters themselves in the training dtype."""
    per_param = 16 if offload_device(ds, "optimizer") == "nvme" else 0
    per_param += (4 if precision == "fp32" else 2) if offload_device(ds, "param") == "nvme" else 0
    return params * per_param


def with_leaf_modules(ds: dict, class_paths: list[str]) -> dict:
    """A copy of a ZeRO-3 `ds` that treats these module classes (dotted paths) as leaf modules: ZeRO-3 gathers a leaf's
    weights once at its entry and hooks nothing inside it. A MoE block needs it: its experts see different token
    counts on different ranks, and per-submodule gathers then differ between ranks and hang (DeepSpeed issue 4808).
    DeepSpeed's own defaults (Mixtral's, Qwen-MoE's blocks) stay in the list."""
    if zero_stage(ds) != 3:
        return ds
    from deepspeed.runtime.zero.leaf_module_config import DEFAULT_LEAF_MODULE_CLASSES

    ds = copy.deepcopy(ds)
    leaf = ds["zero_optimization"].setdefault("leaf_module", {})
    leaf["classes"] = list(dict.fromkeys([*leaf.get("classes", DEFAULT_LEAF_MODULE_CLASSES), *class_paths]))
    return ds
