"""Recipes: YAML files of knobs, merged over defaults, with `KEY=VALUE` overrides by dotted path.

A recipe is data; `Recipe` is its type. The dataclasses below are the one list of fields, defaults and rules: a
field absent from them is a typo (in a YAML file, an override, or the code), and every value is checked so that
a mistake fails in the launcher process with one line, not minutes later inside a rank. The values derived from
a recipe (NVMe swap path, data cache, model source) are its properties, computed here only.
"""

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UsageError, did_you_mean
from .shipped import RECIPE_DIR

PRECISIONS = ("bf16", "fp16", "fp32")  # the one list: recipes, `plan --precision` and the planner read it
REPORTERS = ("tensorboard", "wandb")  # train.report_to, on top of metrics.csv (metrics.py writes them)

# rules: (types, check, hint); checks return True when the value is fine.
_pos_int = ((int,), lambda v: v >= 1, "a whole number >= 1")
_nonneg_int = ((int,), lambda v: v >= 0, "a whole number >= 0")
_pos_float = ((int, float), lambda v: v > 0, "a number > 0")
_nonneg_float = ((int, float), lambda v: v >= 0, "a number >= 0")
_opt_str = ((str, type(None)), lambda v: v is None or v.strip() != "", "a non-empty string or null")
_str = ((str,), lambda v: v.strip() != "", "a non-empty string")
_bool = ((bool,), lambda v: True, "true or false")
_opt_pos_int = ((int, type(None)), lambda v: v is None or v >= 1, "a whole number >= 1 or null")
_reporters = ((str, list), lambda v: all(isinstance(n, str) and n in (*REPORTERS, "none") for n in (
    [v] if isinstance(v, str) else v)), "one of " + ", ".join(REPORTERS) + ", a list of them, or none")
_opt_gib = ((int, float, type(None)), lambda v: v is None or v > 0, "a size in GiB > 0, or null (what the run detects)")


def _f(default, rule, doc: str = ""):
    """A recipe field: its default, its rule, and what it means (shown nowhere but here)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"rule": rule, "doc": doc})
    return field(default=default, metadata={"rule": rule, "doc": doc})


@dataclass
class ModelSection:
    preset: str | None = _f(None, _opt_str, "a preset name from zero_trainer/presets.py ...")
    config: str | None = _f(None, _opt_str, "... or a local HF config.json (or its dir) instead")
    pretrained: str | None = _f(None, _opt_str, "... or a local HF model dir (config.json + *.safetensors): its "
                                "weights, not a random init")


@dataclass
class DataSection:
    path: str | None = _f(None, _opt_str, "None: the Python standard library's sources (no download)")
    tokenizer: str | None = _f(None, _opt_str, "None: a byte-level BPE trained on the corpus, cached")
    seq_len: int = _f(256, _pos_int)
    eval_fraction: float = _f(0.05, ((int, float), lambda v: 0 < v < 1, "a fraction between 0 and 1 (exclusive)"))
    max_documents: int | None = _f(None, _opt_pos_int, "documents (text) or conversations (chat) to read at most")
    cache_dir: str | None = _f(None, _opt_str, "None: $ZERO_TRAINER_CACHE or ~/.cache/zero_trainer")
    format: str = _f("text", ((str,), lambda v: v in ("text", "chat"), "text or chat"),
                     "text: documents; chat: conversations (OpenAI, minimind, ShareGPT, Alpaca), assistants learned")
    chat_template: str | None = _f(None, _opt_str, "a .jinja file, or chatml; None: the tokenizer's chat_template")
    train_on_prompt: bool = _f(False, _bool, "chat: learn every token, not only the assistant's")
    packing: bool = _f(True, _bool, "several documents a row, each attending only to itself; false: one a row, padded")


@dataclass
class TrainSection:
    max_steps: int = _f(100, _pos_int)
    micro_batch: int = _f(8, _pos_int)
    grad_accum: int = _f(1, _pos_int)
    lr: float = _f(1.0e-3, _nonneg_float, "0 trains nothing: a load / save / export round trip")
    warmup_steps: int = _f(10, _nonneg_int)
    weight_decay: float = _f(0.1, _nonneg_float)
    betas: list = _f([0.9, 0.95], ((list,), lambda v: len(v) == 2 and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in v),
        "two numbers in [0, 1), e.g. [0.9, 0.95]"))
    eps: float = _f(1.0e-8, _pos_float)
    grad_clip: float = _f(1.0, _nonneg_float)
    precision: str = _f("bf16", ((str,), lambda v: v in PRECISIONS, "one of " + ", ".join(PRECISIONS)))
    activation_checkpointing: bool = _f(False, _bool)
    seed: int = _f(1234, _nonneg_int)
    log_every: int = _f(1, _pos_int)
    eval_every: int = _f(50, _nonneg_int)
    eval_batches: int = _f(4, _pos_int)
    sample_tokens: int = _f(24, _nonneg_int)
    save_every: int = _f(0, _nonneg_int)
    keep_last: int = _f(2, _pos_int)
    stop_at_step: int | None = _f(None, _opt_pos_int, "checkpoint and stop here without finishing the schedule")
    report_to: list = _f([], _reporters, "tensorboard / wandb (offline), or a list: beside metrics.csv, always written")

    @property
    def reporters(self) -> list[str]:
        names = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        return [n for n in dict.fromkeys(names) if n != "none"]


@dataclass
class DeepSpeedSection:
    config: str = _f("zero2", ((str,), lambda v: v.strip() != "", "a ds_configs name, a JSON path, or auto"),
                     "a ds_configs/ name, a path to a JSON file, or auto (the planner picks)")
    nvme_path: str | None = _f(None, _opt_str, "None: OUTPUT_DIR/nvme")


@dataclass
class ParallelSection:
    """Model parallelism inside the data-parallel ZeRO run: world size = dp x tp x sp x pp. A TP, SP or pipeline
    group sees one batch; SP splits its sequence, PP its layers."""
    tp: int = _f(1, _pos_int, "tensor parallel degree: DeepSpeed AutoTP shards attention and MLP projections")
    sp: int = _f(1, _pos_int, "sequence parallel degree: DeepSpeed Ulysses splits each sequence over sp ranks")
    tiled_mlp: bool = _f(False, _bool, "DeepSpeed's TiledMLP: the MLP runs over sequence tiles (long context)")
    tiled_loss: bool = _f(False, _bool, "the loss head runs over sequence tiles: no full logits tensor")
    ep: int = _f(1, _pos_int, "expert parallel degree (MoE models, ZeRO 1/2): deepspeed.moe splits the experts over "
                 "ep ranks; each data-parallel rank still reads its own batch")
    pp: int = _f(1, _pos_int, "pipeline parallel degree: DeepSpeed's pipeline engine runs the decoder layers as pp "
                 "stages, each micro-batch flowing through them (ZeRO 0/1; zero_trainer's own dense model)")

    @property
    def model_parallel(self) -> int:
        """Ranks that share one batch: world size / model_parallel = data-parallel degree."""
        return self.tp * self.sp * self.pp


_targets = ((str, list), lambda v: v == "all-linear" or (isinstance(v, list) and v != [] and all(
    isinstance(n, str) and n.strip() for n in v)), "all-linear, or a list of module names such as [q_proj, v_proj]")


@dataclass
class LoraSection:
    """LoRA through peft: the model's weights frozen, low-rank adapters on the target modules trained."""
    r: int = _f(0, _nonneg_int, "the adapters' rank; 0: no LoRA, every weight trains")
    alpha: float = _f(16, _pos_float, "scale: the update is alpha / r times B·A")
    dropout: float = _f(0.0, ((int, float), lambda v: 0 <= v < 1, "a probability in [0, 1)"))
    target_modules: list | str = _f("all-linear", _targets, "peft's target_modules: every linear layer but the "
                                    "output head, or the names of the modules to adapt")

    @property
    def enabled(self) -> bool:
        return self.r > 0


