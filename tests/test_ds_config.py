"""ds_config.py in-process: DeepSpeed JSON validation against DeepSpeed's own parser, "auto" filling, run dirs."""

import copy
import json
import math
import os
from pathlib import Path

import pytest

from zero_trainer.ds_config import (
    MIN_REDUCE_BUCKET,
    ZERO_ALIASES,
    available_ds_configs,
    load_ds_config,
    nvme_bytes_needed,
    resolve_auto_values,
    validate_ds_config,
)
from zero_trainer.errors import UsageError
from zero_trainer.hardware import unwritable_reason
from zero_trainer.recipe import load_recipe

RECIPE = load_recipe("debug")


def shipped(name: str) -> dict:
    return load_ds_config(name)[1]


def error_line(ds: dict, recipe=RECIPE, world_size=1) -> str:
    with pytest.raises(UsageError) as err:
        validate_ds_config(ds, recipe, world_size=world_size, source="my.json")
    return err.value.line()


@pytest.mark.parametrize("name", available_ds_configs())
@pytest.mark.parametrize("world_size", [1, 2])
def test_every_shipped_config_validates(name, world_size):
    """No false alarms: DeepSpeed reads every key the shipped files carry (aio.thread_count was one it ignored)."""
    filled = validate_ds_config(shipped(name), RECIPE, world_size=world_size, source=name)
    assert filled["train_batch_size"] == RECIPE.train.micro_batch * world_size


def _set(path: str, value):
    def change(ds):
        *parents, leaf = path.split(".")
        node = ds
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return change


def _drop(*keys):
    return lambda ds: [ds.pop(k) for k in keys]


