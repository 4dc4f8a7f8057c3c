"""`auto` is the whole plan: the planner sizes every memory knob, the run applies all of it (rung, activation
checkpointing, sized knobs) inside the recipe's `hardware:` budget, and says what it did in summary.json.

The real runs: a budget that forces activation checkpointing on minimind-26m at seq_len 1024 (one process of its
own, so its peak RSS is its own), and every shipped JSON's engine run (conftest.engine_runs), whose knobs were
left out and sized. The traps DeepSpeed falls into at scale are in test_bad_inputs.py's catalog.
"""

import json
import math
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from zero_trainer import plan
from zero_trainer.ds_config import SIZED_KEYS, auto_keys, available_ds_configs, load_ds_config
from zero_trainer.hardware import GiB, Hardware

BOUND = 0.15


def _get(ds: dict, dotted: str):
    for part in dotted.split("."):
        ds = ds[part]
    return ds


# ---------------------------------------------------------------------------------------------------------------
# the plan as data


# The "auto" values accelerate fills (Accelerator._prepare_deepspeed with DummyOptim/DummyScheduler, and the plugin's
# batch and precision); HF Trainer fills these and more. Any other "auto" makes accelerate raise.
ACCELERATE_FILLS = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "gradient_clipping", "optimizer.params.lr", "optimizer.params.weight_decay",
                    "scheduler.params.total_num_steps", "scheduler.params.warmup_num_steps", "fp16.enabled",
                    "bf16.enabled", "zero_optimization.reduce_bucket_size",
                    "zero_optimization.stage3_prefetch_bucket_size",
                    "zero_optimization.stage3_param_persistence_threshold"}


def test_shipped_json_leaves_memory_knobs_out_and_zero_trainer_sizes_them():
    for name in available_ds_configs():
        _, raw = load_ds_config(name)
        assert set(auto_keys(raw)) <= ACCELERATE_FILLS, (name, set(auto_keys(raw)) - ACCELERATE_FILLS)
        assert "betas" not in raw["optimizer"]["params"] and "eps" not in raw["optimizer"]["params"]
    _, raw = load_ds_config("zero3_nvme")
    rung = plan.sized_rung("zero3_nvme", raw, plan.model_shape("debug"), plan.Workload(64, 4, "fp32"),
                           Hardware(1, 1, None, 8 * GiB, 10 * GiB))
    z = "zero_optimization."
    assert set(rung.sized) == set(SIZED_KEYS) - {"aio.intra_op_parallelism"}  # aio: the JSON's number stays
    assert _get(rung.ds, "optimizer.params.betas") == [0.9, 0.95] and _get(rung.ds, "optimizer.params.eps") == 1e-8
    for key, value in rung.sized.items():
        assert _get(rung.ds, key) == value, key
    assert rung.ds["aio"]["intra_op_parallelism"] == 1 and z + "offload_param.buffer_size" in rung.sized


def test_3b_on_this_box_plans_zero3_with_sized_knobs():
    """The issue's command: 3b, seq 128, micro batch 1, 70 GiB NVMe, 23 GiB RAM."""
    proc = run_cli("plan", "--model", "3b", "--seq-len", "128", "--micro-batch", "1", "--nvme", "70",
                   "--cpu-mem", "23", "--json")
    doc = json.loads(proc.stdout)
    assert doc["chosen"] == "zero3_nvme" and doc["activation_checkpointing"] in (True, False)
    z = "zero_optimization."
    assert doc["sized"][z + "offload_param.buffer_size"] >= plan.model_shape("3b").largest_param  # the embedding
    assert doc["predicted_peak_bytes"] < 23 * GiB * (1 - plan.SAFETY_MARGIN)


@pytest.mark.parametrize("model, cpu_gib, swapped", [("3b", 23, False), ("7b", 23, True)])
def test_nvme_parameters_get_buffers_for_their_window(model, cpu_gib, swapped):
    """Parameters that fit in RAM stay there (max_in_cpu = all of them); those that do not are swapped, nothing
    is kept for reuse (each kept tensor would hold a swap buffer) and the buffers cover the prefetch window."""
    shape = plan.model_shape(model)
    p = plan.make_plan(shape, Hardware(1, 1, None, cpu_gib * GiB, 200 * GiB), plan.Workload(128, 1, "bf16"))
    assert p.chosen.name == "zero3_nvme", p.reason
    sized, z = p.sized, "zero_optimization."
    if not swapped:
        assert sized[z + "offload_param.max_in_cpu"] >= shape.params
        return
    assert sized[z + "offload_param.max_in_cpu"] == 0 and sized[z + "stage3_max_reuse_distance"] == 0
    zero = p.chosen.rung.zero
    needed = plan.param_buffers_needed(shape, zero, p.chosen.rung.ds, 1, 2)
    assert sized[z + "offload_param.buffer_count"] >= needed >= 2
    assert sized[z + "offload_optimizer.buffer_count"] == 4  # master, two Adam moments, gradients
    assert sized[z + "sub_group_size"] >= shape.largest_param