@dataclass
class HardwareSection:
    """A memory budget in GiB, meaning what `zero-trainer plan --gpu-mem/--cpu-mem/--nvme` mean: the plan is made
    for it (shared machines, GPU slices, CI, the machine you will rent). null: what the run detects."""
    gpu_mem: float | None = _f(None, _opt_gib, "per GPU; None: the GPU's memory")
    cpu_mem: float | None = _f(None, _opt_gib, "per node; None: the RAM (or the cgroup's limit)")
    nvme: float | None = _f(None, _opt_gib, "per node; None: free disk at the NVMe path when one is given")


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    hardware: HardwareSection = field(default_factory=HardwareSection)
    output_dir: str = _f("runs/debug", ((str,), lambda v: v.strip() != "", "a directory path"))
    path: str | None = field(default=None, metadata={"internal": True})  # the YAML file it was read from

    # --- derived values -------------------------------------------------------------------------------------

    @property
    def model_source(self) -> str:
        """The preset name, config.json path or pretrained model directory the recipe names."""
        return self.model.pretrained or self.model.config or self.model.preset

    @property
    def model_field(self) -> str:
        return "model.pretrained" if self.model.pretrained else "model.config" if self.model.config else "model.preset"

    @property
    def tokenizer_path(self) -> str | None:
        """data.tokenizer, or the pretrained model's directory (its tokenizer files); None: train a BPE."""
        return self.data.tokenizer or self.model.pretrained

    @property
    def nvme_path(self) -> str:
        """Where ZeRO-Infinity swaps: deepspeed.nvme_path, or OUTPUT_DIR/nvme."""
        return nvme_path_for(self.output_dir, self.deepspeed.nvme_path)

    @property
    def cache_dir(self) -> str:
        """Tokenizer and token-stream cache: data.cache_dir, $ZERO_TRAINER_CACHE, or ~/.cache/zero_trainer."""
        return (self.data.cache_dir or os.environ.get("ZERO_TRAINER_CACHE")
                or os.path.join(os.path.expanduser("~"), ".cache", "zero_trainer"))

    def to_dict(self) -> dict:
        """Plain data for summary.json and checkpoints (the YAML file as `recipe_path`)."""
        d = dataclasses.asdict(self)
        d["recipe_path"] = d.pop("path")
        return d