# (shipped config, change, substrings of the one error line)
BAD = {
    "pydantic block: misspelt key": ("zero3", _set("zero_optimization.stage3_prefetch_bucket_sise", 5),
                                     ["unknown DeepSpeed config key 'zero_optimization.stage3_prefetch_bucket_sise'",
                                      "did you mean 'stage3_prefetch_bucket_size'"]),
    "pydantic block nested two deep": ("zero3_offload", _set("zero_optimization.offload_param.pin_memroy", True),
                                       ["zero_optimization.offload_param.pin_memroy", "did you mean 'pin_memory'"]),
    "pydantic block at top level": ("zero2", _set("csv_monitor", {"enabld": True}),
                                    ["'csv_monitor.enabld'", "did you mean 'enabled'"]),
    "pydantic whole-block check": ("zero3", _set("zero_optimization.compute_grad_norm", False),
                                   ["DeepSpeed rejects the 'zero_optimization' block", "only with ZeRO Stage 1 or 2"]),
    "dict block DeepSpeed reads by name": ("zero3_nvme", _set("aio.block_sise", 1 << 20),
                                           ["'aio.block_sise' (DeepSpeed would ignore", "did you mean 'block_size'"]),
    "top-level typo": ("zero2", _set("wall_clock_breakdwon", True), ["did you mean 'wall_clock_breakdown'"]),
    "activation checkpointing typo": ("zero2", _set("activation_checkpointing", {"partition_activation": True}),
                                      ["did you mean 'partition_activations'"]),
    "legacy bfloat16 next to bf16": ("zero2", _set("bfloat16", {"enabled": True}), ["'bfloat16'", "'bf16'"]),
    "auto nothing fills": ("zero2", _set("scheduler.params.cos_min_ratio", "auto"),
                           ['"auto" at scheduler.params.cos_min_ratio']),
    "wrong type": ("zero2", _set("zero_optimization.allgather_bucket_size", "big"),
                   ["zero_optimization.allgather_bucket_size = 'big'"]),
    "not a block": ("zero2", _set("zero_optimization", 2), ["DeepSpeed cannot parse"]),
    "offload at stage 0": ("zero0", _set("zero_optimization.offload_optimizer", {"device": "cpu"}),
                           ["offload_optimizer is ignored at ZeRO stage 0"]),
    "DeepSpeed's own error check": ("zero3", _set("gradient_allreduce_op", "sum"), ["not supported with ZeRO stage 3"]),
    "batch size DeepSpeed derives": ("zero2", _drop("train_batch_size", "gradient_accumulation_steps"),
                                     ["DeepSpeed would derive", "gradient_accumulation_steps=1 vs train.grad_accum=2"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_is_named(case):
    name, change, expected = BAD[case]
    ds = shipped(name)
    change(ds)
    recipe = load_recipe("debug", ["train.grad_accum=2"])
    line = error_line(ds, recipe)
    assert line.startswith("error: ") and "\n" not in line
    for text in expected:
        assert text in line, line


def test_explicit_batch_numbers_checked_at_the_real_world_size():
    ds = shipped("zero2")
    ds.update(train_batch_size=16, train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=1)
    validate_ds_config(ds, RECIPE, world_size=2)  # 8 x 1 x 2
    assert "x world size 1" in error_line(ds, world_size=1)


def test_validation_leaves_the_input_alone():
    ds = shipped("zero3_nvme")
    before = copy.deepcopy(ds)
    validate_ds_config(ds, RECIPE, world_size=2)
    assert ds == before


def test_resolve_fills_model_autos_and_still_rejects_mismatches():
    resolved = resolve_auto_values(shipped("zero3"), RECIPE, world_size=1, hidden_size=128)
    zero = resolved["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (MIN_REDUCE_BUCKET, int(0.9 * 128 * 128), 1280)
    # the floor never exceeds the model, and from h = 1000 up h² wins, as HF sets it
    assert resolve_auto_values(shipped("zero3"), RECIPE, world_size=1, hidden_size=128, params=4096)[
        "zero_optimization"]["reduce_bucket_size"] == 128 * 128
    assert resolve_auto_values(shipped("zero3"), RECIPE, world_size=1, hidden_size=2048, params=10**9)[
        "zero_optimization"]["reduce_bucket_size"] == 2048 * 2048
    ds = shipped("zero2")
    ds["gradient_clipping"] = 5.0
    with pytest.raises(UsageError, match="gradient_clipping=5.0 vs train.grad_clip=1.0"):
        resolve_auto_values(ds, RECIPE, world_size=1, hidden_size=128)


def test_duplicate_json_key_is_refused(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"fp16": {"enabled": false}, "fp16": {"enabled": true}}')
    with pytest.raises(UsageError, match="'fp16' twice"):
        load_ds_config(str(path))


def test_unwritable_reason_creates_nothing(tmp_path):
    assert unwritable_reason(tmp_path / "a" / "b" / "c") is None
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    assert "is a file" in unwritable_reason(tmp_path / "file" / "run")
    assert "not a directory" in unwritable_reason(tmp_path / "file")
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o500)
        assert "not writable" in unwritable_reason(tmp_path / "ro" / "run")


def test_nvme_bytes_needed():
    nvme = shipped("zero3_nvme")
    assert nvme_bytes_needed(nvme, 1000, "bf16") == 1000 * (16 + 2)
    assert nvme_bytes_needed(nvme, 1000, "fp32") == 1000 * (16 + 4)
    assert nvme_bytes_needed(shipped("zero3_offload"), 1000, "bf16") == 0


@pytest.mark.parametrize("text, expected", [
    ("trainer:\n  max_steps: 3\n", "unknown recipe section 'trainer' (recipe.yaml): did you mean 'train'?"),
    ("train: 5\n", "recipe section 'train' must be a mapping"),
    ("outputdir: x\n", "unknown recipe key 'outputdir' (recipe.yaml): did you mean 'output_dir'?"),
])
def test_recipe_sections(tmp_path, text, expected):
    path = tmp_path / "recipe.yaml"
    path.write_text("model:\n  preset: debug\n" + text)
    with pytest.raises(UsageError) as err:
        load_recipe(str(path))
    assert expected in err.value.line().replace(str(path), "recipe.yaml")


def test_empty_recipe_section_is_allowed(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model:\n  preset: debug\ntrain:\n")
    assert load_recipe(str(path)).train.max_steps == 100


# --------------------------------------------------------------------------------------------------------------
# JSONs other tools ship (tests/peer_configs): understood as DeepSpeed understands them


PEERS = Path(__file__).resolve().parent / "peer_configs"


def test_zero_aliases_are_deepspeeds():
    """The alias table is DeepSpeed's own: every zero_optimization field with a second name, no more."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    aliases = {n: f.alias for n, f in DeepSpeedZeroConfig.model_fields.items() if f.alias and f.alias != n}
    assert ZERO_ALIASES == aliases


@pytest.mark.parametrize("name", sorted(p.name for p in PEERS.glob("*.json")))
def test_peer_json_validates_and_resolves_under_one_name(name, capsys):
    """LLaMA-Factory's and Axolotl's JSONs: accepted (keys DeepSpeed ignores are a warning), every "auto" filled under
    either name, and each setting written once, under DeepSpeed's stage3_ name."""
    recipe = load_recipe("debug", ["train.precision=bf16"])
    _, ds = load_ds_config(str(PEERS / name))
    validate_ds_config(ds, recipe, world_size=2, source=name)
    resolved = resolve_auto_values(ds, recipe, world_size=2, hidden_size=128)
    zero = resolved["zero_optimization"]
    assert not set(zero) & set(ZERO_ALIASES), sorted(zero)
    assert "auto" not in json.dumps(resolved)
    raw = json.loads((PEERS / name).read_text())
    if "prefetch_bucket_size" in raw["zero_optimization"]:  # Axolotl's short names
        assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 128 * 128)
        assert zero["stage3_max_live_parameters"] == 0 and zero["stage3_max_reuse_distance"] == 0
    err = capsys.readouterr().err
    for ignored in ("comms_config", "monitor_config"):
        assert (f"ignores '{ignored}'" in err) == (ignored in raw), err


def test_alias_and_its_name_together_is_one_line(tmp_path):
    path = tmp_path / "both.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "max_live_parameters": 1,
                                                      "stage3_max_live_parameters": 2}}))
    with pytest.raises(UsageError) as err:
        load_ds_config(str(path))
    assert "both 'max_live_parameters' and 'stage3_max_live_parameters'" in err.value.line()