def test_sizing_follows_the_hardware_and_the_user_number_wins():
    shape = plan.model_shape("7b")
    workload = plan.Workload(2048, 1, "bf16")
    _, raw = load_ds_config("zero3_nvme")
    small = plan.sized_rung("zero3_nvme", raw, shape, workload, Hardware(1, 8, 80 * GiB, 256 * GiB, 2**42))
    big = plan.sized_rung("zero3_nvme", raw, shape, workload, Hardware(1, 8, 80 * GiB, 2048 * GiB, 2**42))
    key = "zero_optimization.sub_group_size"
    assert small.sized[key] < big.sized[key] <= plan.DS_DEFAULT_KNOB  # more RAM, larger optimizer sub-groups
    assert small.sized[key] >= math.ceil(shape.largest_param / 8)
    assert small.sized["zero_optimization.offload_param.pin_memory"] is True  # a GPU box with room to pin
    tight = plan.sized_rung("zero3_offload", load_ds_config("zero3_offload")[1], shape, workload,
                            Hardware(1, 8, 80 * GiB, 128 * GiB, 0))
    assert tight.sized["zero_optimization.offload_optimizer.pin_memory"] is False  # 108 GB would be locked
    mine = json.loads(json.dumps(raw))
    mine["zero_optimization"]["sub_group_size"] = 12345
    rung = plan.sized_rung("zero3_nvme", mine, shape, workload, Hardware(1, 8, 80 * GiB, 256 * GiB, 2**42))
    assert rung.zero["sub_group_size"] == 12345 and key not in rung.sized
    assert not list(auto_keys(rung.ds)), list(auto_keys(rung.ds))


def test_scale_result_meets_the_issue():
    """bench/results/scale.json: >= 4B through --ds-config auto with no override, >= 2 steps with a non-zero
    learning rate, the prediction within 15% (as committed and as plan.py predicts it now)."""
    doc = json.loads((REPO / "bench" / "results" / "scale.json").read_text())
    assert doc["params"] >= 4e9 and doc["ds_config_overrides"] == {}
    assert sum(lr > 0 for lr in doc["lr"]) >= 2
    measured = doc["peak_rss_bytes"] - doc["rss_before_model_bytes"]
    assert abs(doc["predicted_peak_bytes"] / measured - 1) <= BOUND
    shape = plan._llama_shape("scale", doc["shape"])
    assert shape.params == doc["params"]
    hw = Hardware(1, 1, None, doc["cpu_mem_bytes"], doc["nvme_free_bytes_before"] // GiB * GiB)
    now = plan.make_plan(shape, hw, plan.Workload(doc["seq_len"], doc["micro_batch"], "bf16"))
    assert now.chosen.name == doc["ds_config_name"]
    assert abs(now.predicted_peak_bytes / measured - 1) <= BOUND, (now.predicted_peak_bytes, measured)


# ---------------------------------------------------------------------------------------------------------------
# runs


@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["zero2_offload", "zero3", "zero3_offload", "zero3_nvme"])
def test_named_rung_runs_with_its_knobs_sized(name, engine_runs):
    """A named rung's "auto" knobs are sized when the run resolves it; summary.json says so."""
    summary = engine_runs[name, 2]
    ds, p = summary["ds_config"], summary["plan"]
    assert not list(auto_keys(ds)), list(auto_keys(ds))
    assert p["rung"] == name and p["activation_checkpointing"] is False and p["predicted_peak_bytes"] > 0
    assert p["sized"] and set(p["sized"]) <= set(SIZED_KEYS)
    for dotted, value in p["sized"].items():
        assert _get(ds, dotted) == value, dotted


@pytest.mark.multiproc
def test_budget_forces_activation_checkpointing(tmp_path):
    """minimind-26m at seq_len 1024 in a RAM budget between its peak with and without activation checkpointing:
    `auto` turns checkpointing on, the run stays inside the budget, and its peak is the predicted one (±15%)."""
    seq, micro = 1024, 2
    shape = plan.model_shape("minimind-26m")
    rungs = plan.ladder_rungs(shape, plan.Workload(seq, micro, "fp32"), Hardware(1, 1, None, 64 * GiB))
    zero0 = next(r for r in rungs if r.name == "zero0")
    need = {ac: plan.estimate(shape, zero0, Hardware(1, 1, None, 64 * GiB), plan.Workload(seq, micro, "fp32"),
                              ac).cpu_bytes / (1 - plan.SAFETY_MARGIN) for ac in (False, True)}
    assert need[True] < need[False] * 0.9  # the activations matter at this length
    budget = (need[True] + need[False]) / 2
    out = tmp_path / "run"
    proc = run_cli("train", "--recipe", "debug", "--ds-config", "auto", "--output-dir", out,
                   "model.preset=minimind-26m", f"data.seq_len={seq}", f"train.micro_batch={micro}",
                   f"hardware.cpu_mem={budget / GiB:.3f}", "train.max_steps=3", "train.eval_batches=1",
                   "train.eval_every=0", "train.sample_tokens=0", "data.max_documents=400", "train.warmup_steps=1")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["activation_checkpointing"] is True
    p = summary["plan"]
    assert p["rung"] == summary["ds_config_name"] == "zero0" and p["activation_checkpointing"] is True
    start = [line for line in proc.stdout.splitlines() if line.startswith("plan: ")]
    assert len(start) == 1 and "zero0 with activation checkpointing" in start[0], proc.stdout[-3000:]
    assert summary["peak_mem_bytes"] <= budget, (summary["peak_mem_bytes"], budget)
    measured = summary["peak_mem_bytes"] - summary["rss_before_model_bytes"]
    assert abs(p["predicted_peak_bytes"] / measured - 1) <= BOUND, (p["predicted_peak_bytes"], measured)
    assert Path(summary["recipe"]["output_dir"]) == out
    assert summary["recipe"]["hardware"]["cpu_mem"] == pytest.approx(budget / GiB, abs=1e-3)