def nvme_path_for(output_dir: str, nvme_path: str | None = None) -> str:
    """The one place the NVMe default is made: OUTPUT_DIR/nvme unless a path is given."""
    return nvme_path or os.path.join(output_dir, "nvme")


MODEL_SOURCES = ("preset", "config", "pretrained")  # exactly one names the model
SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Recipe)
            if f.default_factory is not dataclasses.MISSING}
FIELDS = {
    **{f"{name}.{f.name}": f for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)},
    **{f.name: f for f in dataclasses.fields(Recipe) if f.name not in SECTIONS and not f.metadata.get("internal")},
}


class RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 reads `3e-4` as a string (it wants `3.0e-4`); recipes are full of such learning rates."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def read_yaml(text: str):
    return yaml.load(text, Loader=RecipeLoader)


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _leaves(value, path + ".")
        elif value is None and path in SECTIONS:
            continue  # `train:` with nothing under it is an empty section, not a value
        else:
            yield path, value


def set_field(recipe: Recipe, dotted: str, value, where: str) -> None:
    """Set one field by dotted name (`train.max_steps`); an unknown name is one line with a did-you-mean."""
    if dotted not in FIELDS:
        section = dotted.split(".")[0]
        top_level = set(SECTIONS) | {f for f in FIELDS if "." not in f}
        if dotted in SECTIONS:
            first = dataclasses.fields(SECTIONS[dotted])[0].name
            raise UsageError(f"recipe section '{dotted}' must be a mapping of fields, got {value!r}", where,
                             f"write fields under it, e.g. {dotted}.{first}")
        if section not in top_level:
            kind = "section" if "." in dotted else "key"
            raise UsageError(f"unknown recipe {kind} '{section}'", where, did_you_mean(section, top_level))
        raise UsageError(f"unknown recipe field '{dotted}'", where, did_you_mean(dotted, FIELDS))
    *parents, leaf = dotted.split(".")
    node = getattr(recipe, parents[0]) if parents else recipe
    setattr(node, leaf, value)


def get_field(recipe: Recipe, dotted: str):
    node = recipe
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def parse_override(text: str) -> tuple[str, object]:
    """`train.max_steps=30` -> ("train.max_steps", 30); the value is read as YAML (numbers, bools, null)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"override '{text}' is not KEY=VALUE", "command line",
                         "write overrides as dotted.field=value, e.g. train.max_steps=30")
    try:
        value = read_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def resolve_recipe_path(path: str) -> Path:
    """A path as given, or the name of a shipped recipe from any directory (`debug` or `debug.yaml`)."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    named = RECIPE_DIR / (path if path.endswith((".yaml", ".yml")) else f"{path}.yaml")
    if os.sep not in path and named.is_file():
        return named
    names = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
    raise UsageError(f"recipe file '{path}' not found", "--recipe",
                     "give a path to a YAML file or one of: " + ", ".join(names))


def load_recipe(path: str, overrides: list[str] = (), flags: dict | None = None) -> Recipe:
    """Defaults <- YAML file <- KEY=VALUE overrides <- command-line flags ({dotted: (value, flag)}), validated."""
    file = resolve_recipe_path(path)
    try:
        loaded = read_yaml(file.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else str(file)
        raise UsageError("recipe is not valid YAML", where, "fix the YAML syntax at that position") from None
    if not isinstance(loaded, dict):
        raise UsageError("recipe must be a mapping of sections", str(file),
                         "start with sections such as 'model:', 'data:', 'train:'")
    recipe = Recipe(path=str(file))
    for dotted, value in _leaves(loaded):
        set_field(recipe, dotted, value, str(file))
    from_file = {k for k in MODEL_SOURCES if getattr(recipe.model, k) is not None}
    for text in overrides:
        dotted, value = parse_override(text)
        set_field(recipe, dotted, value, f"override {text}")
        if dotted.startswith("model.") and dotted[6:] in MODEL_SOURCES and value is not None:
            for other in from_file - {dotted[6:]}:  # the command line's model replaces the file's
                setattr(recipe.model, other, None)
    for dotted, (value, flag) in (flags or {}).items():
        if value is not None:
            set_field(recipe, dotted, value, flag)
    validate_fields(recipe)
    return recipe


def validate_fields(recipe: Recipe) -> None:
    for dotted, f in FIELDS.items():
        types, check, hint = f.metadata["rule"]
        value = get_field(recipe, dotted)
        if isinstance(value, bool) and bool not in types:
            ok = False  # YAML's `yes` must not pass as the number 1
        else:
            ok = isinstance(value, types) and check(value)
        if not ok:
            raise UsageError(f"recipe field {dotted} = {value!r} is invalid", dotted, f"use {hint}")
    given = [f"model.{k}" for k in MODEL_SOURCES if getattr(recipe.model, k) is not None]
    if len(given) != 1:
        raise UsageError("recipe must name exactly one of model.preset, model.config and model.pretrained"
                         + (f" (it names {' and '.join(given)})" if given else ""), "model",
                         "set model.preset (e.g. debug), model.config (a local config.json: random init) or "
                         "model.pretrained (a local model dir: its weights), not two of them")