def test_sized_knobs_given_by_alias_stay_the_users(tmp_path):
    """The planner sizes what a JSON leaves out; a knob given under its short name is given (never written twice)."""
    from zero_trainer.ds_config import fill_sized

    path = tmp_path / "short.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "max_reuse_distance": 7}}))
    _, ds = load_ds_config(str(path))
    filled, set_now = fill_sized(ds, {"zero_optimization.stage3_max_reuse_distance": 99,
                                      "zero_optimization.stage3_max_live_parameters": 5})
    assert filled["zero_optimization"]["stage3_max_reuse_distance"] == 7
    assert set_now == {"zero_optimization.stage3_max_live_parameters": 5}


@pytest.mark.parametrize("key, warned", [("aio.thread_count", True), ("comms_config", True),
                                         ("gradient_clippin", False)])
def test_ignored_key_warns_misspelling_refuses(key, warned, capsys):
    """A key DeepSpeed never reads: a warning when it is no known key's near-miss (a renamed or foreign key), an
    error with did-you-mean when it is one (it would silently not apply)."""
    ds = shipped("zero3_nvme")
    _set(key, 1)(ds)
    if warned:
        validate_ds_config(ds, RECIPE, world_size=1, source="my.json")
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"ignores '{key}' (my.json)" in err[0], err
    else:
        assert "did you mean 'gradient_clipping'" in error_line(ds)


@pytest.mark.multiproc
@pytest.mark.parametrize("name", sorted(p.stem for p in PEERS.glob("*.json")))
def test_peer_json_trains_as_shipped(name, engine_runs):
    """Each peer JSON unchanged, 2 ranks, bf16: trains, and DeepSpeed ran it with one name per setting."""
    summary = engine_runs[f"peer_{name}", 2]
    assert summary["steps"] == 3 and all(math.isfinite(x) for x in summary["losses"])
    assert not set(summary["ds_config"]["zero_optimization"]) & set(ZERO_ALIASES)
