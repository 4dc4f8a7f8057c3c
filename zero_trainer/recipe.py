"""Recipes: YAML files of knobs, merged over defaults, with `KEY=VALUE` overrides by dotted path.

A recipe is data. This module loads it, applies overrides, and checks every field's type and range so that
a typo fails in the launcher process with one line, not minutes later inside a rank.
"""

import copy
import os
import re
from pathlib import Path

import yaml

from .errors import UsageError, did_you_mean

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPE_DIR = REPO_ROOT / "recipes"

# Every field a recipe may set, with its default. A field absent here is a typo.
DEFAULTS = {
    "model": {
        "preset": None,  # a preset name from zero_trainer.model.PRESETS ...
        "config": None,  # ... or a local HF config.json (or its dir) instead
    },
    "data": {
        "path": None,  # None: the Python standard library's sources (no download)
        "tokenizer": None,  # None: a byte-level BPE trained on the corpus, cached
        "seq_len": 256,
        "eval_fraction": 0.05,
        "max_documents": None,
        "cache_dir": None,  # None: $ZERO_TRAINER_CACHE or ~/.cache/zero_trainer
    },
    "train": {
        "max_steps": 100,
        "micro_batch": 8,
        "grad_accum": 1,
        "lr": 1.0e-3,
        "warmup_steps": 10,
        "weight_decay": 0.1,
        "betas": [0.9, 0.95],
        "eps": 1.0e-8,
        "grad_clip": 1.0,
        "precision": "bf16",
        "activation_checkpointing": False,
        "seed": 1234,
        "log_every": 1,
        "eval_every": 50,
        "eval_batches": 4,
        "sample_tokens": 24,
        "save_every": 0,
        "keep_last": 2,
        "stop_at_step": None,  # checkpoint and stop here without finishing the schedule (time-boxed jobs)
    },
    "deepspeed": {
        "config": "zero2",  # a ds_configs/ name, a path to a JSON file, or "auto" (the planner picks)
        "nvme_path": None,  # None: OUTPUT_DIR/nvme
    },
    "output_dir": "runs/debug",
}

PRECISIONS = ("bf16", "fp16", "fp32")


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

# field -> (types, check, hint). Checks return True when the value is fine.
_pos_int = ((int,), lambda v: v >= 1, "a whole number >= 1")
_nonneg_int = ((int,), lambda v: v >= 0, "a whole number >= 0")
_pos_float = ((int, float), lambda v: v > 0, "a number > 0")
_nonneg_float = ((int, float), lambda v: v >= 0, "a number >= 0")
_opt_str = ((str, type(None)), lambda v: v is None or v.strip() != "", "a non-empty string or null")
_bool = ((bool,), lambda v: True, "true or false")
FIELD_RULES = {
    "model.preset": _opt_str,
    "model.config": _opt_str,
    "data.path": _opt_str,
    "data.tokenizer": _opt_str,
    "data.seq_len": _pos_int,
    "data.eval_fraction": ((int, float), lambda v: 0 < v < 1, "a fraction between 0 and 1 (exclusive)"),
    "data.max_documents": ((int, type(None)), lambda v: v is None or v >= 1, "a whole number >= 1 or null"),
    "data.cache_dir": _opt_str,
    "train.max_steps": _pos_int,
    "train.micro_batch": _pos_int,
    "train.grad_accum": _pos_int,
    "train.lr": _pos_float,
    "train.warmup_steps": _nonneg_int,
    "train.weight_decay": _nonneg_float,
    "train.betas": ((list,), lambda v: len(v) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in v),
                    "two numbers in [0, 1), e.g. [0.9, 0.95]"),
    "train.eps": _pos_float,
    "train.grad_clip": _nonneg_float,
    "train.precision": ((str,), lambda v: v in PRECISIONS, "one of " + ", ".join(PRECISIONS)),
    "train.activation_checkpointing": _bool,
    "train.seed": _nonneg_int,
    "train.log_every": _pos_int,
    "train.eval_every": _nonneg_int,
    "train.eval_batches": _pos_int,
    "train.sample_tokens": _nonneg_int,
    "train.save_every": _nonneg_int,
    "train.keep_last": _pos_int,
    "train.stop_at_step": ((int, type(None)), lambda v: v is None or v >= 1, "a whole number >= 1 or null"),
    "deepspeed.config": ((str,), lambda v: v.strip() != "", "a ds_configs name, a JSON path, or auto"),
    "deepspeed.nvme_path": _opt_str,
    "output_dir": ((str,), lambda v: v.strip() != "", "a directory path"),
}


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _leaves(value, path + ".")
        elif value is None and path in SECTIONS:
            continue  # `train:` with nothing under it is an empty section, not a value
        else:
            yield path, value


SECTIONS = {key for key, value in DEFAULTS.items() if isinstance(value, dict)}
ALL_FIELDS = {path for path, _ in _leaves(DEFAULTS)}


def set_field(recipe: dict, dotted: str, value, where: str) -> None:
    if dotted not in ALL_FIELDS:
        section = dotted.split(".")[0]
        top_level = SECTIONS | {f for f in ALL_FIELDS if "." not in f}
        if dotted in SECTIONS:
            raise UsageError(f"recipe section '{dotted}' must be a mapping of fields, got {value!r}", where,
                             f"write fields under it, e.g. {dotted}.{next(iter(DEFAULTS[dotted]))}")
        if section not in top_level:
            kind = "section" if "." in dotted else "key"
            raise UsageError(f"unknown recipe {kind} '{section}'", where, did_you_mean(section, top_level))
        raise UsageError(f"unknown recipe field '{dotted}'", where, did_you_mean(dotted, ALL_FIELDS))
    node = recipe
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value


def get_field(recipe: dict, dotted: str):
    node = recipe
    for part in dotted.split("."):
        node = node[part]
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
    """A path as given, or a bare name from recipes/ (`debug` -> recipes/debug.yaml)."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    named = RECIPE_DIR / f"{path}.yaml"
    if os.sep not in path and named.is_file():
        return named
    names = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
    raise UsageError(f"recipe file '{path}' not found", "--recipe",
                     "give a path to a YAML file or one of: " + ", ".join(names))


def load_recipe(path: str, overrides: list[str] = ()) -> dict:
    """Defaults <- YAML file <- KEY=VALUE overrides, then validated. Returns a plain nested dict."""
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
    recipe = copy.deepcopy(DEFAULTS)
    for dotted, value in _leaves(loaded):
        set_field(recipe, dotted, value, str(file))
    for text in overrides:
        dotted, value = parse_override(text)
        set_field(recipe, dotted, value, f"override {text}")
    validate_fields(recipe)
    recipe["recipe_path"] = str(file)
    return recipe


def validate_fields(recipe: dict) -> None:
    for dotted, (types, check, hint) in FIELD_RULES.items():
        value = get_field(recipe, dotted)
        if isinstance(value, bool) and bool not in types:
            ok = False  # YAML's `yes` must not pass as the number 1
        else:
            ok = isinstance(value, types) and check(value)
        if not ok:
            raise UsageError(f"recipe field {dotted} = {value!r} is invalid", dotted, f"use {hint}")
    model = recipe["model"]
    if (model["preset"] is None) == (model["config"] is None):
        raise UsageError("recipe must name exactly one of model.preset and model.config", "model",
                         "set model.preset (e.g. debug) or model.config (a local config.json), not both")
